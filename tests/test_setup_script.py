""".ci/setup's choice of interpreter: JAX needs Python 3.11+, and Ubuntu 22.04 (TPU VM images) has 3.10."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_PYTHON = '#!/bin/sh\ncase "$*" in *version_info*) exit 1 ;; --version) echo "Python 3.10.12" ;; esac\n'


def _bin(tmp_path, **programs):
  """A PATH folder with the tools the script needs and `programs` (name: script text, or a path to link)."""
  folder = tmp_path / 'bin'
  folder.mkdir()
  for tool in ('dirname', 'id'):
    os.symlink(f'/usr/bin/{tool}', folder / tool)
  for name, program in programs.items():
    target = folder / name.replace('_', '.')
    if program.startswith('#!'):
      target.write_text(program)
      target.chmod(0o755)
    else:
      os.symlink(program, target)
  return str(folder)


def _print_python(path, **env):
  return subprocess.run(['/bin/bash', os.path.join(REPO, '.ci', 'setup'), '--print-python'], capture_output=True,
                        text=True, timeout=60, env={'PATH': path, **env})


def test_an_old_python3_gives_way_to_a_python3_11_on_path(tmp_path):
  done = _print_python(_bin(tmp_path, python3=OLD_PYTHON, python3_11=sys.executable))
  assert (done.returncode, done.stdout.strip()) == (0, 'python3.11'), done.stderr


def test_without_any_python_3_11_the_error_says_what_to_install(tmp_path):
  done = _print_python(_bin(tmp_path, python3=OLD_PYTHON))  # No apt-get either: nothing to install with.
  assert done.returncode == 1 and done.stdout == ''
  assert 'Python 3.10.12: JAX needs Python 3.11+; installing python3.11' in done.stderr
  assert 'rerun with PYTHON=/path/to/python3.11 bash .ci/setup' in done.stderr


def test_python_chosen_by_the_user_must_be_recent(tmp_path):
  path = _bin(tmp_path, old=OLD_PYTHON)
  done = _print_python(path, PYTHON=os.path.join(path, 'old'))
  assert done.returncode == 1 and 'is not Python 3.11+ (Python 3.10.12)' in done.stderr
  assert _print_python(path, PYTHON=sys.executable).stdout.strip() == sys.executable
