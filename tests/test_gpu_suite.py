"""benchmarks/gpu_suite.sh and gpu_suite.py: arguments, the commands, running rows under timeouts, the table.

What needs a GPU (the benchmarks themselves) cannot run here; `bash benchmarks/gpu_suite.sh --cpu_smoke`
runs the whole suite on the CPU with the tiny model (minutes on a loaded 2-core host, so not in this file).
"""

import json
import os
import subprocess
import sys

import jax
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import bench_vs_pytorch  # noqa: E402  pylint: disable=g-import-not-at-top
import gpu_suite  # noqa: E402  pylint: disable=g-import-not-at-top

from mae_jax import models  # noqa: E402  pylint: disable=g-import-not-at-top

SUITE_SH = os.path.join(REPO, 'benchmarks', 'gpu_suite.sh')


def run_sh(*args, **kwargs):
  return subprocess.run(['bash', SUITE_SH, *args], capture_output=True, text=True, timeout=60, cwd=REPO, **kwargs)


def test_help_lists_the_options_of_the_script_and_the_driver():
  result = run_sh('--help')
  assert result.returncode == 0, result.stderr
  for option in ('--setup=auto|always|never', '--python=PATH', '--out', '--budget_s', '--only', '--dry_run',
                 '--cpu_smoke'):
    assert option in result.stdout


@pytest.mark.parametrize('args, message', [
    (['--bogus'], 'unrecognized arguments: --bogus'),
    (['--only=train,nope'], '--only=train,nope: must be a comma-separated subset'),
    (['--budget_s=0'], '--budget_s=0.0: must be positive'),
    (['--setup=sometimes'], '--setup=sometimes: must be auto, always or never'),
    (['--out'], '--out needs a value'),
])
def test_bad_arguments_exit_2_before_anything_is_set_up(args, message, tmp_path):
  result = run_sh(*args, f'--workdir={tmp_path / "wd"}')
  assert result.returncode == 2
  assert message in result.stderr
  assert 'nvidia-smi' not in result.stdout and 'setup' not in result.stdout
  assert not (tmp_path / 'wd').exists()


def test_dry_run_prints_every_benchmark_command_and_runs_nothing(tmp_path):
  workdir = tmp_path / 'wd'
  result = run_sh('--dry_run', f'--workdir={workdir}', f'--out={tmp_path / "t.md"}')
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if line.startswith('timeout ')]
  assert len(lines) == 5
  joined = '\n'.join(lines)
  for expected in ('--models=B --batch=256', '--models=L --batch=128', '--models=H --batch=64',
                   'bench_speedup.py --model=L', 'bench_vs_pytorch.py --model=b16'):
    assert expected in joined
  assert all('--dtype=bfloat16 --attention_impl=cudnn' in line for line in lines)
  assert all(f'--json_out={workdir}/' in line for line in lines)
  assert 'XLA_PYTHON_CLIENT_PREALLOCATE=false' in lines[3]  # PyTorch shares the GPU with JAX there
  assert 'models=H' in lines[-1]  # the longest compile last
  assert '# first: a cuDNN attention preflight' in result.stdout
  assert 'bash .ci/setup dev,gpu,torch' in result.stdout
  assert not workdir.exists() and not (tmp_path / 't.md').exists()


def _checkout_without_venv(tmp_path, setup_script):
  """benchmarks/gpu_suite.{sh,py} in a fresh tree with no .venv, whose .ci/setup is `setup_script`."""
  root = tmp_path / 'checkout'
  (root / 'benchmarks').mkdir(parents=True)
  (root / '.ci').mkdir()
  for name in ('gpu_suite.sh', 'gpu_suite.py'):
    with open(os.path.join(REPO, 'benchmarks', name), encoding='utf-8') as f:
      (root / 'benchmarks' / name).write_text(f.read())
  (root / '.ci' / 'setup').write_text(setup_script)
  return root


def test_a_checkout_without_venv_runs_the_setup_then_says_why_jax_sees_no_gpu(tmp_path):
  # The default --python (.venv/bin/python) does not exist yet on a fresh clone: the setup must run and
  # install it (here a stand-in that records its arguments and installs nothing).
  root = _checkout_without_venv(tmp_path, 'echo "$1" > "$(dirname "$0")/setup_called"\n')
  result = subprocess.run(['bash', 'benchmarks/gpu_suite.sh', f'--out={tmp_path / "t.md"}'], capture_output=True,
                          text=True, timeout=120, cwd=root, env={**os.environ, 'PATH': '/usr/bin:/bin'})
  assert result.returncode == 1
  assert (root / '.ci' / 'setup_called').read_text().strip() == 'dev,gpu,torch'
  assert f'error: {root}/.venv/bin/python: ' in result.stderr, result.stderr
  assert 'No such file or directory' in result.stderr
  assert '/python sees no GPU' not in result.stderr


