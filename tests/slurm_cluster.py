r"""A one-node SLURM cluster on 127.0.0.1, to run the SLURM launcher against the real scheduler.

tests/test_slurm_real.py brings one up for its session; by hand (as root):

  python -m tests.slurm_cluster /tmp/slurm-local   # prints `export SLURM_CONF=...`; Ctrl-C stops it

What it does:
  * installs Debian's `slurm-wlm` and `munge` with apt-get where the daemons are
    missing (root only, like .ci/setup installs Debian packages);
  * writes slurm.conf, gres.conf and a munge key into its directory: one node,
    `localhost` at 127.0.0.1, with this machine's CPUs (at least 2) and memory
    and two stand-in GPUs (GRES over empty files, so `--gpus-per-node=2` is
    scheduled as on a GPU cluster; the jobs themselves run JAX on CPU), one
    partition, select/cons_tres, requeue allowed, no cgroups
    (proctrack/linuxproc, task/none), state and spool inside the directory,
    free ports picked at start;
  * starts munged, slurmctld and slurmd as child processes in the foreground
    and waits until `sinfo` shows the node idle; `stop()` cancels what is left
    in the queue and ends exactly those three processes, by pid.

Nothing but 127.0.0.1 is contacted. Where SLURM cannot be installed or started,
`Unavailable` says why (tests skip with that reason).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time

PACKAGES = ('slurm-wlm', 'munge')
DAEMONS = ('munged', 'slurmctld', 'slurmd')
CLIENTS = ('sbatch', 'srun', 'scontrol', 'scancel', 'squeue', 'sinfo')
NODE = 'localhost'
PARTITION = 'debug'
GPUS = 2  # Stand-in GPUs on the node (GRES entries; no device behind them).
# Seconds a requeued job waits before it may start again. Slurm's default is
# AuthInfo's cred_expire, 120 s; a test cluster need not wait that long.
CRED_EXPIRE = 5
_SBIN = ('/usr/sbin', '/sbin', '/usr/bin', '/bin')


class Unavailable(RuntimeError):
  """SLURM cannot be installed or started on this machine; the message says why."""


def which(name: str) -> str | None:
  """A program on PATH or in the sbin folders (daemons live there; PATH may lack them)."""
  return shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN))


def ensure_installed(timeout: float = 600) -> None:
  """Installs slurm-wlm and munge with apt-get where any program is missing; raises Unavailable."""
  missing = [p for p in (*DAEMONS, *CLIENTS) if not which(p)]
  if not missing:
    return
  if not shutil.which('apt-get'):
    raise Unavailable(f'{", ".join(missing)} not installed and apt-get is not available: '
                      f'install {" and ".join(PACKAGES)}')
  if os.geteuid() != 0:
    raise Unavailable(f'{", ".join(missing)} not installed and not root: run '
                      f'`apt-get install {" ".join(PACKAGES)}` as root')
  env = dict(os.environ, DEBIAN_FRONTEND='noninteractive')
  for argv in (['apt-get', 'update', '-qq'], ['apt-get', 'install', '-y', '-qq', *PACKAGES]):
    try:
      done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
      raise Unavailable(f'`{" ".join(argv)}` took longer than {timeout:.0f}s') from e
    if done.returncode != 0:
      raise Unavailable(f'`{" ".join(argv)}` failed ({done.returncode}): {_tail(done.stderr)}')
  missing = [p for p in (*DAEMONS, *CLIENTS) if not which(p)]
  if missing:
    raise Unavailable(f'installed {" ".join(PACKAGES)} but {", ".join(missing)} still missing')


def _tail(text: str, lines: int = 8) -> str:
  return ' | '.join(text.strip().splitlines()[-lines:])


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _memory_mb() -> int:
  with open('/proc/meminfo', encoding='utf-8') as f:
    for line in f:
      if line.startswith('MemTotal:'):
        return int(line.split()[1]) // 1024
  return 2048


def slurm_conf(root: str, cpus: int, memory_mb: int, ctld_port: int, slurmd_port: int) -> str:
  """The slurm.conf of a one-node cluster whose files all live under `root`."""
  return f"""\
