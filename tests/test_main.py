"""The entry point: importing it defines nothing; it dispatches configs to their trainers."""

import os
import subprocess
import sys

from configs import finetune as finetune_recipe
from configs import linprobe as linprobe_recipe
from configs import test as test_config
from mae_jax import finetune, knn, linprobe, main, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_the_entry_points_defines_no_flags():
  """A program with its own --workdir / --config flags (benchmarks, notebooks) imports them as libraries."""
  code = ('from absl import flags; flags.DEFINE_string("workdir", None, ""); flags.DEFINE_string("config", None, ""); '
          'flags.DEFINE_bool("verbose", False, ""); flags.DEFINE_bool("progress", False, ""); '
          'import mae_jax.main, mae_jax.downstream, mae_jax.aot, mae_jax.export, mae_jax.visualize, mae_jax.train; '
          'print("ok")')
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr[-2000:]


def test_each_config_goes_to_its_trainer(monkeypatch):
  calls = []
  for module, name in ((train, 'train_and_evaluate'), (finetune, 'finetune'), (linprobe, 'linear_probe'),
                       (knn, 'run_knn')):
    monkeypatch.setattr(module, name, lambda config, workdir, name=name: calls.append(name) or {})
  monkeypatch.setattr(main, 'DOWNSTREAM', {'finetune': finetune.finetune, 'linprobe': linprobe.linear_probe,
                                           'knn': knn.run_knn})
  main.run_experiment(test_config.get_config(), 'unused')
  main.run_experiment(finetune_recipe.get_config('runlocal=True'), 'unused')
  probe = linprobe_recipe.get_config('runlocal=True')
  main.run_experiment(probe, 'unused')
  probe.downstream = 'knn'
  main.run_experiment(probe, 'unused')
  assert calls == ['train_and_evaluate', 'finetune', 'linear_probe', 'run_knn']


def test_a_setting_that_cannot_work_ends_in_one_line_with_the_traceback_in_the_log(tmp_path):
  workdir = tmp_path / 'run'
  run = lambda *flags: subprocess.run([sys.executable, '-m', 'mae_jax.main', *flags], cwd=REPO, capture_output=True,
                                      text=True, timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  done = run('--config=configs/test.py:steps=1', f'--workdir={workdir}', '--config.mask_ratio=1.5')
  # A setting the checks refuse before any compile: exit 78, which launchers do not retry.
  assert done.returncode == main.CONFIG_EXIT_CODE and 'Traceback' not in done.stderr, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1] == 'Error: mask_ratio=1.5: must be in (0, 1)'
  (log,) = os.listdir(workdir / 'logs')
  assert 'Traceback' in (workdir / 'logs' / log).read_text()  # For a bug report.
  # A file to fix (a data set not prepared): exit 1, the line names the log with the traceback.
  done = run('--config=configs/test.py:steps=1', f'--workdir={tmp_path / "data"}', '--config.dataset.name=no_such_ds')
  assert done.returncode == 1 and 'Traceback' not in done.stderr, done.stderr[-3000:]
  assert done.stderr.strip().splitlines()[-1].startswith("Error: Data set 'no_such_ds' (config.dataset.name)")
  assert f'(traceback: {tmp_path / "data"}/logs/main.' in done.stderr
  # A config file that does not load: one line, exit 2, and no workdir made.
  done = run('--config=configs/no_such_file.py', f'--workdir={tmp_path / "other"}')
  assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
  assert done.stderr.startswith('error: --config: ')
  assert 'configs/no_such_file.py' in done.stderr and not (tmp_path / 'other').exists()
  # A typo in the config's argument, with no --config.KEY flag: the same one line.
  done = run('--config=configs/test.py:stepz=1', f'--workdir={tmp_path / "other"}')
  assert done.returncode == 2 and done.stderr.strip() == (
      "error: --config=configs/test.py:stepz=1: config argument 'stepz=1': unknown argument 'stepz'; close "
      'matches: steps'), done.stderr
