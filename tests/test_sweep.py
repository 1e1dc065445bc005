"""Tests for launch/sweep.py and configs/sweeps/: expansion, checks, local runs, resume, TPU mode."""

import csv
import glob
import io
import json
import os
import re
import signal

import pytest

from configs import common as config_common
from launch import common, sweep_summary
from launch import sweep as sweep_lib
from mae_jax import metrics

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = 'configs/sweeps/tiny_demo_sweep.py'
TINY_RUNS = ['mask0.5_dec1', 'mask0.5_dec2', 'mask0.75_dec1', 'mask0.75_dec2']


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.getbasetemp() / 'jit_cache')


def run_sweep(*argv, runner=None):
  """Runs the CLI; returns (exit status, printed text)."""
  out = io.StringIO()
  status = sweep_lib.main(list(argv), runner=runner, out=out)
  return status, out.getvalue()


def metric_steps(workdir):
  return [r['step'] for r in metrics.read_metrics(workdir)]


def metric_files(workdir):
  """Each metrics part file with its modification time."""
  folder = os.path.join(workdir, 'metrics')
  return {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in sorted(os.listdir(folder))}


# ----------------------------------------------------------------------------
# Expansion and checks.

def test_grid_names_and_overrides():
  runs = config_common.grid({'mask_ratio': [0.5, 0.75], 'model.decoder_depth': [1, 8], 'optim.name': ['adamw']},
                            {'mask_ratio': 'mask', 'model.decoder_depth': 'dec'})
  assert [r['name'] for r in runs] == ['mask0.5_dec1_nameadamw', 'mask0.5_dec8_nameadamw',
                                       'mask0.75_dec1_nameadamw', 'mask0.75_dec8_nameadamw']
  assert runs[1]['overrides'] == {'mask_ratio': 0.5, 'model.decoder_depth': 8, 'optim.name': 'adamw'}
  config_common.check_sweep({'base': 'configs/test.py', 'runs': runs})
  with pytest.raises(ValueError, match='appears twice'):
    config_common.check_sweep({'base': 'configs/test.py', 'runs': runs + runs[:1]})
  with pytest.raises(ValueError, match="name='a b'"):
    config_common.check_sweep({'base': 'configs/test.py', 'runs': [{'name': 'a b', 'overrides': {}}]})
  with pytest.raises(ValueError, match='no values'):
    config_common.grid({'mask_ratio': []})


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(REPO_ROOT, 'configs', 'sweeps', '[!_]*.py'))),
                         ids=os.path.basename)
def test_every_sweep_file_loads(path, tmp_path):
  sweep = sweep_lib.load_sweep(os.path.relpath(path, REPO_ROOT), str(tmp_path))
  assert sweep.runs and all(r.workdir == os.path.join(str(tmp_path), r.name) for r in sweep.runs)
  for run in sweep.runs[:3]:
    sweep_lib.run_config(sweep, run)


def test_ablation_sweep_is_the_paper_grid(tmp_path):
  sweep = sweep_lib.load_sweep('configs/sweeps/mask_ratio_x_decoder_depth.py', str(tmp_path))
  assert sweep.base == 'configs/mae_pretrain.py:variant=L/16,epochs=800'
  assert len(sweep.runs) == 30 and 'mask0.75_dec8' in [r.name for r in sweep.runs]
  assert {r.overrides['model.decoder_depth'] for r in sweep.runs} == {1, 2, 4, 8, 12}
  config = sweep_lib.run_config(sweep, next(r for r in sweep.runs if r.name == 'mask0.9_dec1'))
  assert (config.mask_ratio, config.model.decoder_depth, config.batch_size) == (0.9, 1, 4096)
  small = sweep_lib.load_sweep('configs/sweeps/mask_ratio_x_decoder_depth.py:runlocal=True', str(tmp_path))
  assert sweep_lib.run_config(small, small.runs[0]).model.name == config_common.RUNLOCAL_MODEL


