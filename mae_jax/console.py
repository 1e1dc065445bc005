"""What a run shows on the terminal: warnings, errors, a progress bar and results; library logs go to a file.

Every entry point (main, downstream, demo, export, visualize, features, aot) calls `setup(entry, workdir)`
first thing in its `main`: INFO lines of absl, Orbax, TensorFlow, jax and this
package then go to `WORKDIR/logs/ENTRY.TIME.HOST.PID.log` (a local workdir; with
a gs:// workdir or none, to `$TMPDIR/mae_jax_logs/`, pruned of files older
than two weeks, and the terminal says where; main copies it to gs://.../logs/ on its way out, since a pod's local
disks go with the TPU), warnings and errors reach the terminal as
before, and `--verbose` shows everything on the terminal too.

TensorFlow's native (C++) logging prints at import, before flags are parsed and
regardless of TF_CPP_MIN_LOG_LEVEL (TF >= 2.20 logs through absl C++): importing
this module before anything imports TensorFlow imports it with its native stderr
captured, and `setup` writes what was captured into the log file. `--verbose`
on the command line skips the capture.

`ProgressHook` is the training loops' progress display (clu periodic-action
style): a tqdm bar with steps/s, ETA and loss when stderr is a terminal, one
plain line per log period otherwise (launchers, pipes, tests), nothing on
processes other than 0; `--progress=bar|lines|off` overrides.
"""

import contextlib
import logging
import os
import re
import socket
import sys
import tempfile
import time

import jax
import tqdm
from absl import flags
from absl import logging as absl_logging

from mae_jax import fileio

FLAGS = flags.FLAGS


def define_flags() -> None:
  """--verbose and --progress, for the entry points (importing the package defines no flags)."""
  if 'verbose' not in FLAGS:
    flags.DEFINE_bool('verbose', False, 'Also show library INFO logs (absl, Orbax, TensorFlow, jax) on the '
                      'terminal; they always go to the log file that the run names.')
  if 'progress' not in FLAGS:
    flags.DEFINE_enum('progress', 'auto', ('auto', 'bar', 'lines', 'off'),
                      'Training progress on stderr: auto = a bar on a terminal, a line per log period otherwise; '
                      'only process 0 shows it.')

LOGS_DIR = 'logs'
# Orbax's notes when a checkpoint is opened read-only (visualize, export, warm starts): expected, not advice.
QUIET_WARNINGS = ('CheckpointManagerOptions.read_only=True', 'Given directory is read only',
                  'Reached preemption sync point',  # Orbax's, at every check: our own stop line says it once.
                  # TFDS's reader (the record ids that name a corrupt image) uses a deprecated tf.data op.
                  'CounterV2 (from tensorflow.python.data.experimental.ops.counter) is deprecated')


def _verbose_in_argv(argv) -> bool:
  return any(a in ('--verbose', '-verbose', '--verbose=true', '--verbose=True', '--verbose=1') for a in argv[1:])


@contextlib.contextmanager
def _native_stderr_captured(into: list):
  """What native code (and Python) writes to file descriptor 2 inside the block is appended to `into`."""
  with tempfile.TemporaryFile() as captured:
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      into.append(captured.read().decode('utf-8', errors='replace'))


def _import_tensorflow_quietly() -> str:
  """Imports TensorFlow with its native stderr captured; returns what it printed ('' when not captured)."""
  if 'tensorflow' in sys.modules or _verbose_in_argv(sys.argv):
    return ''
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # TF's native INFO lines after import (older TF).
  output = []
  with _native_stderr_captured(output):
    try:
      import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      pass  # Entry points that need TensorFlow fail on their own import, with the message on the terminal.
  return output[0]


_NATIVE_IMPORT_OUTPUT = _import_tensorflow_quietly()
_LOG_PATH = []  # The file `setup` opened last.


