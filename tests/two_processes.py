"""Two-process jobs over loopback for the tests: a free port, and `command --process_id=i` run side by side."""

import contextlib
import socket
import subprocess
from collections.abc import Callable


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run(command: list[str], env: dict, cwd: str, log_dir, timeout: float,
        meanwhile: Callable[[], None] = lambda: None) -> tuple[list[int], list[str]]:
  """Runs `command --process_id=0` and `--process_id=1` (output to log files: a full pipe would stall them).

  `meanwhile()` runs in this process while they do. Returns their exit codes and outputs.
  """
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(open(str(log_dir / f'process_{i}.log'), 'w+b')) for i in range(2)]
    procs = [subprocess.Popen(command + [f'--process_id={i}'], env=env, cwd=cwd, stdout=logs[i],
                              stderr=subprocess.STDOUT) for i in range(2)]
    try:
      meanwhile()
      for p in procs:
        p.wait(timeout=timeout)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    outputs = []
    for log in logs:
      log.seek(0)
      outputs.append(log.read().decode())
  return [p.returncode for p in procs], outputs
