"""The terminal: library logs to the run's log file (INFO hidden from stderr, shown with --verbose), progress."""

import io
import logging
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from absl import logging as absl_logging

from mae_jax import console

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An entry point in miniature: absl app, console.setup, then log lines as absl, Orbax and TensorFlow write them.
ENTRY = textwrap.dedent("""
    import logging, sys
    from absl import app, logging as absl_logging
    from mae_jax import console

    def main(argv):
      console.setup('probe', sys.argv[1])
      import orbax.checkpoint  # Orbax logs through absl; TensorFlow's Python logger is 'tensorflow'.
      absl_logging.info('absl-info-line')
      logging.getLogger('orbax').info('orbax-info-line')
      logging.getLogger('tensorflow').info('tensorflow-info-line')
      absl_logging.warning('a-warning-line')
      absl_logging.warning('CheckpointManagerOptions.read_only=True, setting save_interval_steps=0.')
      absl_logging.error('an-error-line')

    console.define_flags()
    app.run(main)
""")
INFO_LINES = ('absl-info-line', 'orbax-info-line', 'tensorflow-info-line')


def _run_entry(tmp_path, *flags):
  workdir = str(tmp_path / 'run')
  proc = subprocess.run([sys.executable, '-c', ENTRY, workdir, *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr
  logs = os.listdir(os.path.join(workdir, 'logs'))
  assert len(logs) == 1 and logs[0].startswith('probe.'), logs
  with open(os.path.join(workdir, 'logs', logs[0]), encoding='utf-8') as f:
    return proc.stderr, f.read(), os.path.join(workdir, 'logs', logs[0])


def test_info_goes_to_the_log_file_warnings_and_errors_to_the_terminal(tmp_path):
  stderr, log, path = _run_entry(tmp_path)
  for line in INFO_LINES:
    assert line in log
    assert line not in stderr
  assert 'a-warning-line' in stderr and 'an-error-line' in stderr and 'a-warning-line' in log
  # Plain on the terminal; the file keeps absl's prefix (time, thread, source line).
  assert re.search(r'^Warning: .*a-warning-line', stderr, re.M) and re.search(r'^Error: .*an-error-line', stderr, re.M)
  assert re.search(r"^W\d{4} [\d:.]+ +\d+ \S+:\d+\] a-warning-line", log, re.M), log
  assert 'read_only=True' in log and 'read_only=True' not in stderr  # Orbax's expected note: the file only.
  assert f'Logs: {path}' in stderr
  assert 'oneDNN' not in stderr and 'port.cc' not in stderr  # TensorFlow's native import lines.
  assert len(stderr.strip().splitlines()) == 3, stderr  # Logs:, the warning, the error.


def test_reading_a_data_set_shows_no_library_deprecation_on_the_terminal(tmp_path):
  """TFDS's record ids (they name corrupt images) use a deprecated tf.data op: its warning goes to the file only."""
  code = textwrap.dedent("""
      import sys
      from mae_jax import console
      from mae_jax.data import sources
      from tests import test_data_pipeline as data_tests
      console.setup('probe', sys.argv[1])
      data_tests._write_records(sys.argv[2], 'few', [data_tests._png(9)] * 4, [4], (6, 6, 3))
      builder = sources.get_builder(sources.DatasetConfig(name='few', data_dir=sys.argv[2]))
      print([e['record'].decode() for e in sources.read_records(builder, 'train').as_numpy_iterator()])
  """)
  workdir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-c', code, str(workdir), str(tmp_path / 'data')], cwd=REPO,
                        capture_output=True, text=True, timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str([f'record {i} of few-train.tfrecord-00000-of-00001' for i in range(4)])
  (log,) = os.listdir(workdir / 'logs')
  assert 'CounterV2' in (workdir / 'logs' / log).read_text()
  assert 'CounterV2' not in proc.stderr and 'Instructions for updating' not in proc.stderr, proc.stderr


def test_reads_left_on_a_closed_event_loop_go_to_the_log_file(tmp_path):
  """After a failed checkpoint read Orbax's pending reads end as unraisable 'Event loop is closed' errors."""
  code = textwrap.dedent("""
      import sys
      from mae_jax import console
      console.setup('probe', sys.argv[1], verbose=False)
      class Pending:
        def __init__(self, message): self.message = message
        def __del__(self): raise RuntimeError(self.message)
      Pending('Event loop is closed')
      Pending('another unraisable error')
  """)
  workdir = tmp_path / 'run'
  proc = subprocess.run([sys.executable, '-c', code, str(workdir)], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  (log,) = os.listdir(workdir / 'logs')
  assert 'Event loop is closed' in (workdir / 'logs' / log).read_text()
  assert 'Event loop is closed' not in proc.stderr and 'another unraisable error' in proc.stderr, proc.stderr


def test_verbose_shows_the_info_lines_on_the_terminal_too(tmp_path):
  stderr, log, _ = _run_entry(tmp_path, '--verbose')
  for line in INFO_LINES:
    assert line in log and line in stderr
  assert 'read_only=True' in stderr


@pytest.fixture
def restored_logging():
  """console.setup changes process-wide logging: put it back for the other tests."""
  root, terminal = logging.getLogger(), absl_logging.get_absl_handler()
  saved = (list(root.handlers), root.level, terminal.level, list(terminal.filters), terminal.python_handler.formatter)
  yield
  for handler in root.handlers:
    if handler not in saved[0]:
      root.removeHandler(handler)
      handler.close()
  root.setLevel(saved[1])
  terminal.setLevel(saved[2])
  terminal.filters[:] = saved[3]
  terminal.setFormatter(saved[4])


def test_setup_again_replaces_the_file_and_a_gs_workdir_logs_locally(tmp_path, restored_logging, capsys):
  first = console.setup('main', str(tmp_path / 'a'))
  second = console.setup('main', 'gs://bucket/run', announce=False)
  logging.getLogger('orbax').info('after-the-second-setup')
  assert second.startswith(console.log_dir(None)) and not second.startswith('gs://')
  with open(first, encoding='utf-8') as f:
    assert 'after-the-second-setup' not in f.read()
  with open(second, encoding='utf-8') as f:
    assert 'after-the-second-setup' in f.read()
  assert 'after-the-second-setup' not in capsys.readouterr().err
  os.remove(second)


def test_entry_points_that_only_read_a_workdir_do_not_create_a_missing_one(tmp_path, restored_logging):
  missing, existing = tmp_path / 'typo', tmp_path / 'run'
  existing.mkdir()
  assert console.setup('visualize', str(existing), reads_only=True, announce=False).startswith(str(existing / 'logs'))
  in_tmp = console.setup('visualize', str(missing), reads_only=True, announce=False)
  assert in_tmp.startswith(console.log_dir(None)) and not missing.exists()
  os.remove(in_tmp)
  assert console.setup('main', str(missing), announce=False).startswith(str(missing / 'logs'))  # A run makes it.


def test_the_temporary_log_folder_is_pruned_of_old_files_and_workdir_logs_are_kept(tmp_path, restored_logging,
                                                                                    monkeypatch):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))
  folder, workdir_logs = tmp_path / 'tmp' / 'mae_jax_logs', tmp_path / 'run' / 'logs'
  old = time.time() - (console.TEMP_LOG_DAYS + 1) * 86400
  for directory in (folder, workdir_logs):
    directory.mkdir(parents=True)
    for name in ('main.old.log', 'main.recent.log', 'notes.txt'):
      (directory / name).write_text('x')
      os.utime(directory / name, (old, old) if name != 'main.recent.log' else None)
  console.setup('main', str(tmp_path / 'run'), announce=False)
  assert len(os.listdir(workdir_logs)) == 4  # The run's own folder: nothing removed.
  new = console.setup('aot', announce=False)
  assert sorted(os.listdir(folder)) == sorted(['main.recent.log', 'notes.txt', os.path.basename(new)])


def _drive(hook, total):
  for step in range(hook.start_step + 1, total + 1):
    hook(step)
    if step % 5 == 0:
      hook.update_metrics(step, {'train/loss': 1.0 / step, 'train/lr': 0.1})
  hook.update_metrics(total, {'eval/knn_top1': 0.7125, 'eval/knn_top5': 0.95, 'eval/loss': 0.4321})


def test_progress_bar_shows_steps_per_second_eta_loss_and_keeps_eval_lines():
  stream = io.StringIO()
  hook = console.ProgressHook(20, 0, mode='bar', stream=stream)
  _drive(hook, 20)
  hook.close()
  out = stream.getvalue()
  assert re.search(r'15/20 \[\d+:\d+, [\d.]+ steps/s, ETA \d+:\d+, loss=0.0667\]', out), out  # elapsed, rate, ETA.
  assert re.search(r'20/20 \[\d+:\d+, [\d.]+ steps/s, loss=0.0500\]', out), out  # No stale ETA at the end.
  assert 'step 20: eval/knn_top1 71.25%, eval/knn_top5 95.00%, eval/loss 0.4321' in out


def test_progress_lines_without_a_terminal_one_per_log_period():
  stream = io.StringIO()  # Not a terminal: 'auto' writes plain lines (launchers, pipes, tests).
  hook = console.ProgressHook(20, 10, stream=stream)
  assert hook.mode == 'lines'
  _drive(hook, 20)
  lines = stream.getvalue().splitlines()
  assert '\r' not in stream.getvalue()
  assert len(lines) == 3, lines  # Steps 15 and 20, then the evaluation.
  assert lines[0].startswith('step 15/20, loss 0.0667, ') and 'steps/s, ETA 0:0' in lines[0]
  assert lines[1].startswith('step 20/20, loss 0.0500')
  assert lines[2] == 'step 20: eval/knn_top1 71.25%, eval/knn_top5 95.00%, eval/loss 0.4321'


def test_progress_auto_draws_a_bar_only_on_a_terminal_wide_enough_for_it():
  import fcntl
  import struct
  import termios
  master, slave = os.openpty()  # A fresh pseudo-terminal reports 0 rows and 0 columns (as `script` makes).
  try:
    with os.fdopen(slave, 'w', closefd=False) as stream:
      assert stream.isatty() and console.progress_mode('auto', stream) == 'lines'
      fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 0, 100, 0, 0))  # `stty cols 100`, no rows.
      assert console.progress_mode('auto', stream) == 'lines'
      fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 30, 100, 0, 0))
      assert console.progress_mode('auto', stream) == 'bar'
      assert console.progress_mode('lines', stream) == 'lines'
  finally:
    os.close(master)
    os.close(slave)