def start_backends() -> None:
  """Starts JAX's backends (after jax.distributed, where it runs) with their native stderr sent to the log file.

  A libtpu installed on a host without TPUs (the test extras put one in
  .venv) prints its probe's errors there, which read as failures on a
  terminal. With --verbose, or when a backend fails to start, they are shown.
  """
  if _verbose_in_argv(sys.argv) or not _LOG_PATH:
    jax.devices()
    return
  output = []
  # Python's log records (JAX's "falling back to cpu" warning) still reach the terminal: its handler writes to a
  # copy of the terminal's descriptor while descriptor 2 goes to the capture.
  terminal = absl_logging.get_absl_handler().python_handler
  sys.stderr.flush()
  with os.fdopen(os.dup(2), 'w', buffering=1, encoding='utf-8', errors='replace') as copy:
    previous = terminal.setStream(copy)
    try:
      with _native_stderr_captured(output):
        jax.devices()
    except BaseException:
      sys.stderr.write(''.join(output))
      raise
    finally:
      terminal.setStream(previous)
  if output[0].strip():
    with open(_LOG_PATH[-1], 'a', encoding='utf-8') as f:
      f.write(f'(native output while JAX started its backends)\n{output[0]}\n')


# Storage clients log each retry, with a traceback, and their fallbacks: in the log file only. What failed
# reaches the terminal once, as the caller's error (fileio.StorageError names the path).
QUIET_LOGGERS = ('gcsfs', 'fsspec', 'aiohttp', 'urllib3', 'google.auth', 'google.cloud')


class _QuietFilter(logging.Filter):
  """Keeps the expected Orbax read-only notes and storage clients' retries off the terminal (they stay in the
  log file)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.name.startswith(QUIET_LOGGERS):
      return False
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except  # Arguments that do not format: the handler reports it.
      message = str(record.msg)
    return not any(note in message for note in QUIET_WARNINGS)


class _TerminalFormatter(logging.Formatter):
  """'Warning: message' on the terminal; the log file keeps absl's prefix of time, thread and source line."""

  def format(self, record: logging.LogRecord) -> str:
    text = f'{record.levelname.capitalize()}: {record.getMessage()}'
    if record.exc_info:
      text += '\n' + self.formatException(record.exc_info)
    return text


class _FileHandler(logging.FileHandler):
  """The run's log file (a class of its own, so that a second `setup` replaces it)."""


def log_dir(workdir: str | None, reads_only: bool = False) -> str:
  """WORKDIR/logs for a local workdir; a local temporary folder for gs:// workdirs and runs without one.

  `reads_only`: the entry point only reads the workdir (export, visualize,
  features): a workdir that does not exist (a typo) is not created for its logs.
  """
  if workdir and not fileio.is_remote(workdir) and (not reads_only or os.path.isdir(workdir)):
    return os.path.join(os.path.abspath(workdir), LOGS_DIR)
  return os.path.join(tempfile.gettempdir(), 'mae_jax_logs')


TEMP_LOG_DAYS = 14  # Log files in the shared temporary folder older than this are removed by the next setup.


def _prune_temporary_logs(directory: str) -> None:
  """Removes this package's log files older than TEMP_LOG_DAYS from the temporary log folder (never WORKDIR/logs:
  those are the runs' own). Another user's files, or a file removed meanwhile, are left alone."""
  cutoff = time.time() - TEMP_LOG_DAYS * 86400
  try:
    entries = list(os.scandir(directory))
  except OSError:
    return
  for entry in entries:
    try:
      if entry.name.endswith('.log') and entry.is_file() and entry.stat().st_mtime < cutoff:
        os.remove(entry.path)
    except OSError:
      pass