def test_a_failed_setup_names_what_python3_lacks_and_the_offline_fix(tmp_path):
  # A machine without the package index: the setup fails; python3 on PATH (here one without JAX) was not used
  # as it is, and the message says why and how to run with it.
  root = _checkout_without_venv(tmp_path, 'echo "no network" >&2; exit 1\n')
  result = subprocess.run(['bash', 'benchmarks/gpu_suite.sh', f'--out={tmp_path / "t.md"}'], capture_output=True,
                          text=True, timeout=120, cwd=root, env={**os.environ, 'PATH': '/usr/bin:/bin'})
  assert result.returncode == 1
  assert 'error: bash .ci/setup dev,gpu,torch failed' in result.stderr, result.stderr
  assert "cannot import mae_jax.pretrain_step: ModuleNotFoundError: No module named 'jax'" in result.stderr
  assert '--setup=never' in result.stderr and not (tmp_path / 't.md').exists()


def test_an_interpreter_without_mae_jax_s_needs_is_named_with_its_import_error(tmp_path):
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(tmp_path / 'bare')], check=True, timeout=60)
  bare = tmp_path / 'bare' / 'bin' / 'python'
  result = run_sh('--cpu_smoke', f'--python={bare}', f'--workdir={tmp_path / "wd"}')
  assert result.returncode == 1
  want = f"error: {bare}: cannot import mae_jax.pretrain_step: ModuleNotFoundError: No module named 'jax'"
  assert want in result.stderr
  assert not (tmp_path / 'wd').exists()


def test_rows_import_mae_jax_from_this_checkout():
  for row in gpu_suite.plan('/tmp/wd', cpu_smoke=True) + gpu_suite.plan('/tmp/wd'):
    assert row.env['PYTHONPATH'].split(os.pathsep)[0] == REPO


def test_only_and_cpu_smoke_select_the_rows(tmp_path):
  result = run_sh('--dry_run', '--cpu_smoke', '--only=vs_pytorch', f'--workdir={tmp_path}')
  assert result.returncode == 0, result.stderr
  lines = [line for line in result.stdout.splitlines() if line.startswith('timeout ')]
  assert len(lines) == 1
  assert 'JAX_PLATFORMS=cpu' in lines[0] and '--model=tiny' in lines[0] and '--skip_compile' in lines[0]
  assert 'setup' not in result.stdout


def _row(tmp_path, name, code, timeout_s=30, group='train'):
  row = gpu_suite.Row(name, group, f'row {name}', [sys.executable, '-c', code], timeout_s)
  row.json_path = str(tmp_path / f'{name}.json')
  return row


TRAIN_JSON = {'benchmark': 'train_step', 'rows': [dict(
    model='mae_vit_base_patch16', batch_per_device=256, dtype='bfloat16', attention_impl='cudnn', remat='none',
    scan_layers=False, compile_s=31.0, memory_gib_per_device=40.25, step_ms=80.0, images_per_s=3200.0,
    tflops_per_device=188.2, mfu=0.19)]}


def test_run_suite_records_success_failure_and_timeout_and_goes_on(tmp_path):
  ok_code = f'import json; json.dump({TRAIN_JSON!r}, open({str(tmp_path / "ok.json")!r}, "w"))'
  rows = [
      _row(tmp_path, 'ok', ok_code),
      _row(tmp_path, 'crash', 'import sys; print("loading"); sys.exit("ValueError: model.attention_impl=cudnn")'),
      _row(tmp_path, 'silent', 'pass'),
      _row(tmp_path, 'hang', 'import time; time.sleep(60)', timeout_s=1),
      _row(tmp_path, 'after', ok_code.replace('ok.json', 'after.json')),
  ]
  results = gpu_suite.run_suite(rows, str(tmp_path), budget_s=120, echo=lambda *a, **k: None, min_row_s=0)
  by_name = {r['name']: r for r in results}
  assert by_name['ok']['status'] == 'ok' and by_name['ok']['data'] == TRAIN_JSON
  assert by_name['crash']['status'] == 'failed'
  assert by_name['crash']['reason'] == 'exit code 1: ValueError: model.attention_impl=cudnn'
  assert by_name['silent']['reason'] == 'exited 0 but wrote no figures'
  assert by_name['hang']['status'] == 'failed' and by_name['hang']['reason'] == 'timed out after 1 s'
  assert by_name['hang']['seconds'] < 30
  assert by_name['after']['status'] == 'ok'  # a failed row does not stop the suite
  assert (tmp_path / 'crash.log').read_text().startswith('$ timeout 30s env')


