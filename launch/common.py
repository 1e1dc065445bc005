"""Shared pieces of the launchers: a command Runner, safe quoting, job argv.

Every launcher builds commands as argv lists (never shell strings) and hands
them to a `Runner`. A dry-run Runner prints each command on one line, quoted
with `shlex.join`, and runs nothing; a real Runner uses `subprocess` with an
argv list and never `shell=True`. Both record what they were asked to do, so
tests drive the same code path the CLI uses and inspect `runner.commands`.

Example:

  runner = Runner(dry_run=True)
  runner.run(['gcloud', 'compute', 'tpus', 'tpu-vm', 'list', '--zone=us-central2-b'])
  # prints: gcloud compute tpus tpu-vm list --zone=us-central2-b
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

# Printed by the remote job wrapper after the trainer exits with status 0.
SUCCESS_MARKER = 'MAE_JAX_JOB_SUCCEEDED'
# Printed by the remote job wrapper with the trainer's exit status, e.g. MAE_JAX_JOB_EXIT=75.
EXIT_MARKER = 'MAE_JAX_JOB_EXIT='
_EXIT_LINE = re.compile(re.escape(EXIT_MARKER) + r'(\d+)')

# mae_jax.main's exit statuses (tests/test_launch.py checks that they agree; importing
# mae_jax.main here would load jax and TensorFlow into every launcher).
PREEMPTED_EXIT_CODE = 75  # Saved and stopped early (SIGTERM, preemption): rerun to resume.
NONFINITE_EXIT_CODE = 65  # Halted on non-finite losses: a rerun would diverge again; never retried.
CONFIG_EXIT_CODE = 78  # A setting or file to fix (the trainer said which): a rerun fails the same way; never retried.
USAGE_EXIT_CODE = 2  # The trainer refused its command line (absl): never retried either.

_ENV_NAME = re.compile(r'[A-Za-z_][A-Za-z0-9_]*')
_CONFIG_KEY = re.compile(r'[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*')


class LaunchError(RuntimeError):
  """A launch step failed (a command exited non-zero, retries ran out, ...)."""
  exit_code = 1


class Preempted(LaunchError):
  """The retries ran out while the TPU kept being preempted: rerun the same command later to resume."""
  exit_code = PREEMPTED_EXIT_CODE


class NonFiniteHalt(LaunchError):
  """The trainer halted on non-finite losses; relaunching would repeat it, so nothing retries."""
  exit_code = NONFINITE_EXIT_CODE


@dataclasses.dataclass(frozen=True)
class StreamResult:
  """Outcome of one streamed command."""
  returncode: int
  # How many times the success marker appeared in the command's output.
  marker_count: int
  # The trainer exit statuses that workers reported (EXIT_MARKER lines), in order.
  exit_codes: tuple[int, ...] = ()


class Runner:
  """Runs commands, or prints them in dry-run mode; records them either way.

  Attributes:
    dry_run: print instead of run.
    commands: every command asked for, in order, as tuples of strings.
  """

  def __init__(self, dry_run: bool = False, out: TextIO | None = None):
    self.dry_run = dry_run
    self._out = out
    self.commands: list[tuple[str, ...]] = []
    self._lock = threading.Lock()

  @property
  def out(self) -> TextIO:
    # Resolved late so that pytest's capsys and redirections see the output.
    return self._out if self._out is not None else sys.stdout

  def echo(self, text: str) -> None:
    """Writes text (plus a newline) to the output stream."""
    with self._lock:
      self.out.write(text + '\n')
      self.out.flush()

  def _record(self, argv: Sequence[str]) -> tuple[str, ...]:
    command = tuple(argv)
    if not command or not all(isinstance(a, str) for a in command):
      raise TypeError(f'commands must be non-empty sequences of str, got {argv!r}')
    self.commands.append(command)
    if self.dry_run:
      self.echo(shlex.join(command))
    return command

  def run(self, argv: Sequence[str], check: bool = True) -> int:
    """Runs one command to completion; output goes straight to the terminal.

    Args:
      argv: the command.
      check: raise LaunchError when it exits non-zero.

    Returns:
      The exit status (0 in dry-run mode).
    """
    command = self._record(argv)
    if self.dry_run:
      return 0
    returncode = self._call(command)
    if check and returncode != 0:
      raise LaunchError(f'command failed with exit status {returncode}: {shlex.join(command)}')
    return returncode

  def capture(self, argv: Sequence[str], dry_run_stdout: str = '') -> tuple[int, str]:
    """Runs one command and returns (exit status, stripped stdout).

    In dry-run mode the command is printed and `(0, dry_run_stdout)` returned,
    so callers follow the path they would take when all goes well.
    """
    command = self._record(argv)
    if self.dry_run:
      return 0, dry_run_stdout
    returncode, stdout = self._call_capture(command)
    return returncode, stdout.strip()

  def stream(self, argvs: Sequence[Sequence[str]], labels: Sequence[str] | None = None,
             marker: str = SUCCESS_MARKER, dry_run_markers: int = 1) -> list[StreamResult]:
    """Runs commands in parallel, streaming their output with a label per line.

    Args:
      argvs: the commands; they are started together and all waited for.
      labels: prefix for each command's output lines; defaults to none.
      marker: text whose occurrences are counted in each command's output.
      dry_run_markers: marker count reported per command in dry-run mode.

    Returns:
      One StreamResult per command, in order.
    """
    commands = [self._record(argv) for argv in argvs]
    if self.dry_run:
      return [StreamResult(0, dry_run_markers) for _ in commands]
    labels = list(labels) if labels is not None else [''] * len(commands)
    if len(labels) != len(commands):
      raise ValueError(f'got {len(labels)} labels for {len(commands)} commands')
    return self._call_stream(commands, labels, marker)

  def sleep(self, seconds: float) -> None:
    """Waits (polling, backoff); a dry run does not wait."""
    if not self.dry_run and seconds > 0:
      time.sleep(seconds)

  # The three methods below are the only ones that start processes. Tests
  # override them to check real-mode behaviour without running anything.

  def _call(self, command: tuple[str, ...]) -> int:
    try:
      return subprocess.run(list(command), check=False).returncode
    except FileNotFoundError as e:
      raise LaunchError(_not_found(command)) from e

  def _call_capture(self, command: tuple[str, ...]) -> tuple[int, str]:
    try:
      done = subprocess.run(list(command), check=False, capture_output=True, text=True)
    except FileNotFoundError as e:
      raise LaunchError(_not_found(command)) from e
    if done.returncode != 0 and done.stderr:
      self.echo(done.stderr.rstrip())
    return done.returncode, done.stdout

  def _call_stream(self, commands: Sequence[tuple[str, ...]], labels: Sequence[str],
                   marker: str) -> list[StreamResult]:
    processes = []
    try:
      for command in commands:
        try:
          processes.append(subprocess.Popen(
              list(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
              text=True, errors='replace', bufsize=1))
        except FileNotFoundError as e:
          raise LaunchError(_not_found(command)) from e
      counts = [0] * len(processes)
      exit_codes = [[] for _ in processes]

      def pump(index: int) -> None:
        prefix = f'[{labels[index]}] ' if labels[index] else ''
        for line in processes[index].stdout:
          counts[index] += line.count(marker)
          exit_codes[index] += [int(code) for code in _EXIT_LINE.findall(line)]
          self.echo(prefix + line.rstrip('\n'))

      threads = [threading.Thread(target=pump, args=(i,), daemon=True)
                 for i in range(len(processes))]
      for thread in threads:
        thread.start()
      for process, thread in zip(processes, threads):
        process.wait()
        thread.join()
      return [StreamResult(p.returncode, c, tuple(e)) for p, c, e in zip(processes, counts, exit_codes)]
    finally:
      # On Ctrl-C or an error, stop the processes this call started.
      for process in processes:
        if process.poll() is None:
          process.terminate()


@contextlib.contextmanager
def stop_signals_interrupt():
  """SIGTERM and SIGHUP (a CI timeout, a closed terminal) stop the launcher as Ctrl-C does.

  So its cleanup runs: the ssh commands it started are stopped and the TPU is
  deleted, where the default action would end the process and leave the TPU
  running. The former handlers come back on exit.
  """
  def interrupt(signum, frame):
    del frame
    raise KeyboardInterrupt(f'signal {signal.Signals(signum).name}')

  previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _not_found(command: Sequence[str]) -> str:
  return (f'{command[0]!r} was not found on PATH; install it, or pass --dry_run to print '
          'the commands instead of running them.')


def parse_env(items: Sequence[str], flag: str = '--env') -> list[tuple[str, str]]:
  """Parses NAME=VALUE environment settings; the value may contain anything."""
  pairs = []
  for item in items:
    name, sep, value = item.partition('=')
    if not sep or not _ENV_NAME.fullmatch(name):
      raise ValueError(f'{flag}={item!r}: expected NAME=VALUE with NAME matching '
                       '[A-Za-z_][A-Za-z0-9_]*')
    pairs.append((name, value))
  return pairs


def config_override_args(items: Sequence[str], flag: str = '--override') -> list[str]:
  """Turns KEY=VALUE overrides into `--config.KEY=VALUE` trainer flags."""
  args = []
  for item in items:
    key, sep, value = item.partition('=')
    key = key.removeprefix('config.')
    if not sep or not _CONFIG_KEY.fullmatch(key):
      raise ValueError(f'{flag}={item!r}: expected KEY=VALUE with a dotted config key, '
                       'e.g. optim.base_lr=1.5e-4')
    args.append(f'--config.{key}={value}')
  return args


def job_argv(python: str, config: str, workdir: str, overrides: Sequence[str] = (),
             extra_args: Sequence[str] = (), env: Sequence[tuple[str, str]] = ()) -> list[str]:
  """The trainer command as an argv list, optionally prefixed with `env K=V`."""
  if not config:
    raise ValueError('--config is required to run a job, e.g. --config=configs/default.py')
  if not workdir:
    raise ValueError('--workdir is required to run a job, e.g. --workdir=gs://bucket/mae/run1')
  argv = [python, '-m', 'mae_jax.main', f'--config={config}', f'--workdir={workdir}']
  argv += config_override_args(overrides)
  argv += list(extra_args)
  if env:
    argv = ['env', *(f'{k}={v}' for k, v in env), *argv]
  return argv


def check_job_config(config: str, overrides: Sequence[str] = (), extra_args: Sequence[str] = (),
                     source_dir: str = '.', git_ref: str | None = None) -> None:
  """Reads the trainer's config and its --config.KEY flags here, as mae_jax.main will on the workers.

  A typo in a key or value, a config argument that does not exist, or (with
  `git_ref`) a config file the workers will not get because it is not
  committed there, is a ValueError before any machine is paid for.
  """
  from configs import common as config_common  # pylint: disable=g-import-not-at-top
  path, _ = config_common.split_spec(config)
  if git_ref is not None:
    inside = os.path.relpath(os.path.abspath(os.path.join(source_dir, path)), os.path.abspath(source_dir))
    tracked = not inside.startswith('..') and not os.path.isabs(path) and subprocess.run(
        ['git', '-C', source_dir, 'cat-file', '-e', f'{git_ref}:{inside}'], capture_output=True,
        check=False).returncode == 0
    if not tracked:
      raise ValueError(f'--config={config}: {path} is not committed at --git_ref={git_ref} of --source_dir='
                       f'{source_dir}, and the workers get that commit only: commit it (or give a config '
                       'file that is)')
  local = os.path.join(source_dir, path) if not os.path.isabs(path) else path
  spec = config.replace(path, local, 1) if os.path.exists(local) else config
  from mae_jax import config_tools  # pylint: disable=g-import-not-at-top
  items = [str(item).removeprefix('config.') for item in overrides]
  # Values are checked in the --config.KEY=VALUE form; every spelling's key (--config.KEY VALUE, a bare
  # --config.FLAG, --noconfig.FLAG) is checked to exist.
  items += [arg[len('--config.'):] for arg in extra_args if arg.startswith('--config.') and '=' in arg]
  _, keys = config_tools.config_flag_overrides(list(extra_args))
  try:
    loaded = config_common.load_config(spec)
    config_common.check_keys(loaded, keys)
    config_common.set_overrides(loaded, items)
  except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
    raise ValueError(f'--config={config}: {" ".join(str(e).split())}') from None


def split_passthrough(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Splits `launcher flags -- trainer flags` at the first bare `--`."""
  argv = list(argv)
  if '--' in argv:
    i = argv.index('--')
    return argv[:i], argv[i + 1:]
  return argv, []


def add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
  """Adds `--name` and, when it has underscores, the `--name-with-dashes` alias."""
  spellings = [f'--{name}']
  if '_' in name:
    spellings.append('--' + name.replace('_', '-'))
  parser.add_argument(*spellings, dest=name, **kwargs)