def test_unknown_override_key_fails_before_running(tmp_path):
  sweep_file = tmp_path / 'typo_sweep.py'
  sweep_file.write_text("def get_sweep(arg=None):\n"
                        "  return {'base': 'configs/test.py', 'runs': [\n"
                        "      {'name': 'a', 'overrides': {'mask_ratio': 0.5}},\n"
                        "      {'name': 'b', 'overrides': {'model.decoder_dpth': 2}}]}\n")
  with pytest.raises(ValueError, match=r"run 'b'.*'model.decoder_dpth'; close matches: model.decoder_depth"):
    sweep_lib.load_sweep(str(sweep_file), str(tmp_path / 'root'))
  with pytest.raises(SystemExit):
    run_sweep(f'--sweep={sweep_file}', f'--root={tmp_path / "root"}')
  assert not (tmp_path / 'root').exists()
  with pytest.raises(SystemExit):
    run_sweep(f'--sweep={TINY}', f'--root={tmp_path / "root"}', '--only=mask0.5_dec3')


# ----------------------------------------------------------------------------
# Local mode.

def test_local_dry_run_prints_commands_and_runs_nothing(tmp_path):
  root = tmp_path / 'root'
  status, text = run_sweep(f'--sweep={TINY}', f'--root={root}', '--dry_run', '--', '--config.seed=3')
  assert status == 0 and not root.exists()
  commands = [line for line in text.splitlines() if ' -m mae_jax.main ' in line]
  assert len(commands) == 4
  assert f'--workdir={root}/mask0.75_dec2' in commands[3]
  assert '--config.mask_ratio=0.75 --config.model.decoder_depth=2 --config.seed=3' in commands[3]
  assert '| mask0.5_dec1 | 0.5 | 1 | pending |' in text
  status, text = run_sweep(f'--sweep={TINY}', f'--root={root}', '--dry_run', '--only=mask0.75_dec1')
  assert status == 0 and len([line for line in text.splitlines() if ' -m mae_jax.main ' in line]) == 1
  assert all(f'| {name} |' in text for name in TINY_RUNS)  # The summary still lists every run.


def test_local_sweep_runs_resumes_and_summarises(tmp_path, monkeypatch, cache_dir):
  """4 tiny runs in-process: SIGTERM in the third stops the sweep; a rerun skips and resumes."""
  from mae_jax.data import inputs  # pylint: disable=g-import-not-at-top
  root = str(tmp_path / 'root')
  create_iterator = inputs.create_pretrain_iterator
  calls = []

  def preempting_iterator(config, start_step):
    """The third run is preempted: SIGTERM arrives while its first batches are read."""
    calls.append((config.mask_ratio, config.model.decoder_depth, start_step))
    iterator = create_iterator(config, start_step)
    if len(calls) != 3:
      yield from iterator
      return
    yield next(iterator)
    signal.raise_signal(signal.SIGTERM)  # The trainer's handler: save and stop after this step.
    yield from iterator

  monkeypatch.setattr(inputs, 'create_pretrain_iterator', preempting_iterator)
  args = [f'--sweep={TINY}', f'--root={root}', '--local_runner=inprocess', f'--compilation_cache_dir={cache_dir}']
  status, text = run_sweep(*args)
  assert status == sweep_lib.EXIT_INTERRUPTED, text
  workdirs = {name: os.path.join(root, name) for name in TINY_RUNS}
  assert [os.path.exists(os.path.join(workdirs[n], 'DONE')) for n in TINY_RUNS] == [True, True, False, False]
  assert not os.path.exists(workdirs['mask0.75_dec2'])  # The sweep stopped at the interruption.
  assert metric_steps(workdirs['mask0.75_dec1']) == [1]
  assert '| mask0.75_dec1 | 0.75 | 1 | interrupted | 1 |' in text
  finished = {n: (metric_files(workdirs[n]), metric_steps(workdirs[n])) for n in TINY_RUNS[:2]}

  status, text = run_sweep(*args)
  assert status == 0, text
  assert '# mask0.5_dec1: done, skipped' in text and '# mask0.5_dec2: done, skipped' in text
  assert '# mask0.75_dec1: resuming' in text
  # Finished runs were not touched; the interrupted one went on from its checkpoint.
  for name, before in finished.items():
    assert (metric_files(workdirs[name]), metric_steps(workdirs[name])) == before == (before[0], [1, 2, 3])
  assert metric_steps(workdirs['mask0.75_dec1']) == [1, 2, 3]
  assert calls[3] == (0.75, 1, 1)  # Resumed at step 1, not restarted.
  assert all(os.path.exists(os.path.join(w, 'DONE')) for w in workdirs.values())

  # The summary: printed, and written as markdown and CSV.
  for name in TINY_RUNS:
    assert re.search(rf'^\| {re.escape(name)} \| [^\n]*\| done \| 3 \| \d', text, re.MULTILINE), name
  with open(os.path.join(root, 'summary.md'), encoding='utf-8') as f:
    markdown = f.read()
  assert '| run | mask_ratio | model.decoder_depth | status | step | train/loss |' in markdown
  with open(os.path.join(root, 'summary.csv'), encoding='utf-8') as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == TINY_RUNS and all(r['status'] == 'done' for r in rows)
  assert all(float(r['train/loss']) > 0 for r in rows)
  with open(os.path.join(root, 'sweep.json'), encoding='utf-8') as f:
    assert [r['name'] for r in json.load(f)['runs']] == TINY_RUNS

  # A third invocation has nothing left to do.
  status, text = run_sweep(*args)
  assert status == 0 and text.count('done, skipped') == 4


