"""AOT compile for TPU slices on a CPU host (libtpu compile-only devices).

The batch search runs everywhere (topology names: test_accelerators.py); the compiles need libtpu
(`pip install "jax[tpu]"`) and are skipped with the reason where it is missing.
"""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import default, mae_pretrain
from configs import finetune as finetune_recipe
from configs import test as test_config
from mae_jax import aot, finetune, flops, loop, pretrain_step, train, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_find_batch_doubles_then_bisects(monkeypatch):
  tried = []

  def fake_compile(config, spec, devices):
    per_chip = config.batch_size // len(devices)
    tried.append(per_chip)
    report = aot.AotReport(
        topology=spec.name, topology_name=spec.topology_name, num_slices=1, num_devices=len(devices),
        device_kind='TPU v5 lite', mesh_shape={}, model='m', global_batch=config.batch_size,
        per_chip_batch=per_chip, grad_accum_steps=1, dtype='float32', remat_policy='none',
        scan_layers=False, fits=per_chip <= 37, hbm_capacity_bytes=16, hbm_nominal_bytes=16,
        compile_seconds=0.0)
    return report

  monkeypatch.setattr(aot, 'compile_report', fake_compile)
  config = default.get_config()
  spec = aot.parse_topology('v5e:2x2')
  best, report = aot.find_batch(config, spec, devices=[0] * 4, log=lambda _: None)
  assert best == 37 and report.per_chip_batch == 37
  assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]
  assert len(tried) == 7 + 5  # bisection between 32 and 64
  # Every candidate fits up to the limit: the limit itself is tried too (1, 2, 4, then 5).
  tried.clear()
  assert aot.find_batch(config, spec, devices=[0] * 4, limit=5, log=lambda _: None)[0] == 5 and tried == [1, 2, 4, 5]
  # With gradient accumulation only multiples of it: each micro-batch holds whole images per chip.
  config.grad_accum_steps = 4
  tried.clear()
  best, report = aot.find_batch(config, spec, devices=[0] * 4, log=lambda _: None)
  assert best == 36 and all(t % 4 == 0 for t in tried) and tried[:5] == [4, 8, 16, 32, 64]
  assert aot.with_per_chip_batch(config, 8, 4).grad_accum_steps == 4
  with pytest.raises(ValueError, match='--per_chip_batch=6 with grad_accum_steps=4: each micro-batch would hold 1.5'):
    aot.with_per_chip_batch(config, 6, 4)  # Not dropped without a word.


def test_compile_report_says_what_it_compiles_before_it_starts():
  """A compile takes minutes for a large model: a line names it first (here on 8 CPU devices, stopped there)."""

  class Started(Exception):
    pass

  lines = []

  def log(line):
    lines.append(line)
    raise Started  # The line came before the compile: nothing is compiled.

  config = _tiny_config()
  with pytest.raises(Started):
    aot.compile_report(config, aot.parse_topology('v5e:2x4'), jax.devices()[:8], log=log,
                       label='configs/x.py:variant=B/16')
  assert lines == ['Compiling configs/x.py:variant=B/16 for v5e:2x4 (per-chip batch 2, global 16)...']


