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
from ml_collections import config_flags

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


def config_candidates(path: str) -> list[str]:
  """Where a config file `path` is looked for: as given (relative to the cwd), then under the repository root."""
  if os.path.isabs(path):
    return [path]
  in_repo = os.path.join(REPO_ROOT, path)
  return [path] if os.path.abspath(path) == os.path.abspath(in_repo) else [path, in_repo]


def find_config_file(path: str) -> str:
  """The file `path` names (relative to the cwd, then to the repository root); FileNotFoundError naming both."""
  candidates = config_candidates(path)
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  looked = ' and '.join(os.path.abspath(c) for c in candidates)
  raise FileNotFoundError(f'config file {path!r} not found (looked for {looked})')


def load_module(path: str):
  """Loads a Python file by path (relative to the cwd, then to the repository root)."""
  candidate = find_config_file(path)
  name = '_mae_jax_config_' + re.sub(r'\W', '_', os.path.abspath(candidate))
  spec = importlib.util.spec_from_file_location(name, candidate)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


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


# ml_collections' error for a new key in a locked ConfigDict: the key, then the fields present.
_LOCKED_KEY = re.compile(r'Key "(\w+)" does not exist and cannot be added since the config is locked\. '
                         r'Other fields present: (.*)', re.S)


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
    find_config_file(split_spec(spec)[0])
  except FileNotFoundError as e:  # (The file names the flag's value.)
    raise ValueError(f'--{name}: {e}') from None
  try:
    config = load_config(spec)
  except ValueError as e:  # A bad FILE.py:ARGS argument (a typo, a variant that does not exist).
    raise ValueError(f'--{name}={spec}: {" ".join(str(e).split())}') from None
  except AttributeError as e:
    locked = _LOCKED_KEY.search(str(e))
    if locked:  # The recipes lock their keys: a config file that sets an undeclared one (a typo).
      known = re.findall(r"\\?'(\w+)\\?': ", locked.group(2))
      raise ValueError(f'--{name}={spec}: the config file sets a key its base config does not declare: '
                       f'{unknown_key_message(locked.group(1), known)} (configs/default.py and the recipes '
                       'declare every key)') from None
    raise ValueError(f'--{name}={spec}: the config file failed: {type(e).__name__}: '
                     f'{" ".join(str(e).split())}') from None
  except (KeyError, TypeError, ImportError, SyntaxError, OSError) as e:  # A config file that fails.
    raise ValueError(f'--{name}={spec}: the config file failed: {type(e).__name__}: '
                     f'{" ".join(str(e).split())}') from None
  if keys and isinstance(config, ml_collections.ConfigDict):
    try:
      check_keys(config, keys)
    except ValueError as e:
      raise ValueError(f'--{name}={spec}: {e}') from None


def resolve_config_flag(argv: Sequence[str], name: str = 'config') -> list[str]:
  """argv with a --config FILE that is not under the cwd but is under the repository root made absolute.

  ml_collections' flag opens FILE relative to the cwd only; `load_module` (and so
  the launchers' checks) also looks under the repository root. This makes the
  flag look where they do, so a command accepted by one is accepted by the other.
  """
  def resolved(spec: str) -> str:
    path, arg = split_spec(spec)
    if not path or os.path.isabs(path) or os.path.isfile(path):
      return spec
    in_repo = os.path.join(REPO_ROOT, path)
    if not os.path.isfile(in_repo):
      return spec
    return in_repo + ('' if arg is None else ':' + arg)

  args = list(argv)
  for i, arg in enumerate(args):
    if i == 0:
      continue
    if arg.startswith((f'--{name}=', f'-{name}=')):
      flag, spec = arg.split('=', 1)
      args[i] = f'{flag}={resolved(spec)}'
    elif arg in (f'--{name}', f'-{name}') and i + 1 < len(args):
      args[i + 1] = resolved(args[i + 1])
  return args


def _unquote(text: str) -> str:
  """'abc' -> abc, "'abc'" -> abc: the quotes str(KeyError(...)) adds, in pairs only."""
  while len(text) >= 2 and text[0] == text[-1] and text[0] in '\'"':
    text = text[1:-1]
  return text


def flag_error_message(error: BaseException, argv: Sequence[str]) -> str:
  """One line for an error from flag parsing, naming the offending flag(s) only."""
  cause = error.__cause__ or error.__context__
  message = str(error)
  if isinstance(cause, ValueError) and len(cause.args) > 1:  # ('Non-boolean argument to boolean flag', 'x')
    message = message.replace(str(cause), ': '.join(str(a) for a in cause.args))
  message = _unquote(' '.join(message.replace('\\n', ' ').split()))
  required = re.findall(r'Flag (--\S+) must have a value other than None', message)
  if required:
    return f'{" and ".join(required)} {"is" if len(required) == 1 else "are"} required'
  if isinstance(error, flags.Error):  # absl's messages name the flag and its value.
    return message or type(error).__name__
  # Another error (a config key's KeyError, say): name the flags that mention what it is about.
  named = [a for a in argv[1:] if a.startswith('-') and message and message in a.split('=', 1)[0]]
  text = f'{type(error).__name__}: {message}' if message else type(error).__name__
  return f'{" ".join(named)}: {text}' if named else text


def _flag_file_failed(error: flags.Error) -> None:
  """Exits 2 with one line for a --flagfile that cannot be read."""
  message = ' '.join(str(error).split())
  sys.stderr.write(f'error: --flagfile: {message.removeprefix("ERROR:: ")}\n')
  sys.exit(2)


def define_config_flag(help_text: str, lock_config: bool) -> None:
  """The entry points' --config flag (ml_collections' config file flag).

  ml_collections reads --flagfile files while it defines the flag (to find
  --config.KEY overrides in them): one that cannot be read is one line and
  exit code 2 here, as in `parse_flags`.
  """
  try:
    config_flags.DEFINE_config_file('config', None, help_text, lock_config=lock_config)
  except flags.Error as e:
    _flag_file_failed(e)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl `flags_parser` of every entry point that takes --config: one clear line for a bad flag.

  An unknown --config.KEY is named with its close matches before ml_collections
  reads the config file, and a config file that does not exist is named with
  where it was looked for (the cwd, then the repository root, as `load_module`
  does); any other bad flag or override value ends the same way (exit code 2),
  not with a traceback from inside flag parsing.
  """
  flag_values = flags.FLAGS
  try:  # A --config in a --flagfile is checked and looked for as one on the command line.
    argv = [*argv[:1], *flag_values.read_flags_from_files(list(argv[1:]), force_gnu=False)]
  except flags.Error as e:
    _flag_file_failed(e)
  try:
    check_config_flags(argv)
  except (AttributeError, KeyError, TypeError, ValueError, ImportError, SyntaxError) as e:
    sys.stderr.write(f'error: {" ".join(str(e).split()) or type(e).__name__}\n')
    sys.exit(2)
  argv = resolve_config_flag(argv)

  def load_error():
    return getattr(flag_values['config'].value, '_error', None) if 'config' in flag_values else None

  try:
    rest = flag_values(argv)
  except (AttributeError, KeyError, TypeError, ValueError, OSError, flags.Error) as e:
    failed = load_error()
    message = f'--config: {" ".join(str(failed).split())}' if failed is not None else flag_error_message(e, argv)
    sys.stderr.write(f'error: {message}\n')
    sys.exit(2)
  failed = load_error()
  if failed is not None:  # A config file that did not load says so now, not at its first use.
    sys.stderr.write(f'error: --config: {" ".join(str(failed).split())}\n')
    sys.exit(2)
  return rest