def test_progress_is_silent_when_off_and_on_other_processes(monkeypatch):
  stream = io.StringIO()
  _drive(console.ProgressHook(10, 0, mode='off', stream=stream), 10)
  monkeypatch.setattr(console.jax, 'process_index', lambda: 1)  # A pod's other hosts.
  _drive(console.ProgressHook(10, 0, mode='bar', stream=stream), 10)
  assert stream.getvalue() == ''


def test_progress_rate_leaves_evaluations_and_compile_out_and_the_eta_counts_evaluations(monkeypatch):
  clock = [1000.0]
  monkeypatch.setattr(console.time, 'time', lambda: clock[0])
  stream = io.StringIO()
  hook = console.ProgressHook(20, 0, mode='lines', stream=stream)
  clock[0] += 30.0  # The first step compiles.
  for step in range(1, 11):
    clock[0] += 1.0  # One second a step.
    hook(step)
    if step % 5 == 0:
      hook.update_metrics(step, {'train/loss': 0.5})
    if step == 5:
      clock[0] += 100.0  # A 100-second evaluation.
      hook.update_metrics(step, {'eval/knn_top1': 0.7})
  lines = stream.getvalue().splitlines()
  assert lines[0].startswith('step 5/20') and '1.00 steps/s, ETA 0:15' in lines[0]  # Compile left out.
  assert lines[1].startswith('step 5: eval/knn_top1')
  # 10 steps left at 1 s each, and evaluations every 5 steps at 100 s (the latest one's), due at 10, 15, 20.
  assert lines[2].startswith('step 10/20') and '1.00 steps/s, ETA 5:10' in lines[2], lines[2]