def test_local_subprocess_run_and_max_runs(tmp_path, cache_dir):
  """The default runner: `python -m mae_jax.main` per run; --max_runs leaves the rest."""
  root = str(tmp_path / 'root')
  status, text = run_sweep(f'--sweep={TINY}', f'--root={root}', '--max_runs=1',
                           f'--compilation_cache_dir={cache_dir}', '--metrics=train/loss')
  assert status == 0, text
  assert '# stopping after --max_runs=1' in text
  assert os.path.exists(os.path.join(root, 'mask0.5_dec1', 'DONE'))
  assert metric_steps(os.path.join(root, 'mask0.5_dec1')) == [1, 2, 3]
  assert not os.path.exists(os.path.join(root, 'mask0.5_dec2'))
  assert '| mask0.5_dec2 | 0.5 | 2 | pending |' in text


def test_the_trainers_exit_status_decides_the_runs_status(tmp_path):
  """Exit 0 is done (a kNN run has no steps; flags after `--` may change the steps), 75 is preempted."""
  sweep = sweep_lib.load_sweep(f'{TINY}:steps=3', str(tmp_path))

  class ExitingRunner(sweep_lib.TrainerRunner):
    def __init__(self, code, interrupted=False):
      super().__init__(out=io.StringIO())
      self.code, self.interrupt = code, interrupted

    def _call(self, command):
      self.interrupted = self.interrupt  # SIGTERM forwarded to the trainer, which exits 0 after saving
      return self.code

  for code, interrupted, want in ((0, True, 'interrupted'), (75, False, 'preempted'), (1, False, 'failed'),
                                  (0, False, 'done')):
    statuses = sweep_lib.run_local(sweep, runner=ExitingRunner(code, interrupted), max_runs=1)
    assert statuses == {sweep.runs[0].name: want}
    assert os.path.exists(os.path.join(sweep.runs[0].workdir, 'DONE')) == (want == 'done')
  with open(os.path.join(sweep.runs[0].workdir, 'DONE'), encoding='utf-8') as f:
    record = json.load(f)
  assert (record['base'], record['overrides'], record['trainer_args']) == (
      'configs/test.py:steps=3', ['mask_ratio=0.5', 'model.decoder_depth=1'], [])


def _one_finished_run(tmp_path):
  """(root, the tiny sweep at steps=1, its first run marked done with those settings)."""
  root = tmp_path / 'root'
  sweep = sweep_lib.load_sweep(f'{TINY}:steps=1', str(root))
  run = sweep.runs[0]
  os.makedirs(run.workdir)
  sweep_lib.mark_done(run, {'step': 1}, sweep_lib.run_settings(sweep, run))
  return root, sweep, run


