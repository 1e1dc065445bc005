"""Config files as data: load `FILE.py[:ARGS]`, list and check dotted keys, check --config.KEY flags.

The package's entry points (`mae_jax.main`) and the config helpers
(`configs/common.py`, the sweep launcher) share these, so a key that does not
exist is reported the same way everywhere: naming its close matches, before
anything is built or compiled.
"""

import difflib
import functools
import importlib.util
import os
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags

# Config files are looked up relative to the cwd, then to the repository root (mae_jax's parent).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ConfigError(ValueError):
  """A setting that cannot work: rerunning with the same config fails the same way (mae_jax.main exits 78)."""


def settings_check(check):
  """Marks `check` as a check of settings: the ValueErrors it raises become ConfigErrors (same message)."""

  @functools.wraps(check)
  def checked(*args, **kwargs):
    try:
      return check(*args, **kwargs)
    except ConfigError:
      raise
    except ValueError as e:
      raise ConfigError(str(e)) from e

  return checked


def unknown_key_message(key: str, known: Sequence[str], what: str = 'key') -> str:
  """'unknown key 'x'; close matches: ...' naming the allowed keys when none is close."""
  close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
  if close:
    return f'unknown {what} {key!r}; close matches: {", ".join(close)}'
  return f'unknown {what} {key!r}; known: {", ".join(sorted(known))}'


def config_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  """Every dotted key of a config, nested ConfigDicts and their leaves alike."""
  keys = []
  for name, value in config.items():
    key = prefix + name
    keys.append(key)
    if isinstance(value, ml_collections.ConfigDict):
      keys += config_keys(value, key + '.')
  return keys


def check_keys(config: ml_collections.ConfigDict, keys: Sequence[str]) -> None:
  """Raises ValueError naming each key that `config` lacks and its close matches."""
  known = config_keys(config)
  known_set = set(known)
  problems = [unknown_key_message(k, known, 'config key') for k in keys if k not in known_set]
  if problems:
    raise ValueError('; '.join(problems))


def load_module(path: str):
  """Loads a Python file by path (relative to the cwd, then to the repository root)."""
  candidates = [path] if os.path.isabs(path) else [path, os.path.join(REPO_ROOT, path)]
  for candidate in candidates:
    if os.path.isfile(candidate):
      name = '_mae_jax_config_' + re.sub(r'\W', '_', os.path.abspath(candidate))
      spec = importlib.util.spec_from_file_location(name, candidate)
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      return module
  raise FileNotFoundError(f'config file {path!r} not found (looked in {", ".join(candidates)})')


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/x.py:a=1' -> ('configs/x.py', 'a=1'); no colon -> (spec, None)."""
  path, sep, arg = spec.partition(':')
  return path, (arg if sep else None)


def load_config(spec: str) -> ml_collections.ConfigDict:
  """`get_config(ARGS)` of 'FILE.py[:ARGS]', called as ml_collections.config_flags calls it."""
  path, arg = split_spec(spec)
  module = load_module(path)
  return module.get_config() if arg is None else module.get_config(arg)


def config_flag_overrides(argv: Sequence[str], name: str = 'config') -> tuple[str | None, list[str]]:
  """(the --config value, the keys of its --config.KEY overrides) found in argv."""
  spec, keys = None, []
  flag = re.compile(rf'^--?(no)?{re.escape(name)}\.([^=]+)')
  args = list(argv)
  for i, arg in enumerate(args):
    if arg.startswith((f'--{name}=', f'-{name}=')):
      spec = arg.split('=', 1)[1]
    elif arg in (f'--{name}', f'-{name}') and i + 1 < len(args):
      spec = args[i + 1]
    else:
      match = flag.match(arg)
      if match:
        keys.append(match.group(2))
  return spec, keys


def check_config_flags(argv: Sequence[str], name: str = 'config') -> None:
  """Raises ValueError, naming close matches, for any --config.KEY that the config lacks.

  ml_collections.config_flags itself fails on an unknown key with a traceback
  from inside flag parsing that suggests at most one spelling; this check runs
  first and lists the close matches of every unknown key at once.
  """
  spec, keys = config_flag_overrides(argv, name)
  if spec is None:
    return
  try:
    config = load_config(spec)
  except FileNotFoundError:
    return  # config_flags reports a missing file in its own words.
  except ValueError as e:  # A bad FILE.py:ARGS argument (a typo, a variant that does not exist).
    raise ValueError(f'--{name}={spec}: {" ".join(str(e).split())}') from None
  except (AttributeError, KeyError, TypeError, ImportError, SyntaxError) as e:  # A config file that fails.
    raise ValueError(f'--{name}={spec}: the config file failed: {type(e).__name__}: '
                     f'{" ".join(str(e).split())}') from None
  if keys and isinstance(config, ml_collections.ConfigDict):
    try:
      check_keys(config, keys)
    except ValueError as e:
      raise ValueError(f'--{name}={spec}: {e}') from None


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl `flags_parser` of every entry point that takes --config: one clear line for a bad flag.

  An unknown --config.KEY is named with its close matches before ml_collections
  reads the config file; any other bad flag or override value ends the same way
  (exit code 2), not with a traceback from inside flag parsing.
  """
  try:
    check_config_flags(argv)
  except (AttributeError, KeyError, TypeError, ValueError, ImportError, SyntaxError) as e:
    sys.stderr.write(f'error: {" ".join(str(e).split()) or type(e).__name__}\n')
    sys.exit(2)
  try:
    rest = flags.FLAGS(argv)
    failed = getattr(flags.FLAGS['config'].value, '_error', None) if 'config' in flags.FLAGS else None
    if failed is not None:  # A config file that did not load says so now, not at its first use.
      sys.stderr.write(f'error: --config: {" ".join(str(failed).split())}\n')
      sys.exit(2)
    return rest
  except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
    message = str(e).strip().strip('\'"').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
    overrides = [a.split('=', 1)[0] for a in argv[1:] if a.startswith('--config.')]
    sys.stderr.write(f'error: bad flags {overrides or list(argv[1:])}: {message}\n')
    sys.exit(2)