def setup(entry: str, workdir: str | None = None, *, verbose: bool | None = None, announce: bool = True,
          reads_only: bool = False) -> str:
  """Sends log records to a file (INFO and up) and only warnings and errors to the terminal; returns the path.

  Args:
    entry: the entry point's name, the start of the file's name ('main', 'demo', ...).
    workdir: the run's workdir (local: the file goes to WORKDIR/logs/; gs://: to a local folder).
    verbose: show everything on the terminal too (default: the --verbose flag).
    announce: write one line naming the file to stderr.
    reads_only: the entry point only reads `workdir`; one that does not exist gets no logs/ folder.
  """
  if verbose is None:
    verbose = bool(FLAGS.verbose) if FLAGS.is_parsed() and 'verbose' in FLAGS else False
  directory = log_dir(workdir, reads_only)
  os.makedirs(directory, exist_ok=True)
  if directory == log_dir(None):
    _prune_temporary_logs(directory)
  path = os.path.join(directory, f'{entry}.{time.strftime("%Y%m%d-%H%M%S")}.{socket.gethostname()}.{os.getpid()}.log')
  root = logging.getLogger()
  for old in [h for h in root.handlers if isinstance(h, _FileHandler)]:
    root.removeHandler(old)
    old.close()
  handler = _FileHandler(path, encoding='utf-8')
  handler.setFormatter(absl_logging.PythonFormatter())
  handler.setLevel(logging.INFO)
  root.addHandler(handler)
  tf_logger = logging.getLogger('tensorflow')  # TensorFlow gives its logger a stderr handler of its own when
  for own in [h for h in tf_logger.handlers if type(h) is logging.StreamHandler]:  # imported before absl's:
    tf_logger.removeHandler(own)  # its records reach the file and the terminal through the root logger instead.
  tf_logger.propagate = True
  if root.level > logging.INFO or root.level == logging.NOTSET:
    root.setLevel(logging.INFO)
  terminal = absl_logging.get_absl_handler()  # What prints log records on stderr (app.run puts it on root).
  if terminal not in root.handlers:
    root.addHandler(terminal)
  terminal.setLevel(logging.NOTSET if verbose else logging.WARNING)
  terminal.setFormatter(absl_logging.PythonFormatter() if verbose else _TerminalFormatter())
  for old in [f for f in terminal.filters if isinstance(f, _QuietFilter)]:
    terminal.removeFilter(old)
  if not verbose:
    terminal.addFilter(_QuietFilter())
  if _NATIVE_IMPORT_OUTPUT:
    with open(path, 'a', encoding='utf-8') as f:
      f.write(f'(native output while TensorFlow was imported)\n{_NATIVE_IMPORT_OUTPUT}\n')
  if announce:
    sys.stderr.write(f'Logs: {path}' + ('' if verbose else ' (--verbose shows them here)') + '\n')
  if not verbose:
    sys.unraisablehook = _unraisable_to_log
  _LOG_PATH.append(path)
  _REMOTE_LOG[:] = ([(path, fileio.join(workdir, LOGS_DIR, os.path.basename(path)))]
                    if workdir and fileio.is_remote(workdir) and not reads_only else [])
  return path


def _unraisable_to_log(unraisable) -> None:
  """After a failed checkpoint read, Orbax's reads still in flight end on its closed event loop, each printing
  'Event loop is closed' with a traceback (dozens on the terminal, under the one line that says what failed).
  Those go to the log file; any other unraisable exception is printed as Python would."""
  error = unraisable.exc_value
  if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
    logging.info('Ignored (a read still in flight when its event loop closed): %r in %r', error, unraisable.object)
    return
  sys.__unraisablehook__(unraisable)


_REMOTE_LOG = []  # (local file, gs:// copy) of a run with a gs:// workdir: the workers' disks go with the TPU.


def copy_log_to_workdir() -> None:
  """Copies the log file of a run with a gs:// workdir there (its entry point calls it on the way out).

  A failure is only reported: the run's own outcome stands.
  """
  for path, remote in _REMOTE_LOG:
    for handler in logging.getLogger().handlers:
      if isinstance(handler, _FileHandler):
        handler.flush()
    try:
      with open(path, 'rb') as f:
        fileio.write_bytes(remote, f.read())
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
      sys.stderr.write(f'warning: could not copy the log {path} to {remote}: {e}\n')


def exit_on_error(error: BaseException, prefix: str = 'Error', code: int = 1, show_log: bool = False) -> None:
  """Ends the process with `error` in one line (a setting or file to fix); its traceback goes to the log file.

  show_log: the line also names the log file (for errors that may be a bug, not a setting).
  """
  logging.info('Stopped on this error (the terminal shows its message only):', exc_info=error)
  where = f' (traceback: {_LOG_PATH[-1]})' if show_log and _LOG_PATH else ''
  sys.stderr.write(f'{prefix}: {error}{where}\n')
  sys.exit(code)