def test_a_finished_run_with_other_settings_stops_the_sweep_before_anything_runs(tmp_path):
  """Skipping it would report its old results as the new settings' (a changed base, other flags after `--`)."""
  root, sweep, run = _one_finished_run(tmp_path)
  status, text = run_sweep(f'--sweep={TINY}:steps=1', f'--root={root}', '--dry_run')
  assert status == 0 and '# mask0.5_dec1: done, skipped' in text
  for argv, changed in (([f'--sweep={TINY}:steps=2'], 'base configs/test.py:steps=1 -> configs/test.py:steps=2'),
                        ([f'--sweep={TINY}:steps=1', '--', '--config.seed=1'],
                         "trainer_args [] -> ['--config.seed=1']")):
    with pytest.raises(SystemExit) as stopped:
      run_sweep(*argv, f'--root={root}', '--dry_run')
    assert stopped.value.code == 2
    with pytest.raises(ValueError, match=re.escape(f'{run.workdir} finished with other settings ({changed})')):
      sweep_lib.check_done_runs(sweep_lib.load_sweep(argv[0].split('=', 1)[1], str(root)), argv[2:])


def test_the_refusal_of_a_changed_finished_run_offers_ways_that_keep_its_results(tmp_path):
  """Another --root, the old settings, or removing only DONE: the sweep then resumes the run (more steps, say)."""
  root, sweep, run = _one_finished_run(tmp_path)
  longer = sweep_lib.load_sweep(f'{TINY}:steps=2', str(root))
  with pytest.raises(ValueError) as refused:
    sweep_lib.check_done_runs(longer, [])
  message = str(refused.value)
  assert 'use another --root' in message and 'put the old settings back' in message
  assert 'remove only its DONE file: the sweep then resumes it' in message
  os.remove(os.path.join(run.workdir, 'DONE'))  # What the message offers: the run goes on from its checkpoint.
  sweep_lib.check_done_runs(longer, [])
  status, text = run_sweep(f'--sweep={TINY}:steps=2', f'--root={root}', '--dry_run', '--only=mask0.5_dec1')
  assert status == 0 and f'# mask0.5_dec1: resuming in {run.workdir}' in text, text


@pytest.mark.parametrize('extra,match', [
    (['--config.mask_ratio=0.9'], '--config.mask_ratio=0.9 after `--`: the sweep sets mask_ratio per run'),
    (['--workdir=/tmp/one'], '--workdir=/tmp/one after `--`: the sweep sets --workdir for each run'),
    (['--config=configs/demo.py'], 'the sweep sets --config for each run'),
    (['--config.sed=1'], "unknown config key 'sed'; close matches: seed"),
    (['--config.seed=abc'], "--config.seed=abc after `--`: value='abc': expected an integer"),
    (['--config.seed', 'abc'], "--config.seed abc after `--`: value='abc': expected an integer"),
    (['--config.norm_pix_loss=maybe'], "--config.norm_pix_loss=maybe after `--`: value='maybe': expected a bool"),
])
def test_trainer_flags_after_the_separator_are_checked(extra, match):
  sweep = sweep_lib.load_sweep(TINY, '/tmp/unused')
  with pytest.raises(ValueError, match=re.escape(match)):
    sweep_lib.check_trainer_args(sweep, extra)


@pytest.mark.parametrize('overrides,match', [
    ({'batch_size': 16.0}, "batch_size=16.0 is a float, but the base config's batch_size is a int (16)"),
    ({'seed': '3'}, "seed='3' is a str"),
    ({'dataset.image_size': (32, 32)}, "dataset.image_size=(32, 32) is a tuple"),
    ({'dataset': {'name': 'x'}}, 'dataset is a group of settings: override its keys one by one'),
])
def test_overrides_the_trainers_command_line_cannot_carry_are_refused(tmp_path, overrides, match):
  sweep_file = tmp_path / 'typed_sweep.py'
  runs = [{'name': 'a', 'overrides': overrides}]
  sweep_file.write_text(f"def get_sweep(arg=None):\n  return {{'base': 'configs/test.py', 'runs': {runs!r}}}\n")
  with pytest.raises(ValueError, match=re.escape(match)):
    sweep_lib.load_sweep(str(sweep_file), str(tmp_path / 'root'))
  ok = tmp_path / 'ok_sweep.py'
  ok.write_text("def get_sweep(arg=None):\n  return {'base': 'configs/test.py', 'runs': [{'name': 'a', 'overrides': "
                "{'optim.base_lr': 1, 'dataset.crop_scale': [0.3, 1.0]}}]}\n")  # int for a float; list for a tuple.
  sweep_lib.load_sweep(str(ok), str(tmp_path / 'root'))


