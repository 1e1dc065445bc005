"""A sweep's definition: its file's runs, their configs, and the checks made before any run starts.

`launch.sweep` runs what this module loads and checks (and re-exports it).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

import ml_collections

from configs import common as config_common
from launch.sweep_summary import DONE_MARKER, done_record
from mae_jax import config_tools, fileio

# ----------------------------------------------------------------------------
# The sweep.

@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep."""
  name: str
  overrides: dict[str, Any]
  workdir: str

  @property
  def override_args(self) -> list[str]:
    """The overrides as KEY=VALUE strings for launch.common.job_argv / launch.tpu."""
    return [f'{k}={config_common.override_to_text(v)}' for k, v in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A loaded sweep: its spec, base config spec, root and runs."""
  spec: str
  base: str
  root: str
  runs: tuple[Run, ...]

  def override_keys(self) -> list[str]:
    keys = []
    for run in self.runs:
      keys += [k for k in run.overrides if k not in keys]
    return keys


def load_sweep(spec: str, root: str, only: Sequence[str] = ()) -> Sweep:
  """Loads 'configs/sweeps/NAME.py[:ARGS]' and places its runs under root.

  Raises ValueError for a malformed sweep, an unknown --only name or an
  override key the base config lacks (naming close matches).
  """
  path, arg = config_common.split_spec(spec)
  try:
    module = config_common.load_module(path)
    if not hasattr(module, 'get_sweep'):
      raise ValueError(f'--sweep={spec}: {path} defines no get_sweep(arg)')
    raw = module.get_sweep() if arg is None else module.get_sweep(arg)
  except Exception as e:  # noqa: BLE001  A sweep file that fails: one line, not a traceback.
    raise _load_error(f'--sweep={spec}', path, e) from None
  config_common.check_sweep(raw)
  if not fileio.is_remote(root):
    root = os.path.abspath(root)
  runs = tuple(Run(r['name'], dict(r.get('overrides', {})), fileio.join(root, r['name']))
               for r in raw['runs'])
  sweep = Sweep(spec=spec, base=raw['base'], root=root, runs=runs)
  try:
    base_config = config_common.load_config(sweep.base)
  except Exception as e:  # noqa: BLE001  A base config that fails: one line, not a traceback.
    raise _load_error(f'base {sweep.base} of --sweep={spec}', config_common.split_spec(sweep.base)[0], e) from None
  for run in sweep.runs:
    try:
      config_common.check_keys(base_config, list(run.overrides))
      for key, value in run.overrides.items():
        _check_type(key, value, config_common.value_at(base_config, key))
    except ValueError as e:
      raise ValueError(f'sweep run {run.name!r} (base {sweep.base}): {e}') from None
  return select_runs(sweep, only)


def _load_error(what: str, path: str, error: Exception) -> Exception:
  """A sweep file or base config that failed to load, as one line: the file, the line, the error's type and message.

  load_module's own "not found" (a FileNotFoundError without a filename) and
  the ValueErrors raised here already say what is wrong and pass unchanged.
  """
  if isinstance(error, FileNotFoundError) and error.filename is None:
    return error
  if isinstance(error, ValueError) and str(error).startswith(what + ':'):
    return error
  name, message = type(error).__name__, ' '.join(str(error).split()) or '(no message)'
  if isinstance(error, SyntaxError):  # Names the file it is in (also a module the file imports).
    where, message = f'{error.filename or path}, line {error.lineno}', ' '.join(str(error.msg).split())
  else:  # The innermost line of the file itself (a call into a helper that raised, say).
    local = path if os.path.isabs(path) or os.path.isfile(path) else os.path.join(config_common.REPO_ROOT, path)
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(local)]
    where = f'{path}, line {lines[-1]}' if lines else path
  return ValueError(f'{what}: {where}: {name}: {message}')


def select_runs(sweep: Sweep, only: Sequence[str] = ()) -> Sweep:
  """The sweep with only the runs named in `only` (all when empty); an unknown name is a ValueError."""
  if not only:
    return sweep
  names = [r.name for r in sweep.runs]
  missing = [n for n in only if n not in names]
  if missing:
    raise ValueError('--only: ' + '; '.join(config_common.unknown_key_message(n, names, 'run') for n in missing))
  return dataclasses.replace(sweep, runs=tuple(r for r in sweep.runs if r.name in only))


def _check_type(key: str, value, base) -> None:
  """An override reaches the trainer as --config.KEY=TEXT, which it reads as the base value's type."""
  if isinstance(base, ml_collections.ConfigDict):
    raise ValueError(f'{key} is a group of settings: override its keys one by one ({key}.NAME), or the rest of '
                     'the group would be dropped')
  if base is None:
    return
  sequences = (tuple, list)
  fits = (isinstance(value, bool) == isinstance(base, bool)
          and (isinstance(value, type(base)) or (isinstance(base, float) and isinstance(value, int))
               or (isinstance(base, sequences) and isinstance(value, sequences))))
  if not fits:
    raise ValueError(f'{key}={value!r} is a {type(value).__name__}, but the base config\'s {key} is a '
                     f'{type(base).__name__} ({base!r}): the trainer reads --config.{key} as one (a value of '
                     'another type belongs in a config file)')


def run_config(sweep: Sweep, run: Run):
  """The resolved config of one run: the base config with the run's overrides."""
  return config_common.set_overrides(config_common.load_config(sweep.base), run.overrides)


def run_settings(sweep: Sweep, run: Run, trainer_args: Sequence[str] = ()) -> dict:
  """What makes a run what it is: the base config, its overrides and the trainer flags after `--`."""
  return {'base': sweep.base, 'overrides': run.override_args, 'trainer_args': list(trainer_args)}


def mark_done(run: Run, result: dict, settings: dict) -> None:
  """Writes ROOT/NAME/DONE: the step and time the run finished, and its settings."""
  record = {'step': result.get('step'), 'finished': datetime.datetime.now().isoformat(timespec='seconds'),
            **settings}
  fileio.write_text(fileio.join(run.workdir, DONE_MARKER), json.dumps(record) + '\n')


def check_done_runs(sweep: Sweep, trainer_args: Sequence[str]) -> None:
  """Raises ValueError when a finished run of this root ran other settings than the sweep now gives it.

  Skipping it would report the old run's results as the new settings'.
  """
  problems = []
  for run in sweep.runs:
    record, now = done_record(run), run_settings(sweep, run, trainer_args)
    changed = [f'{key} {record[key]} -> {now[key]}' for key in now if record and key in record
               and record[key] != now[key]]
    if changed:
      problems.append(f'{run.workdir} finished with other settings ({"; ".join(changed)})')
  if problems:
    raise ValueError(
        '; '.join(problems) + '. Nothing was run. To keep those results: use another --root for the new settings '
        '(each run starts from scratch there), or put the old settings back. To continue such a run from its '
        f'last checkpoint with the new settings (more steps, say), remove only its {DONE_MARKER} file: the sweep '
        'then resumes it, and the steps it already ran keep the old settings (the trainer refuses another seed, '
        'batch_size or data set unless --config.resume_allow_changes=True). Deleting the workdir discards its '
        'results and starts it again')


def check_trainer_args(sweep: Sweep, trainer_args: Sequence[str]) -> None:
  """Flags after `--` may not set what the sweep sets per run (--workdir, --config, a swept key)."""
  swept = set(sweep.override_keys())
  for arg in trainer_args:
    name = arg.split('=', 1)[0]
    if name in ('--workdir', '--config'):
      raise ValueError(f'{arg} after `--`: the sweep sets {name} for each run')
    if name.startswith('--config.') and name[len('--config.'):] in swept:
      raise ValueError(f'{arg} after `--`: the sweep sets {name[len("--config."):]} per run (the runs\' names '
                       'and the summary say its values); change it in the sweep file instead')
  config_tools.check_config_flags(['sweep', f'--config={sweep.base}', *trainer_args])
  _check_trainer_values(sweep.base, trainer_args)


def _check_trainer_values(base: str, trainer_args: Sequence[str]) -> None:
  """Each --config.KEY=VALUE (or --config.KEY VALUE) after `--` must read as the base value's type.

  The trainer reads it so; a value it cannot read (--config.seed=abc) would
  fail every run of the sweep, so it is refused before any run starts. The
  keys exist (check_config_flags ran first).
  """
  config = config_common.load_config(base)
  args = list(trainer_args)
  for i, arg in enumerate(args):
    match = re.fullmatch(r'--?config\.([^=]+)(?:=(.*))?', arg, re.DOTALL)
    if not match:
      continue
    key, text, shown = match.group(1), match.group(2), arg
    try:
      current = config_common.value_at(config, key)
    except (KeyError, AttributeError, TypeError):
      continue  # Not a leaf this check can read; the trainer says what is wrong.
    if text is None:  # A bare --config.FLAG sets a bool; any other key takes the next argument as its value.
      if isinstance(current, bool) or i + 1 >= len(args):
        continue
      text, shown = args[i + 1], f'{arg} {args[i + 1]}'
    try:
      config_common.set_overrides(config, {key: config_common.parse_override(text, current)})
    except (ValueError, TypeError) as e:
      raise ValueError(f'{shown} after `--`: {" ".join(str(e).split())} (the base config\'s {key} is '
                       f'{current!r}); the trainer could not read it, so no run would start') from None