def progress_mode(requested: str | None = None, stream=None) -> str:
  """'bar', 'lines' or 'off': the --progress flag (or `requested`), 'auto' resolved for this process."""
  if requested is None:
    requested = FLAGS.progress if FLAGS.is_parsed() and 'progress' in FLAGS else 'auto'
  if jax.process_index() > 0:
    return 'off'
  if requested != 'auto':
    return requested
  stream = stream or sys.stderr
  return 'bar' if _terminal_columns(stream) >= _BAR_MIN_COLUMNS else 'lines'


_BAR_MIN_COLUMNS = 40  # Narrower (a pseudo-terminal that reports 0 columns, as `script` makes): lines.


def _terminal_columns(stream) -> int:
  """The width of the terminal `stream` writes to; 0 when it is not a terminal or reports no size.

  A terminal of 0 rows counts as none: tqdm would hide its bar there.
  """
  try:
    size = os.get_terminal_size(stream.fileno()) if stream.isatty() else None
  except (AttributeError, OSError, ValueError):  # No fileno (StringIO), or no size to read.
    return 0
  return size.columns if size and size.lines > 0 else 0


def _format(value) -> str:
  return f'{value:.4f}' if isinstance(value, float) and abs(value) < 1000 else f'{value:.4g}'


def format_metric(key: str, value: float) -> str:
  """An accuracy (a key ending in top1, top5, ... or accuracy) as a percentage, as the demo's summary shows it."""
  if re.search(r'(top\d+|accuracy)$', key) and 0.0 <= value <= 1.0:
    return f'{100 * value:.2f}%'
  if value.is_integer() and abs(value) >= 1000:  # A count (eval/num_examples): 10000, not 1e+04.
    return str(int(value))
  return _format(value)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}' if seconds >= 3600 else \
      f'{seconds // 60}:{seconds % 60:02d}'


class _AboveTheBar:
  """A stream for log records while a tqdm bar is drawn: each line is written above the bar, not into it."""

  def __init__(self, bar):
    self.bar = bar

  def write(self, text: str) -> None:
    if text.strip():
      self.bar.write(text.rstrip('\n'), file=self.bar.fp)

  def flush(self) -> None:
    self.bar.fp.flush()


class ProgressHook:
  """Training progress on stderr, called like clu's periodic actions: `hook(step)` after every step.

  `update_metrics(step, scalars)` at the loop's log periods and evaluations,
  `close()` when the loop ends (the bar stays on the terminal, complete):
  train/loss goes into the bar (or the line), each eval/* metric gets a line
  of its own that stays (so a run's kNN accuracy can be seen to rise).
  """

  def __init__(self, total_steps: int, start_step: int = 0, *, mode: str | None = None, stream=None):
    self.total_steps, self.start_step = int(total_steps), int(start_step)
    self.stream = stream or sys.stderr
    self.mode = progress_mode(mode, self.stream)
    self.step = self.start_step
    self.loss = None
    self._bar = None
    # The training rate is measured from (time, step) since the first step (its compile left out) or the last
    # evaluation; the evaluations' time, per step trained, goes into the ETA, as they recur.
    self._last = None
    self._step_time = time.time()  # When the newest step was handed to the device (or the loop last waited).
    self._evals = []  # (step, seconds) of each evaluation so far.
    self._log_stream = None  # The terminal log handler's stream while the bar is up.
    if self.mode == 'bar' and self.start_step < self.total_steps:
      # Steps are counted as they are dispatched; the rate and ETA (in the postfix) are updated at the log
      # periods, where the loop waits for the device, so they do not count steps still queued.
      self._bar = tqdm.tqdm(total=self.total_steps, initial=self.start_step, file=self.stream, unit='step',
                            dynamic_ncols=True, leave=True, desc='train',
                            bar_format='{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]')
      # Warnings logged meanwhile (a preemption notice, Orbax) get lines of their own above the bar.
      self._log_stream = absl_logging.get_absl_handler().python_handler.setStream(_AboveTheBar(self._bar))

  def __call__(self, step: int, t: float | None = None) -> None:
    del t  # clu's signature; the hook keeps its own clock.
    now = time.time()
    if self._last is None:  # The first step: its compile is not training speed.
      self._last = (now, step)
    if self._bar is not None and step > self.step:
      self._guarded(self._bar.update, step - self.step)
    self.step = max(self.step, step)
    self._step_time = now

  def _rate_and_eta(self, step: int) -> tuple[float, float] | None:
    """(steps/s of training, seconds left with the evaluations still to come), None before a rate exists."""
    now = time.time()
    if self._last is None:
      return None
    then, last_step = self._last
    if step <= last_step or now <= then:
      return None
    rate = (step - last_step) / (now - then)
    return rate, (self.total_steps - step) / rate + self._eval_seconds_left(step)

  def _eval_seconds_left(self, step: int) -> float:
    """The evaluations still to come (the one due at `step` too), each as long as the latest one.

    (The latest, not the mean: the first one also compiles.) They recur every `period` steps, read from
    the last two (or, in a run from step 0, the first), and the loop evaluates at the last step as well.
    """
    if not self._evals:
      return 0.0
    latest = self._evals[-1][1]
    steps = [s for s, _ in self._evals]
    period = steps[-1] - steps[-2] if len(steps) > 1 else (steps[0] if self.start_step == 0 else 0)
    if period <= 0:  # One evaluation after a resume: its share per step trained.
      return (self.total_steps - step) * latest / max(1, step - self.start_step)
    due = self.total_steps // period - (step - 1) // period  # Multiples of the period in [step, total].
    return latest * (due + (1 if self.total_steps % period else 0))

  def _speed(self, step: int) -> list[str]:
    """['R steps/s', 'ETA m:ss'] as far as measured; at the end no ETA (the bar stays on the terminal)."""
    measured = self._rate_and_eta(step)
    if not measured:
      return []
    return [f'{measured[0]:.2f} steps/s'] + ([f'ETA {_duration(measured[1])}'] if step < self.total_steps else [])

  def _postfix(self, step: int) -> str:
    return ', '.join(self._speed(step) + ([f'loss={_format(self.loss)}'] if self.loss is not None else []))

  def update_metrics(self, step: int, scalars: dict) -> None:
    """Shows the loss of `scalars` (train/loss) and writes a line for each eval/* metric."""
    if self.mode == 'off':
      return
    evals = {k: v for k, v in scalars.items() if k.startswith('eval/')}
    if 'train/loss' in scalars:  # The loop has waited for the device: the steps so far have run.
      self.loss = float(scalars['train/loss'])
      self._step_time = time.time()
      if self._bar is not None:
        self._guarded(self._bar.set_postfix_str, self._postfix(step), refresh=True)
      elif self.mode == 'lines':
        self._write(self._line(step))
    if evals:
      self._write(f'step {step}: ' + ', '.join(f'{k} {format_metric(k, float(v))}' for k, v in sorted(evals.items())))
      # The evaluation's time is not training speed: the rate restarts from here, and the ETA counts it.
      now = time.time()
      self._evals.append((step, max(0.0, now - self._step_time)))
      self._last = (now, step)
      self._step_time = now

  def _line(self, step: int) -> str:
    return ', '.join([f'step {step}/{self.total_steps}', f'loss {_format(self.loss)}'] + self._speed(step))

  def note(self, line: str) -> None:
    """A line of its own that stays on the terminal (not shown when progress is off)."""
    if self.mode != 'off':
      self._write(line)

  def _write(self, line: str) -> None:
    if self._bar is not None:
      self._guarded(self._bar.write, line, file=self.stream)
    elif self.mode != 'off':
      self._guarded(self._print, line)

  def _print(self, line: str) -> None:
    self.stream.write(line + '\n')
    self.stream.flush()

  def _guarded(self, fn, *args, **kwargs) -> None:
    try:
      fn(*args, **kwargs)
    except (BrokenPipeError, ValueError):  # Whoever read the terminal is gone (`| head`, a closed ssh session):
      if self._bar is not None:  # training goes on; the log file still gets everything.
        absl_logging.get_absl_handler().python_handler.setStream(self._log_stream)
      self.mode, self._bar = 'off', None

  def close(self) -> None:
    if self._bar is not None:
      absl_logging.get_absl_handler().python_handler.setStream(self._log_stream)
      self._bar.close()
      self._bar = None