def test_the_evaluations_left_recur_at_the_period_seen_and_at_the_last_step():
  hook = console.ProgressHook(400, 100, mode='off')  # Resumed at step 100, evaluating every 150 steps.
  hook._evals = [(150, 90.0), (300, 60.0)]  # pylint: disable=protected-access  # The first one also compiled.
  assert hook._eval_seconds_left(310) == 60.0  # pylint: disable=protected-access  # The last step's only.
  assert hook._eval_seconds_left(300) == 120.0  # pylint: disable=protected-access  # 300's is due, then 400's.


def test_what_backends_print_natively_at_start_goes_to_the_log_file(tmp_path, restored_logging, monkeypatch,
                                                                    capfd):
  path = console.setup('main', str(tmp_path), announce=False, verbose=False)
  monkeypatch.setattr(console.sys, 'argv', ['main'])

  def probe():
    os.write(2, b'E0000 libtpu: unexpected worker hostname\n')  # Native: as a stray libtpu's probe.
    logging.warning('A Google TPU may be present: falling back to cpu')  # Python's: as JAX warns.
  monkeypatch.setattr(console.jax, 'devices', probe)
  console.start_backends()
  err = capfd.readouterr().err
  assert 'unexpected worker hostname' not in err and 'falling back to cpu' in err
  with open(path, encoding='utf-8') as f:
    assert 'E0000 libtpu: unexpected worker hostname' in f.read()

  def failing():
    os.write(2, b'cannot open the TPU\n')
    raise RuntimeError('Unable to initialize backend')
  monkeypatch.setattr(console.jax, 'devices', failing)
  with pytest.raises(RuntimeError):
    console.start_backends()
  assert 'cannot open the TPU' in capfd.readouterr().err  # A backend that fails: what it said is shown.


def test_a_warning_logged_while_the_bar_is_up_gets_a_line_above_it(restored_logging):
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  handler = absl_logging.get_absl_handler().python_handler
  before = handler.stream
  stream = io.StringIO()
  hook = console.ProgressHook(20, 0, mode='bar', stream=stream)
  try:
    hook(1)
    handler.stream.write('W1129 loop.py:131] Preemption requested: saved step 1\n')  # As the handler writes it.
  finally:
    hook.close()
  assert handler.stream is before
  lines = stream.getvalue().replace('\r', '\n').splitlines()
  assert any(line.endswith('Preemption requested: saved step 1') for line in lines), lines
  assert not any('train:' in line and 'Preemption' in line for line in lines)  # Not inside the bar's line.


def test_a_closed_terminal_stops_the_progress_lines_not_the_run():
  class Closed(io.StringIO):
    def write(self, text):
      raise BrokenPipeError(32, 'Broken pipe')

  hook = console.ProgressHook(10, 0, mode='lines', stream=Closed())
  hook(1)
  hook.update_metrics(1, {'train/loss': 0.5})  # Would write a line: the pipe is gone.
  hook.note('Resuming')
  hook.update_metrics(2, {'eval/knn_top1': 0.5})
  hook.close()
  assert hook.mode == 'off'