@pytest.mark.parametrize('args,line', [
    (['--config=configs/test.py'], 'error: --topology is required'),
    (['--topology=v5e-8'], 'error: --config is required'),
    (['--config=configs/test.py', '--topology=v5e-8', 'extra'],
     "error: unexpected arguments ['extra'] (flags are --name=value)"),
], ids=('topology', 'config', 'extra'))
def test_usage_errors_are_one_line(args, line):
  """Not the whole --help: one line naming the flag, exit status 2 (as mae_jax.main's), before any compile."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-m', 'mae_jax.aot', *args], check=False, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and result.stderr.strip().splitlines()[-1:] == [line], result.stderr[-2000:]
  assert len(result.stderr.strip().splitlines()) <= 3, result.stderr  # (libtpu may warn where it is installed)


def test_parse_resource_exhausted():
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO '
             'temporaries (70.00G) exceeds available HBM (15.75G).')
  assert aot._parse_exhausted(message) == (70 * 2**30, int(15.75 * 2**30))
  assert aot._parse_exhausted('something else') == (None, None)


# ----------------------------------------------------------------------------
# Real compiles for compile-only TPU devices.

@pytest.fixture(scope='module')
def libtpu():
  ok, why = aot.tpu_available()
  if not ok:
    pytest.skip(f'no libtpu compile-only devices: {why}')


def _tiny_config(image_size=32, batch_size=16):
  config = default.get_config()
  config.model.name = 'mae_vit_test'
  config.dataset.image_size = image_size
  config.dataset.channels = 3
  config.batch_size = batch_size
  return config


def test_compile_tiny_on_v5e(libtpu):
  spec = aot.parse_topology('v5e:2x2')
  config = _tiny_config()
  config.mesh.fsdp = 2
  config.mesh.min_fsdp_size = 1
  devices = aot.topology_devices(spec)
  lines = []
  report = aot.compile_report(config, spec, devices, log=lines.append)
  assert report.fits, aot.format_report(report)
  assert lines == ['Compiling mae_vit_test for v5e:2x2 (per-chip batch 4, global 16)...']
  assert report.num_devices == 4 and report.device_kind == 'TPU v5 lite'
  assert report.mesh_shape == {'data': 2, 'fsdp': 2, 'tensor': 1}
  assert report.per_chip_batch == 4
  assert report.hbm_capacity_bytes == flops.TPU_CHIPS['v5e'].hbm_usable_bytes
  assert report.argument_bytes > 0 and report.temp_bytes > 0
  assert 0 < report.total_bytes < report.hbm_capacity_bytes
  assert report.alias_bytes > 0  # the state is donated
  # Analytic matmul FLOPs per chip are most of what XLA counts (it adds elementwise work).
  analytic_per_chip = report.flops_per_step_analytic / report.num_devices
  assert not report.has_loops
  assert 0.3 < analytic_per_chip / report.flops_per_device_compiled <= 1.05
  assert report.step_seconds and report.images_per_sec and 0 < report.mfu < 1
  # The shard-size estimate used when the compiler refuses a step is a lower bound: TPU
  # layouts pad small arrays to (8, 128) tiles, which dominates for this tiny model.
  step = aot.make_train_step(config, aot.parallel.create_mesh(config.mesh, devices))
  assert 0 < aot._argument_bytes_per_device(step) <= report.argument_bytes
  text = aot.format_report(report)
  for field in ('HBM per chip', 'HBM total', 'FLOPs per step', 'HBM traffic', 'FLOP/byte', 'step time', 'fits:'):
    assert field in text


def test_compile_megacore_v4_and_two_slices(libtpu):
  config = _tiny_config(batch_size=32)
  config.grad_accum_steps = 2
  config.model.scan_layers = True
  report = aot.compile_report(config, aot.parse_topology('v4-8', num_slices=2))
  assert report.fits and report.device_kind == 'TPU v4'
  assert report.num_devices == 8  # 2 slices x 4 chips, one megacore device per chip
  assert report.mesh_shape['data'] == 8
  assert report.has_loops  # scan over layers and over micro-batches


def test_does_not_fit_fails_with_clear_message(libtpu):
  # A tiny model at 224 px (785 tokens of width 32) with 4096 images per chip: tens of GiB
  # of activations, which v5e's 16 GiB cannot hold. Compiles in seconds.
  cmd = [sys.executable, '-m', 'mae_jax.aot', '--config=configs/default.py', '--topology=v5e-4',
         '--config.model.name=mae_vit_test', '--config.dataset.image_size=224',
         '--config.dataset.channels=3', '--per_chip_batch=4096']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'does not fit:' in result.stderr and 'GiB > 15.75 GiB per chip' in result.stderr, result.stderr[-2000:]
  assert 'try --config.model.remat_policy=full' in result.stderr
  assert 'global 16384 = 4096 per chip' in result.stdout
  assert 'RESOURCE_EXHAUSTED' in result.stdout  # the compiler's own words are shown too


def test_indivisible_batch_names_the_fix(libtpu):
  cmd = [sys.executable, '-m', 'mae_jax.aot', '--config=configs/test.py', '--topology=v4-128']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'not divisible by the data-parallel size 64' in result.stderr, result.stderr[-2000:]
  assert '--per_chip_batch=N (batch_size = N x 64)' in result.stderr


def test_aot_compiles_the_step_the_trainer_runs(tmp_path, monkeypatch):
  """aot's step and the trainer's are one function of the same state and batch structures.

  The trainer's own TrainStep and the batches it feeds are captured during a
  real run; aot.make_train_step for the same config and mesh must lower to the
  same program (the schedule is fixed by num_train_steps and warmup_steps, so
  aot's nominal data set size changes nothing) and take the batch the loop
  feeds, 'corrupt' flags included.
  """
  config = test_config.get_config('steps=1')
  built, fed = [], []
  build, prefetch = pretrain_step.build_train_step, loop.prefetch_to_mesh
  monkeypatch.setattr(pretrain_step, 'build_train_step', lambda *a, **k: built.append(build(*a, **k)) or built[-1])

  def recording_prefetch(*args, **kwargs):
    for batch in prefetch(*args, **kwargs):
      fed.append(batch)
      yield batch

  monkeypatch.setattr(loop, 'prefetch_to_mesh', recording_prefetch)
  assert train.train_and_evaluate(config, str(tmp_path))['status'] == 'done'
  ran = built[0]
  compiled = aot.make_train_step(config, ran.mesh)

  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)
  assert set(ran.abstract_batch) == set(pretrain_step.BATCH_KEYS) == set(compiled.abstract_batch)
  assert shapes(fed[0]) == shapes(ran.abstract_batch) == shapes(compiled.abstract_batch)
  assert jax.tree.structure(ran.abstract_state) == jax.tree.structure(compiled.abstract_state)
  assert shapes(ran.abstract_state) == shapes(compiled.abstract_state)
  assert jax.tree.leaves(ran.state_shardings) == jax.tree.leaves(compiled.state_shardings)
  with train_state.mesh_context(ran.mesh):
    texts = [step.jitted.lower(step.abstract_state, step.abstract_batch).as_text() for step in (ran, compiled)]
  assert texts[0] == texts[1]


def test_report_matches_benchmarks_md(libtpu):
  """The B/16 recipe on v5e-4 (BENCHMARKS.md, 'A small slice that the test suite compiles') reports its row."""
  with open(os.path.join(REPO, 'BENCHMARKS.md'), encoding='utf-8') as f:
    row = next(line for line in f if line.startswith('| B/16 | v5e-4 (2x2) |'))
  cells = [cell.strip() for cell in row.strip().strip('|').split('|')]
  spec = aot.parse_topology('v5e-4')
  devices = aot.topology_devices(spec)
  config = aot.with_per_chip_batch(mae_pretrain.get_config('variant=B/16'), int(cells[3]), len(devices))
  report = aot.compile_report(config, spec, devices)
  gib = lambda num_bytes: f'{num_bytes / flops.GiB:.2f} GiB'
  assert report.fits and report.mesh_shape == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert gib(report.argument_bytes) == cells[5]
  assert gib(report.temp_bytes) == cells[6]
  assert f'{gib(report.total_bytes)[:-4]} / {gib(report.hbm_capacity_bytes)}' == cells[7]
  assert f'{report.bytes_accessed_per_device / 1e9:.1f} GB' == cells[8]
  assert f'{report.flops_per_device_compiled / 1e12:.3f} TFLOP' == cells[9]
  assert f'{report.step_seconds * 1e3:.1f} ms, MFU {100 * report.mfu:.1f}%' == cells[10]


# ----------------------------------------------------------------------------
# Fine-tuning configs (config.downstream='finetune').

def test_finetune_flops_are_three_forwards_over_every_token():
  config = finetune_recipe.get_config('variant=H/14@448')
  # 32 blocks on 1 + 32 x 32 tokens of width 1280, the patch embedding and a 1000-class head.
  tokens, width = 1 + 32 * 32, 1280
  macs = 32 * 32 * 14 * 14 * 3 * width + 32 * (12 * tokens * width**2 + 2 * tokens**2 * width) + width * 1000
  assert aot.train_flops_per_image(config) == pytest.approx(3 * 2 * macs)
  assert f'{aot.train_flops_per_image(config) * 1024 / 1e12:.1f}' == '4495.6'  # BENCHMARKS.md's row
  config.downstream = 'linprobe'
  with pytest.raises(ValueError, match="downstream='linprobe'.*fine-tuning configs"):
    aot.train_flops_per_image(config)


def test_aot_compiles_the_step_the_finetune_trainer_runs(tmp_path, monkeypatch):
  """The fine-tuning trainer jits finetune.build_train_step's step_fn as aot compiles it.

  A real one-step fine-tuning run records its FinetuneStep, the jit that
  supervised.run applies to its step_fn and the batches the loop feeds;
  aot.make_train_step for the same config and mesh lowers to the same program
  and takes the fed batch ('corrupt' flags added for sources without them).
  """
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  config.num_train_steps = 1
  config.eval_batch_size = 8
  built, fed, jits = [], [], []
  build, prefetch, jit = finetune.build_train_step, loop.prefetch_to_mesh, jax.jit
  monkeypatch.setattr(finetune, 'build_train_step', lambda *a, **k: built.append(build(*a, **k)) or built[-1])

  def recording_prefetch(*args, **kwargs):
    for batch in prefetch(*args, **kwargs):
      fed.append(batch)
      yield batch

  def recording_jit(fun, *args, **kwargs):
    jitted = jit(fun, *args, **kwargs)
    if built and fun is built[0].step_fn:
      jits.append(jitted)
    return jitted

  monkeypatch.setattr(loop, 'prefetch_to_mesh', recording_prefetch)
  monkeypatch.setattr(jax, 'jit', recording_jit)
  assert finetune.finetune(config, str(tmp_path))['status'] == 'done'
  monkeypatch.undo()
  ran, (trainer_jit,) = built[0], jits
  compiled = aot.make_train_step(config, ran.mesh)
  assert isinstance(compiled, finetune.FinetuneStep) and isinstance(compiled, pretrain_step.TrainStep)

  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, str(x.dtype)), tree)
  assert set(fed[0]) == set(finetune.BATCH_KEYS) == set(compiled.abstract_batch)
  assert shapes(fed[0]) == shapes(ran.abstract_batch) == shapes(compiled.abstract_batch)
  assert shapes(ran.abstract_state) == shapes(compiled.abstract_state)
  assert jax.tree.leaves(ran.state_shardings) == jax.tree.leaves(compiled.state_shardings)
  with train_state.mesh_context(ran.mesh):
    trainer_text = trainer_jit.lower(ran.abstract_state, ran.abstract_batch, None).as_text()
    aot_text = compiled.jitted.lower(compiled.abstract_state, compiled.abstract_batch).as_text()
  assert trainer_text == aot_text


def test_finetune_config_compiles_on_v5e_from_the_command_line(libtpu, tmp_path):
  """`python -m mae_jax.aot` takes configs/finetune.py: memory, FLOPs and a step time despite mixup's loops."""
  out = tmp_path / 'report.json'
  cmd = [sys.executable, '-m', 'mae_jax.aot', '--config=configs/finetune.py:variant=B/16,runlocal=True',
         '--topology=v5e-4', '--per_chip_batch=4', '--config.mesh.fsdp=2', '--config.mesh.min_fsdp_size=1',
         f'--json_out={out}']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert ('Compiling configs/finetune.py:variant=B/16,runlocal=True for v5e-4 (per-chip batch 4, global 16)...'
          in result.stderr.splitlines()), result.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report['model'] == 'mae_vit_test' and report['fits']
  assert report['mesh_shape'] == {'data': 2, 'fsdp': 2, 'tensor': 1} and report['global_batch'] == 16
  assert report['argument_bytes'] > 0 and report['temp_bytes'] > 0 and report['alias_bytes'] > 0
  assert 0 < report['total_bytes'] < report['hbm_capacity_bytes']
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  assert report['flops_per_step_analytic'] == pytest.approx(
      flops.classifier_train_flops(aot.from_config.encoder_kwargs(config), config.num_classes) * 16)
  assert 0.3 < report['flops_per_step_analytic'] / 4 / report['flops_per_device_compiled'] <= 1.05
  # mixup's beta draws are while loops without matmuls: the roofline is computed all the same.
  assert report['minor_loops'] > 0 and not report['has_loops']
  assert report['roofline_step_seconds'] > 0 and report['step_seconds'] > 0 and 0 < report['mfu'] < 1
  for field in ('HBM per chip', 'HBM total', 'FLOPs per step', 'without matmuls', 'step time', 'fits:'):
    assert field in result.stdout, result.stdout


def test_loops_with_and_without_matmuls_are_told_apart():
  hlo = """HloModule m

%fused (p: f32[2,2]) -> f32[2,2] {
  %p = f32[2,2]{1,0} parameter(0)
  ROOT %d = f32[2,2]{1,0} convolution(%p, %p), dim_labels=bf_io->bf
}

%heavy_body (t: (s32[], f32[2,2])) -> (s32[], f32[2,2]) {
  %f = f32[2,2]{1,0} fusion(%x), kind=kOutput, calls=%fused
}

%light_body (t: (s32[], f32[])) -> (s32[], f32[]) {
  %a = f32[] add(%x, %y)
}

%cond (t: (s32[], f32[])) -> pred[] {
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[2,2]) -> f32[2,2] {
  %w1 = (s32[], f32[2,2]) while(%t1), condition=%cond, body=%heavy_body
  %w2 = (s32[], f32[]) while(%t2), condition=%cond, body=%light_body
  %w3 = (s32[], f32[]) while(%t3), condition=%cond, body=%light_body
}
"""
  assert aot.classify_loops(hlo) == (1, 2)
  assert aot.classify_loops('') == (0, 0)