def test_rows_left_without_time_are_skipped(tmp_path):
  rows = [_row(tmp_path, 'a', 'pass'), _row(tmp_path, 'b', 'pass')]
  results = gpu_suite.run_suite(rows, str(tmp_path), budget_s=5, echo=lambda *a, **k: None, min_row_s=10)
  assert [r['status'] for r in results] == ['skipped', 'skipped']
  assert "budget was spent" in results[0]['reason']
  assert not (tmp_path / 'a.log').exists()


def test_table_has_machine_and_date_and_marks_failed_rows():
  meta = dict(date='2026-11-28 12:00 UTC', machine='NVIDIA H200, 143771 MiB, 580.159.04; 16 CPU cores',
              software='jax 0.10.2', commit='abc1234', command='bash benchmarks/gpu_suite.sh', workdir='/tmp/wd')
  speedup = {'benchmark': 'speedup', 'model': 'mae_vit_large_patch16', 'batch_per_device': 64,
             'dtype': 'bfloat16', 'attention_impl': 'cudnn', 'scan_layers': True, 'baseline_step_ms': 300.0,
             'rows': [dict(decoder_depth=8, mae_step_ms=100.0, speedup=3.0, flop_ratio=3.23, paper=2.8)]}
  vs_pytorch = {'benchmark': 'vs_pytorch', 'model': 'mae_vit_base_patch16', 'batch': 64, 'dtype': 'bfloat16',
                'attention_impl': 'cudnn', 'stats': {'mae_jax': {'median_ms': 40.0},
                                                     'torch_eager': {'median_ms': 60.0}},
                'errors': {'torch_compile': 'BackendCompilerFailed: a|b'}, 'faster_torch': 'torch_eager',
                'ratio': 1.5}
  results = [
      dict(name='vs_pytorch', group='vs_pytorch', label='mae_jax vs PyTorch', status='ok', data=vs_pytorch),
      dict(name='train_B', group='train', label='train step ViT-B/16', status='ok', data=TRAIN_JSON),
      dict(name='train_H', group='train', label='train step ViT-H/14', status='failed',
           reason='timed out after 180 s', data=None),
      dict(name='speedup', group='speedup', label='MAE vs mask tokens', status='ok', data=speedup),
      dict(name='train_L', group='train', label='train step ViT-L/16', status='skipped',
           reason="the suite's 480 s budget was spent", data=None),
  ]
  text = gpu_suite.render(meta, results)
  lines = text.splitlines()
  assert lines[0] == '# GPU benchmark suite, 2026-11-28 12:00 UTC'
  assert '- machine: NVIDIA H200, 143771 MiB, 580.159.04; 16 CPU cores' in lines
  table = [line for line in lines if line.startswith('| ')]
  assert table[0] == gpu_suite.TABLE_HEADER.splitlines()[0]
  body = table[1:]
  assert all(line.count('|') == 9 for line in body), body  # 8 cells in every row, pipes in messages escaped
  assert [line.split('|')[1].strip().split(' (')[0] for line in body] == [
      'train step ViT-B/16', 'train step ViT-H/14', 'train step ViT-L/16', 'MAE vs mask tokens',
      'mae_jax vs PyTorch']  # grouped: train rows first
  assert body[0] == ('| train step ViT-B/16 (mae_vit_base_patch16) | batch/device 256, bfloat16, attention cudnn '
                     '| 80.0 | 3200.0 | 188 | 19.0% | compile 31 s, 40.2 GiB/device | ok |')
  assert body[1].endswith('| **failed**: timed out after 180 s |')
  assert body[2].endswith("| **skipped**: the suite's 480 s budget was spent |")
  assert 'speedup 3.00x over 300.0 ms (FLOP ratio 3.23x, paper 2.8x)' in body[3] and 'scan' in body[3]
  assert 'torch_eager 60.0 ms, torch_compile failed (BackendCompilerFailed: a/b); torch_eager / mae_jax = 1.50x' \
      in body[4]
  assert '| 40.0 | 1600.0 |' in body[4]
  assert lines[-1] == '3 of 5 benchmarks ok; not ok: train_H, train_L (logs in /tmp/wd).'