def test_a_trainer_flag_value_the_trainer_cannot_read_stops_a_local_sweep_before_any_run(tmp_path, capsys):
  runner = ExitingRunner([0] * 4)
  with pytest.raises(SystemExit) as stopped:
    run_sweep(f'--sweep={TINY}', f'--root={tmp_path / "root"}', '--', '--config.seed=abc', runner=runner)
  assert stopped.value.code == 2
  assert not runner.commands and not (tmp_path / 'root').exists()
  error = capsys.readouterr().err.strip().splitlines()[-1]
  assert error.endswith("error: --config.seed=abc after `--`: value='abc': expected an integer (the base config's "
                        'seed is 0); the trainer could not read it, so no run would start'), error


@pytest.mark.parametrize('sweep_text,base_text,match', [
    ('def get_sweep(arg=None)\n  return {}\n', None, r'bad_sweep\.py, line 1: SyntaxError: expected .:.$'),
    ('def get_sweep(arg=None):\n  raise RuntimeError("no grid")\n', None,
     r'bad_sweep\.py, line 2: RuntimeError: no grid$'),
    ('def get_sweep():\n  return {}\n', None, r'bad_sweep\.py: TypeError: .*get_sweep\(\) takes 0 positional'),
    ("def get_sweep(arg=None):\n  return {'base': BASE, 'runs': [{'name': 'a', 'overrides': {}}]}\n",
     'def get_config(arg=None):\n  return 1 +\n',
     r'^base .*bad_base\.py of --sweep=.*bad_base\.py, line 2: SyntaxError'),
    ("def get_sweep(arg=None):\n  return {'base': BASE, 'runs': [{'name': 'a', 'overrides': {}}]}\n",
     'def get_config(arg=None):\n  x = {}\n  return x["model"]\n', r'bad_base\.py, line 3: KeyError: .model.$'),
], ids=['sweep_syntax', 'sweep_raises', 'sweep_signature', 'base_syntax', 'base_raises'])
def test_a_sweep_file_or_base_config_that_fails_to_load_is_one_line_and_exit_2(tmp_path, capsys, sweep_text,
                                                                                base_text, match):
  base = tmp_path / 'bad_base.py'
  if base_text is not None:
    base.write_text(base_text)
  sweep_file = tmp_path / 'bad_sweep.py'
  sweep_file.write_text(sweep_text + f'BASE = {str(base)!r}\n')
  spec = f'{sweep_file}:x=1' if 'get_sweep()' in sweep_text else str(sweep_file)
  with pytest.raises(ValueError, match=match):
    sweep_lib.load_sweep(spec, str(tmp_path / 'root'))
  with pytest.raises(SystemExit) as stopped:
    run_sweep(f'--sweep={spec}', f'--root={tmp_path / "root"}', '--dry_run')
  assert stopped.value.code == 2
  err = capsys.readouterr().err
  assert 'Traceback' not in err and re.search(match, err.strip().splitlines()[-1].split('error: ', 1)[1]), err


# ----------------------------------------------------------------------------
# The summary.

TWO_KEYS = ("def get_sweep(arg=None):\n  return {'base': 'configs/test.py:steps=1', 'runs': [\n"
            "      {'name': 'lr1', 'overrides': {'optim.base_lr': 1e-3}},\n"
            "      {'name': 'mask5', 'overrides': {'mask_ratio': 0.5}}]}\n")


def test_the_summary_shows_the_base_value_of_a_swept_key_a_run_does_not_override(tmp_path):
  sweep_file = tmp_path / 'two_keys.py'
  sweep_file.write_text(TWO_KEYS)
  status, text = run_sweep(f'--sweep={sweep_file}', f'--root={tmp_path / "root"}', '--dry_run')
  assert status == 0, text
  assert '| run | optim.base_lr | mask_ratio | status | step |' in text
  assert '| lr1 | 0.001 | 0.75 | pending |  |' in text and '| mask5 | 0.00015 | 0.5 | pending |  |' in text


def _log_metrics(workdir, step=3, **values):
  """A metrics part file as the trainer writes it."""
  os.makedirs(os.path.join(workdir, 'metrics'), exist_ok=True)
  with open(os.path.join(workdir, 'metrics', 'part-1-0000000001-00000.jsonl'), 'w', encoding='utf-8') as f:
    f.write(json.dumps({'step': step, **values}) + '\n')