# One node on 127.0.0.1 for tests (tests/slurm_cluster.py).
ClusterName=maejax
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.socket,cred_expire={CRED_EXPIRE}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
# No cgroups: processes are tracked by parentage, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
ReturnToService=2
# Finished jobs stay visible to `scontrol show job` for 10 minutes.
MinJobAge=600
# The node may claim 2 CPUs on a 1-CPU machine: slurmd takes the values below as given.
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
"""


def _fake_gpu_files(root: str) -> list[str]:
  """Files for the GRES entries: character devices like /dev/null where mknod works, else empty files."""
  paths = []
  for i in range(GPUS):
    path = os.path.join(root, f'gpu{i}')
    if not os.path.exists(path):
      try:
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
      except OSError:
        open(path, 'w', encoding='utf-8').close()  # slurmd logs an error but counts it.
    paths.append(path)
  return paths


def _alive(pid: int) -> bool:
  """Whether `pid` runs (a zombie does not); reaps it when it is our child."""
  with contextlib.suppress(ChildProcessError):
    os.waitpid(pid, os.WNOHANG)
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except (FileNotFoundError, ProcessLookupError, IndexError):
    return False


class LocalCluster:
  """A one-node cluster in `root`; `state.json` there records the daemons' pids for stop()."""

  def __init__(self, root: str):
    self.root = os.path.abspath(root)
    self.conf = os.path.join(self.root, 'slurm.conf')

  @property
  def env(self) -> dict[str, str]:
    """os.environ with SLURM_CONF pointing at this cluster (sbatch passes it on to the jobs)."""
    return dict(os.environ, SLURM_CONF=self.conf)

  def _state_path(self) -> str:
    return os.path.join(self.root, 'state.json')

  def _pids(self) -> dict[str, int]:
    try:
      with open(self._state_path(), encoding='utf-8') as f:
        return json.load(f)['pids']
    except FileNotFoundError:
      return {}

  def _save_pids(self, pids: dict[str, int]) -> None:
    with open(self._state_path(), 'w', encoding='utf-8') as f:
      json.dump({'pids': pids}, f)

  def run(self, *argv: str, check: bool = True, timeout: float = 60) -> str:
    """Runs a SLURM client command against this cluster; returns its stdout."""
    done = subprocess.run([which(argv[0]) or argv[0], *argv[1:]], env=self.env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
      raise RuntimeError(f'`{" ".join(argv)}` failed ({done.returncode}): {done.stderr.strip()}')
    return done.stdout

  def write_config(self) -> None:
    for sub in ('state', 'spool'):
      os.makedirs(os.path.join(self.root, sub), exist_ok=True)
    os.chmod(self.root, 0o755)  # munged wants its socket's folder reachable by everyone.
    cpus = max(2, os.cpu_count() or 1)
    with open(self.conf, 'w', encoding='utf-8') as f:
      f.write(slurm_conf(self.root, cpus, _memory_mb(), _free_port(), _free_port()))
    with open(os.path.join(self.root, 'gres.conf'), 'w', encoding='utf-8') as f:
      f.write(''.join(f'NodeName={NODE} Name=gpu File={p}\n' for p in _fake_gpu_files(self.root)))
    open(os.path.join(self.root, 'plugstack.conf'), 'w', encoding='utf-8').close()
    key = os.path.join(self.root, 'munge.key')
    if not os.path.exists(key):
      fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
      with os.fdopen(fd, 'wb') as f:
        f.write(os.urandom(1024))

  def _spawn(self, name: str, argv: list[str], pids: dict[str, int]) -> None:
    with open(os.path.join(self.root, f'{name}.out'), 'ab') as out:
      # Own session: a Ctrl-C meant for pytest does not reach the daemons before stop() does.
      process = subprocess.Popen([which(argv[0]), *argv[1:]], env=self.env, stdout=out,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    pids[name] = process.pid
    self._save_pids(pids)

  def _log_tail(self, name: str) -> str:
    text = ''
    for suffix in ('.out', '.log'):
      with contextlib.suppress(FileNotFoundError):
        with open(os.path.join(self.root, name + suffix), encoding='utf-8', errors='replace') as f:
          text += f.read()
    return _tail(text)

  def start(self, timeout: float = 60) -> LocalCluster:
    """Writes the configuration, starts the three daemons and waits for an idle node."""
    if os.geteuid() != 0:
      raise Unavailable('slurmd must run as root to start jobs; run the tests as root')
    ensure_installed()
    self.write_config()
    pids: dict[str, int] = {}
    socket_path = os.path.join(self.root, 'munge.socket')
    try:
      self._spawn('munged', [
          'munged', '--foreground', '--force', f'--key-file={self.root}/munge.key', f'--socket={socket_path}',
          f'--pid-file={self.root}/munged.pid', f'--log-file={self.root}/munged.log',
          f'--seed-file={self.root}/munged.seed'], pids)
      self._wait(lambda: os.path.exists(socket_path), 'munged', pids, timeout)
      self._spawn('slurmctld', ['slurmctld', '-D', '-i'], pids)
      self._wait(lambda: self._quiet('scontrol', 'ping').find('is UP') >= 0, 'slurmctld', pids, timeout)
      self._spawn('slurmd', ['slurmd', '-D', '-N', NODE], pids)
      self._wait(lambda: self._quiet('sinfo', '-h', '-N', '-o', '%T').strip() == 'idle', 'slurmd', pids, timeout)
    except BaseException:
      self.stop()
      raise
    return self

  def _quiet(self, *argv: str) -> str:
    try:
      return self.run(*argv, check=False, timeout=10)
    except subprocess.TimeoutExpired:
      return ''

  def _wait(self, ready, name: str, pids: dict[str, int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
      for daemon, pid in pids.items():
        if not _alive(pid):
          raise Unavailable(f'{daemon} exited while starting: {self._log_tail(daemon)}')
      if time.monotonic() > deadline:
        raise Unavailable(f'{name} not ready after {timeout:.0f}s: {self._log_tail(name)}')
      time.sleep(0.2)

  def stop(self, timeout: float = 60) -> None:
    """Cancels every job left, waits for them to end, then ends the daemons start() began."""
    pids = self._pids()
    if pids.get('slurmctld') and _alive(pids['slurmctld']):
      # squeue lists pending, running and completing jobs: wait until none is left.
      with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        jobs = self.run('squeue', '-h', '-o', '%i', timeout=10).split()
        if jobs:
          self.run('scancel', *jobs, check=False, timeout=10)
        deadline = time.monotonic() + timeout
        while self.run('squeue', '-h', '-o', '%i', timeout=10).split() and time.monotonic() < deadline:
          time.sleep(0.5)
    for name in reversed(DAEMONS):
      pid = pids.get(name)
      if pid and _alive(pid):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for name in reversed(DAEMONS):
      pid = pids.get(name)
      while pid and _alive(pid):
        if time.monotonic() > deadline:
          os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    self._save_pids({})


def job_info(cluster: LocalCluster, job_id: str) -> dict[str, str]:
  """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once it is gone."""
  text = cluster.run('scontrol', 'show', 'job', '-o', job_id, check=False)
  return dict(re.findall(r'(\w+)=(\S*)', text))


def main(argv: list[str]) -> int:
  if len(argv) != 2:
    print('usage: python -m tests.slurm_cluster DIR', file=sys.stderr)
    return 2
  os.makedirs(argv[1], exist_ok=True)
  cluster = LocalCluster(argv[1])
  try:
    cluster.start()
  except Unavailable as e:
    print(f'SLURM unavailable: {e}', file=sys.stderr)
    return 1
  print(f'export SLURM_CONF={cluster.conf}\n# Ctrl-C stops munged, slurmctld and slurmd.', flush=True)
  for sig in (signal.SIGINT, signal.SIGTERM):  # Also when started in the background (SIGINT ignored).
    signal.signal(sig, signal.default_int_handler)
  try:
    while True:
      time.sleep(3600)
  except KeyboardInterrupt:
    pass
  finally:
    cluster.stop()
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