def test_a_cudnn_that_fails_the_preflight_sends_every_row_to_xla_attention(tmp_path):
  error = gpu_suite.cudnn_preflight(sys.executable)  # No cuDNN on this CPU host: the preflight fails.
  assert error and '\n' not in error, error
  rows = gpu_suite.plan(str(tmp_path))
  gpu_suite.use_xla_attention(rows)
  assert all('--attention_impl=xla' in row.argv and '--attention_impl=cudnn' not in row.argv for row in rows)
  meta = dict(date='d', machine='m', software='s', commit='c', command='x', workdir='w', note=f'cuDNN: {error}')
  assert f'- note: cuDNN: {error}' in gpu_suite.render(meta, [])


def test_last_error_line_prefers_the_exception():
  log = 'compiling\nTraceback (most recent call last):\n  File "x"\nRuntimeError: cuDNN failed\nbye\n'
  assert gpu_suite.last_error_line(log) == 'RuntimeError: cuDNN failed'
  assert gpu_suite.last_error_line('a\nb\n') == 'b'
  assert gpu_suite.last_error_line('') == 'no output'


@pytest.mark.parametrize('model', ['tiny', 'b16'])
def test_pytorch_model_of_bench_vs_pytorch_has_mae_jax_trainable_parameters(model):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  name = bench_vs_pytorch.MODELS[model]
  config = bench_vs_pytorch.hf_config(name, 0.75)
  assert config._attn_implementation == 'sdpa' and config.norm_pix_loss  # pylint: disable=protected-access
  with torch.device('meta'):
    hf = transformers.ViTMAEForPreTraining(config)
  torch_count = sum(p.numel() for p in hf.parameters() if p.requires_grad)
  mae = models.get_model(name, image_size=224, in_channels=3)
  shapes = jax.eval_shape(lambda: mae.init({'params': jax.random.key(0), 'mask': jax.random.key(1)},
                                           jax.numpy.zeros((1, 224, 224, 3)), train=False))
  assert torch_count == sum(x.size for x in jax.tree.leaves(shapes['params']))
  if model == 'b16':
    assert torch_count == 111_655_680  # REFERENCE.md


def run_bench_vs_pytorch(*args):
  """bench_vs_pytorch.py with the tiny model at batch 2, no torch.compile, as run on a CPU host (one device)."""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  env.pop('XLA_FLAGS', None)
  for key in bench_vs_pytorch.MALLOC_ENV:  # what the benchmark gives its workers, not inherited
    env.pop(key, None)
  return subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'bench_vs_pytorch.py'), '--model=tiny', '--batch=2',
       '--skip_compile', *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def test_bench_vs_pytorch_runs_both_sides_on_the_cpu(tmp_path):
  """The side-by-side benchmark end to end with the tiny model: both steps run, warm-up and medians recorded."""
  pytest.importorskip('transformers')
  out = tmp_path / 'vs.json'
  result = run_bench_vs_pytorch('--rounds=2', '--warmup=2', '--threads=1', f'--json_out={out}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'ratio: torch_eager / mae_jax = ' in result.stdout
  report = json.loads(out.read_text())
  assert set(report['stats']) == {'mae_jax', 'torch_eager'} and not report['errors']
  assert report['params']['mae_jax'] == report['params']['torch']
  for name in ('mae_jax', 'torch_eager'):
    assert len(report['stats'][name]['times_ms']) == 2 and len(report['warmup_ms'][name]) == 1
    assert report['stats'][name]['median_ms'] > 0
  assert report['ratio'] == pytest.approx(report['stats']['torch_eager']['median_ms']
                                          / report['stats']['mae_jax']['median_ms'])
  # Each side ran in a worker process of its own, with the glibc settings of README's CPU runs.
  assert report['isolated'] and len(set(report['pids'].values())) == 2
  assert report['worker_env'] == bench_vs_pytorch.MALLOC_ENV
  assert report['workers_malloc_env'] == {name: bench_vs_pytorch.MALLOC_ENV for name in ('mae_jax', 'torch_eager')}


def test_bench_vs_pytorch_reports_a_worker_that_fails():
  """A side that cannot be built is reported with its error; without mae_jax there is nothing to compare."""
  pytest.importorskip('transformers')
  result = run_bench_vs_pytorch('--rounds=1', '--warmup=1', '--skip_eager', '--attention_impl=cudnn')
  assert result.returncode == 1
  assert "mae_jax failed, left out: ConfigError: model.attention_impl='cudnn' needs a GPU backend" in result.stdout
  assert "mae_jax failed: ConfigError: model.attention_impl='cudnn'" in result.stderr