def test_a_metric_no_run_logged_is_refused_and_leaves_the_summary_files_alone(tmp_path, capsys):
  root = tmp_path / 'root'
  sweep = sweep_lib.load_sweep(f'{TINY}:steps=3', str(root))
  for run in sweep.runs:
    _log_metrics(run.workdir, **{'train/loss': 0.5, 'eval/knn_top1': 0.25})
    sweep_lib.mark_done(run, {'step': 3}, sweep_lib.run_settings(sweep, run))
  status, text = run_sweep(f'--sweep={TINY}:steps=3', f'--root={root}', '--metrics=train/loss')
  assert status == 0 and '| run | mask_ratio | model.decoder_depth | status | step | train/loss |' in text, text
  written = {name: (root / name).read_text() for name in ('summary.md', 'summary.csv')}
  with pytest.raises(SystemExit) as stopped:
    run_sweep(f'--sweep={TINY}:steps=3', f'--root={root}', '--metrics=train/los,eval/knn_top1')
  assert stopped.value.code == 2
  assert "--metrics: unknown metric 'train/los'; close matches: train/loss" in capsys.readouterr().err
  assert {name: (root / name).read_text() for name in written} == written  # Not overwritten with a reduced table.
  # A run still to resume may log it yet (an evaluation at its end): the rerun is not refused up front.
  os.remove(os.path.join(sweep.runs[0].workdir, sweep_summary.DONE_MARKER))
  sweep_summary.check_metrics(sweep, ['eval/knn_top1_at_the_end'])


class MetricsLoggingRunner(sweep_lib.TrainerRunner):
  """A trainer that logs train/loss and exits 0, instead of training."""

  def __init__(self):
    super().__init__(out=io.StringIO())

  def _call(self, command):
    _log_metrics(next(a for a in command if a.startswith('--workdir=')).split('=', 1)[1], **{'train/loss': 0.5})
    return 0


def test_a_metric_no_run_logged_by_the_end_of_the_sweep_shows_every_metric_and_exits_2(tmp_path):
  """No run had logged anything when the sweep started, so the typo shows only at the end; the runs are kept."""
  root = tmp_path / 'root'
  runner = MetricsLoggingRunner()
  status, _ = run_sweep(f'--sweep={TINY}', f'--root={root}', '--metrics=train/los', runner=runner)
  text = runner.out.getvalue()
  assert status == 2 and len(runner.commands) == 4, text
  assert "error: --metrics: unknown metric 'train/los'; close matches: train/loss" in text
  assert all(os.path.exists(os.path.join(root, name, 'DONE')) for name in TINY_RUNS)
  assert '| run | mask_ratio | model.decoder_depth | status | step | train/loss |' in (root / 'summary.md').read_text()


# ----------------------------------------------------------------------------
# TPU mode.

TPU_FLAGS = ('--mode=tpu', '--tpu_name=mae-abl', '--zone=us-central2-b', '--accelerator_type=v4-32')


def test_tpu_dry_run_creates_once_and_runs_each(tmp_path):
  status, text = run_sweep(f'--sweep={TINY}', '--root=gs://bucket/sweep', *TPU_FLAGS, '--spot', '--dry_run')
  assert status == 0, text
  lines = text.splitlines()
  assert sum('tpu-vm create mae-abl' in line for line in lines) == 1
  assert sum('tpu-vm delete mae-abl' in line for line in lines) == 1
  runs = [line for line in lines if 'mae_jax.main' in line]
  assert len(runs) == 4
  assert 'gs://bucket/sweep/mask0.75_dec2' in runs[3] and 'config.model.decoder_depth=2' in runs[3]
  assert 'configs/test.py:steps=3' in runs[0]
  assert lines.index(next(line for line in lines if 'tpu-vm delete' in line)) > lines.index(runs[3])


