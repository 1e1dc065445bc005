"""gs:// workdirs, on a GCS emulator on 127.0.0.1: pretraining stopped by SIGTERM and resumed, then read back.

Everything a run writes goes to the bucket through mae_jax.fileio (config,
metrics part files, TensorBoard event files, results) and Orbax (checkpoints);
nothing may land in a local folder named `gs:`.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from mae_jax import checkpoint, fileio, metrics
from tests import gcs_emulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 'mae-jax-test'
STEPS = 30


@pytest.fixture(scope='module')
def gcs():
  with gcs_emulator.running(BUCKET) as env:
    yield env


def _main(env, cwd, log, *args):
  """The trainer in a subprocess; its output goes to `log` (a pipe nobody reads would fill and stall it)."""
  with open(log, 'w', encoding='utf-8') as f:
    return subprocess.Popen([sys.executable, '-m', 'mae_jax.main', f'--config={REPO}/tests/configs/tiny_synthetic.py',
                             *args], env=dict(os.environ, **env, PYTHONPATH=REPO), cwd=cwd,
                            stdout=f, stderr=subprocess.STDOUT)


def _tail(log) -> str:
  with open(log, encoding='utf-8') as f:
    return f.read()[-3000:]


def test_remote_workdir_pretrain_sigterm_resume_and_read_back(gcs, tmp_path):
  workdir = f'gs://{BUCKET}/runs/pretrain'
  args = (f'--workdir={workdir}', f'--config.num_train_steps={STEPS}')
  log = tmp_path / 'first.log'
  first = _main(gcs, tmp_path, log, *args)
  try:
    deadline = time.time() + 300
    while len(metrics.read_metrics(workdir)) < 7:
      assert first.poll() is None, _tail(log)
      assert time.time() < deadline, 'no training progress'
      time.sleep(0.2)
    # The log so far was copied at the step-5 save: a worker that dies unannounced leaves it behind.
    assert len(fileio.glob(fileio.join(workdir, 'logs'), 'main.*.log')) == 1, _tail(log)
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=240)
  finally:
    first.kill()
  assert first.returncode == 75, _tail(log)
  stopped = checkpoint.latest_step(workdir)
  assert stopped is not None and 5 <= stopped < STEPS, _tail(log)

  log = tmp_path / 'second.log'
  second = _main(gcs, tmp_path, log, *args)
  assert second.wait(timeout=300) == 0, _tail(log)

  # Read back from the bucket: config, metrics (each step once), results, TensorBoard, checkpoint.
  config = fileio.read_text(fileio.join(workdir, 'config.json'))
  assert '"num_train_steps": 30' in config
  records = metrics.read_metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, STEPS + 1))
  assert len(fileio.glob(fileio.join(workdir, 'metrics'), 'part-*.jsonl')) >= 2  # Two writer starts.
  assert fileio.glob(workdir, 'events.out.tfevents.*')
  assert checkpoint.latest_step(workdir) == STEPS
  params, saved_config = checkpoint.load_params(workdir)
  assert saved_config['num_train_steps'] == STEPS and 'encoder' in params
  assert not os.path.exists(tmp_path / 'gs:')  # Nothing went to a local folder named after the URL.
  logs = fileio.glob(fileio.join(workdir, 'logs'), 'main.*.log')  # Each run's log file, copied at exit.
  assert len(logs) == 2 and all('JAX process 0 / 1' in fileio.read_text(f) for f in logs), _tail(log)


def test_remote_workdir_export_and_sweep_summary(gcs, tmp_path):
  """An export from a gs:// workdir into the bucket, and a sweep whose root is in the bucket."""
  import io  # pylint: disable=g-import-not-at-top

  import numpy as np  # pylint: disable=g-import-not-at-top
  import safetensors.numpy  # pylint: disable=g-import-not-at-top

  from launch import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  from mae_jax import export  # pylint: disable=g-import-not-at-top
  from mae_jax.weights import files  # pylint: disable=g-import-not-at-top

  root = f'gs://{BUCKET}/sweep'
  out = io.StringIO()
  status = sweep_lib.main(['--sweep=configs/sweeps/tiny_demo_sweep.py:steps=2', f'--root={root}',
                           '--local_runner=inprocess', '--only=mask0.5_dec1'], out=out)
  assert status == 0, out.getvalue()
  workdir = fileio.join(root, 'mask0.5_dec1')
  assert '| mask0.5_dec1 | 0.5 | 1 | done | 2 |' in fileio.read_text(fileio.join(root, 'summary.md'))
  assert fileio.exists(fileio.join(root, 'summary.csv')) and fileio.exists(fileio.join(workdir, 'DONE'))
  assert [r['step'] for r in metrics.read_metrics(workdir)] == [1, 2]

  target = fileio.join(workdir, 'export', 'encoder.safetensors')
  assert export.export_from_workdir(workdir, 'safetensors', target) == target
  state = safetensors.numpy.load(fileio.read_bytes(target))
  params, _ = checkpoint.load_params(workdir)
  np.testing.assert_array_equal(state['cls_token'], np.asarray(params['encoder']['cls_token']))
  meta = fileio.read_text(files.metadata_path(target))
  assert '"step": 2' in meta and root in meta
  # Read back from the bucket as init_from / pretrained_path do: model from the export's metadata.
  assert files.detect_format(target) == 'safetensors' and files.read_metadata(target)['step'] == 2
  restored = files.import_weights(target)
  np.testing.assert_array_equal(restored['encoder']['cls_token'], np.asarray(params['encoder']['cls_token']))
  assert not os.path.exists(tmp_path / 'gs:') and not os.path.exists('gs:')


def test_a_bucket_out_of_reach_is_one_error_naming_the_path(monkeypatch):
  """A storage client's own error (no network, no credentials) becomes fileio.StorageError naming the path and
  what to check; the entry points print it in one line. 'Not found' stays FileNotFoundError; local paths keep
  their own errors."""
  class Unreachable:
    def __init__(self, error):
      self.error = error

    def exists(self, *args, **kwargs):
      raise self.error

    read_bytes = read_text = is_dir = exists

  monkeypatch.setattr(fileio, 'path', lambda p: Unreachable(RuntimeError('Could not resolve host: www.googleapis.com'
                                                                       '\nmore detail')))
  for call in (lambda: fileio.exists('gs://b/run'), lambda: fileio.isdir('gs://b/run'),
               lambda: fileio.read_text('gs://b/run/config.json')):
    with pytest.raises(fileio.StorageError, match=r'gs://b/run.*: the storage could not be reached \(RuntimeError: '
                                                  r'Could not resolve host: www.googleapis.com\); check the bucket'):
      call()
  with pytest.raises(RuntimeError):
    fileio.exists('/local/run')
  monkeypatch.setattr(fileio, 'path', lambda p: Unreachable(FileNotFoundError('gs://b/x')))
  with pytest.raises(FileNotFoundError):
    fileio.read_bytes('gs://b/x')
  from mae_jax import export  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(fileio, 'path', lambda p: Unreachable(RuntimeError('no credentials')))
  with pytest.raises(fileio.StorageError):
    export.convert('gs://b/enc.safetensors', 'orbax', 'gs://b/out')