class ScriptedGcloud(common.Runner):
  """Real-mode gcloud stand-in: every command succeeds; the trainer runs answer from `runs` in order (a list
  of StreamResult per run, or an exception to raise), then succeed on all four workers of a v4-32."""

  def __init__(self, runs=(), states=()):
    super().__init__(out=io.StringIO())
    self.runs, self.states = list(runs), list(states)

  def sleep(self, seconds):
    pass

  def _call(self, command):
    return 0

  def _call_capture(self, command):
    return 0, self.states.pop(0) if self.states else 'READY'

  def _call_stream(self, commands, labels, marker):
    if not any('mae_jax.main' in part for part in commands[0]):
      return [common.StreamResult(0, 0) for _ in commands]
    answer = self.runs.pop(0) if self.runs else [common.StreamResult(0, 4, (0,) * 4)]
    if isinstance(answer, BaseException):
      raise answer
    return answer


def test_tpu_mode_marks_done_and_skips_on_rerun(tmp_path):
  root = str(tmp_path / 'root')
  runner = ScriptedGcloud()
  status, _ = run_sweep(f'--sweep={TINY}', f'--root={root}', *TPU_FLAGS, '--max_runs=3', runner=runner)
  assert status == 0
  done = [os.path.exists(os.path.join(root, n, 'DONE')) for n in TINY_RUNS]
  assert done == [True, True, True, False]
  runner = ScriptedGcloud()
  status, _ = run_sweep(f'--sweep={TINY}', f'--root={root}', *TPU_FLAGS, runner=runner)
  assert status == 0
  jobs = [c for c in runner.commands if any('mae_jax.main' in part for part in c)]
  assert len(jobs) == 1 and any('mask0.75_dec2' in part for part in jobs[0])
  assert os.path.exists(os.path.join(root, 'mask0.75_dec2', 'DONE'))


def test_tpu_mode_interrupted_writes_the_summary_and_exits_75(tmp_path):
  """Ctrl-C (or SIGTERM / SIGHUP, which launch.tpu turns into it) during the second run: the TPU is deleted,
  the finished run keeps its marker, the summary says where it stopped."""
  root = str(tmp_path / 'root')
  runner = ScriptedGcloud([[common.StreamResult(0, 4, (0,) * 4)], KeyboardInterrupt('signal SIGTERM')])
  status, _ = run_sweep(f'--sweep={TINY}', f'--root={root}', *TPU_FLAGS, runner=runner)
  text = runner.out.getvalue()
  assert status == sweep_lib.EXIT_INTERRUPTED, text
  gcloud = [c[3:5] for c in runner.commands if c[:3] == ('gcloud', 'compute', 'tpus')]
  assert gcloud[-1] == ('tpu-vm', 'delete'), gcloud
  assert '# interrupted (signal SIGTERM): rerun the same command to resume' in text
  assert '| mask0.5_dec1 | 0.5 | 1 | done |' in text and '| mask0.5_dec2 | 0.5 | 2 | interrupted |' in text
  with open(os.path.join(root, 'summary.md'), encoding='utf-8') as f:
    assert '| mask0.5_dec2 | 0.5 | 2 | interrupted |' in f.read()


def test_tpu_mode_leaves_a_tpu_of_another_type_alone(tmp_path):
  """The TPU name is taken by another accelerator type: the sweep stops and deletes nothing."""

  class OtherTypeGcloud(common.Runner):
    def _call(self, command):
      return 1 if command[4:5] == ('create',) else 0  # ALREADY_EXISTS

    def _call_capture(self, command):
      return 0, 'v4-8' if any('acceleratorType' in part for part in command) else 'READY'

  runner = OtherTypeGcloud(out=io.StringIO())
  status, _ = run_sweep(f'--sweep={TINY}', f'--root={tmp_path / "root"}', *TPU_FLAGS, runner=runner)
  assert status == sweep_lib.EXIT_FAILED
  assert not [c for c in runner.commands if c[4:5] == ('delete',)], runner.commands
  assert 'already exists as a v4-8, not the --accelerator_type=v4-32' in runner.out.getvalue()


def test_tpu_mode_rejects_per_run_flags(tmp_path, capsys):
  # A config the workers would not get (not committed): refused before any TPU is created.
  sweep_file = tmp_path / 'local_sweep.py'
  sweep_file.write_text("def get_sweep(arg=None):\n  return {'base': '" + str(tmp_path / 'mine.py') +
                        "', 'runs': [{'name': 'a', 'overrides': {'seed': 1}}]}\n")
  (tmp_path / 'mine.py').write_text(open(os.path.join(REPO_ROOT, 'configs', 'test.py'), encoding='utf-8').read())
  runner = common.Runner(dry_run=True, out=io.StringIO())
  with pytest.raises(SystemExit):
    run_sweep(f'--sweep={sweep_file}', '--root=gs://b/s', *TPU_FLAGS, '--dry_run', runner=runner)
  assert not runner.commands and 'mine.py is not committed at --git_ref=HEAD' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run_sweep(f'--sweep={TINY}', '--root=gs://b/s', *TPU_FLAGS, '--config=configs/test.py', '--dry_run')
  with pytest.raises(SystemExit):
    run_sweep(f'--sweep={TINY}', f'--root={tmp_path}', '--tpu_name=x')  # A TPU flag in local mode.


# ----------------------------------------------------------------------------
# Trainer exit statuses: 75 (preempted) stops the sweep, 65 (non-finite halt) fails the run, no retry.

class ExitingRunner(sweep_lib.TrainerRunner):
  """Answers each trainer run with the next exit status instead of running it."""

  def __init__(self, statuses):
    super().__init__(out=io.StringIO())
    self.statuses = list(statuses)

  def _call(self, command):
    return self.statuses.pop(0)


def test_trainer_exit_75_is_preempted_and_stops_the_sweep(tmp_path):
  runner = ExitingRunner([common.PREEMPTED_EXIT_CODE])
  status, _ = run_sweep(f'--sweep={TINY}', f'--root={tmp_path}', runner=runner)
  text = runner.out.getvalue()
  assert status == sweep_lib.EXIT_INTERRUPTED == 75, text
  assert len(runner.commands) == 1  # The other three runs were not started.
  assert '| mask0.5_dec1 | 0.5 | 1 | preempted |' in text and '| mask0.5_dec2 | 0.5 | 2 | pending |' in text
  assert '# preempted: rerun the same command to resume' in text


def test_trainer_nonfinite_halt_fails_the_run_without_retry_and_the_sweep_goes_on(tmp_path):
  runner = ExitingRunner([common.NONFINITE_EXIT_CODE] * 4)
  status, _ = run_sweep(f'--sweep={TINY}', f'--root={tmp_path}', runner=runner)
  text = runner.out.getvalue()
  assert status == sweep_lib.EXIT_FAILED, text
  assert len(runner.commands) == 4  # Each run once.
  assert text.count(' | failed |') == 4


def _run_commands(runner):
  return [c for c in runner.commands if any('mae_jax.main' in part for part in c)]


def test_tpu_mode_nonfinite_halt_is_failed_not_retried(tmp_path):
  ok = [common.StreamResult(0, 4, (0,) * 4)]
  runner = ScriptedGcloud([[common.StreamResult(1, 0, (65,) * 4)], ok, ok, ok])
  status, _ = run_sweep(f'--sweep={TINY}', f'--root={tmp_path}', *TPU_FLAGS, '--max_retries=3', runner=runner)
  text = runner.out.getvalue()
  assert status == sweep_lib.EXIT_FAILED, text
  assert len(_run_commands(runner)) == 4  # The halted run ran once; the others went on.
  assert not any(c[4] == 'describe' for c in runner.commands)
  assert '| mask0.5_dec1 | 0.5 | 1 | failed |' in text
  assert [os.path.exists(os.path.join(tmp_path, n, 'DONE')) for n in TINY_RUNS] == [False, True, True, True]


def test_tpu_mode_preempted_past_max_retries_stops_the_sweep(tmp_path):
  lost = [common.StreamResult(255, 0)]
  runner = ScriptedGcloud([lost, lost], states=['PREEMPTED', 'PREEMPTED'])
  status, _ = run_sweep(f'--sweep={TINY}', f'--root={tmp_path}', *TPU_FLAGS, '--max_retries=1', runner=runner)
  text = runner.out.getvalue()
  assert status == sweep_lib.EXIT_INTERRUPTED, text
  assert len(_run_commands(runner)) == 2  # One run, one retry; the next runs were not started.
  assert '| mask0.5_dec1 | 0.5 | 1 | preempted |' in text and '| mask0.5_dec2 | 0.5 | 2 | pending |' in text
  assert runner.commands[-1][4] == 'delete'
