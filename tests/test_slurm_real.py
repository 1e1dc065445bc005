"""launch/slurm.py against the real scheduler: a one-node SLURM cluster on 127.0.0.1.

The jobs are what `python -m launch.slurm` writes and submits with sbatch (no
--dry_run): 2 tasks on the node's 2 stand-in GPUs, each a JAX process with 4
CPU devices, pretraining configs/test.py. The cluster (tests/slurm_cluster.py)
is shared by the tests of every pytest-xdist worker of a session and stopped by
the last one; where SLURM cannot be installed or started the tests skip, naming
the reason.
"""

import contextlib
import fcntl
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time

import pytest

from launch import common
from mae_jax import metrics as metrics_lib
from tests import slurm_cluster

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 30  # Steps of the uninterrupted and the preempted job.
JOB_TIMEOUT = 300  # Seconds a job may take, queueing behind the other tests' jobs included.


def _shared_dir(tmp_path_factory) -> pathlib.Path:
  """A folder every xdist worker of this session sees (the parent of the workers' own)."""
  base = tmp_path_factory.getbasetemp()
  shared = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'slurm'
  shared.mkdir(exist_ok=True)
  return shared


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  with open(path, 'a+', encoding='utf-8') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _read_json(path: pathlib.Path, default: dict) -> dict:
  return json.loads(path.read_text()) if path.exists() else default


@pytest.fixture(scope='session')
def cluster(tmp_path_factory):
  """The session's cluster: started by the first worker that needs it, stopped by the last one."""
  shared = _shared_dir(tmp_path_factory)
  users = shared / 'users.json'
  with _locked(shared / 'cluster.lock'):
    state = _read_json(users, {'users': 0, 'root': '', 'starts': 0, 'unavailable': ''})
    if state['unavailable']:
      pytest.skip(state['unavailable'])
    if state['users'] == 0:
      root = shared / f'cluster{state["starts"]}'  # Short: munged's socket path must fit 108 bytes.
      root.mkdir()
      try:
        slurm_cluster.LocalCluster(str(root)).start()
      except slurm_cluster.Unavailable as e:
        state['unavailable'] = f'no local SLURM cluster: {e}'
        users.write_text(json.dumps(state))
        pytest.skip(state['unavailable'])
      state.update(root=str(root), starts=state['starts'] + 1)
    state['users'] += 1
    users.write_text(json.dumps(state))
  local = slurm_cluster.LocalCluster(state['root'])
  yield local
  with _locked(shared / 'cluster.lock'):
    state = _read_json(users, {})
    state['users'] -= 1
    if state['users'] == 0:
      local.stop()
    users.write_text(json.dumps(state))


def launch_argv(name: str, out: pathlib.Path, steps: int, *flags: str) -> list[str]:
  """`python -m launch.slurm ...` as a user runs it, with the job's files under `out`."""
  activate = pathlib.Path(sys.prefix) / 'bin' / 'activate'
  setup = [f'--setup=source {shlex.quote(str(activate))}'] if activate.exists() else [f'--python={sys.executable}']
  return [sys.executable, '-m', 'launch.slurm', f'--job_name={name}', '--gpus_per_node=2', f'--chdir={REPO_ROOT}',
          *setup, '--env=JAX_PLATFORMS=cpu', '--env=XLA_FLAGS=--xla_force_host_platform_device_count=4',
          f'--config=configs/test.py:steps={steps}', f'--workdir={out / "workdir"}',
          f'--output={out}/%x-%j.out', f'--script={out}/{name}.sbatch', *flags,
          '--', '--verbose']  # The trainers' INFO lines in the job's output, where the tests read them.


class Job:
  """A submitted job: its id, log and workdir, and waits on its state."""

  def __init__(self, local: slurm_cluster.LocalCluster, name: str, out: pathlib.Path, steps: int, *flags: str):
    out.mkdir(parents=True, exist_ok=True)
    self.cluster, self.steps = local, steps
    done = subprocess.run(launch_argv(name, out, steps, *flags), cwd=REPO_ROOT, env=local.env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    self.id = re.search(r'Submitted batch job (\d+)', done.stdout).group(1)
    self.log = out / f'{name}-{self.id}.out'
    self.workdir = out / 'workdir'

  def info(self) -> dict[str, str]:
    return slurm_cluster.job_info(self.cluster, self.id)

  def text(self) -> str:
    return self.log.read_text(errors='replace') if self.log.exists() else ''

  def wait(self, ready, what: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    """Polls until ready(info) holds; fails with the job's state and log tail otherwise."""
    deadline = time.monotonic() + timeout
    while True:
      info = self.info()
      if ready(info):
        return info
      if time.monotonic() > deadline:
        tail = '\n'.join(self.text().splitlines()[-40:])
        pytest.fail(f'job {self.id}: not {what} after {timeout}s; state {info.get("JobState")}, '
                    f'restarts {info.get("Restarts")}\n{tail}')
      time.sleep(0.5)

  def wait_done(self, restarts: int = 0) -> dict[str, str]:
    finished = ('COMPLETED', 'FAILED', 'CANCELLED', 'TIMEOUT', 'NODE_FAIL', 'OUT_OF_MEMORY')
    return self.wait(lambda i: i.get('JobState') in finished and int(i.get('Restarts', 0)) >= restarts,
                     'finished')

  def wait_training(self) -> None:
    """Until the trainer has logged a step (the first includes compilation)."""
    self.wait(lambda i: metrics_lib.read_metrics(str(self.workdir)), 'training')

  def metrics(self) -> list[dict]:
    return metrics_lib.read_metrics(str(self.workdir))

  def checkpoints(self) -> list[int]:
    folder = self.workdir / 'checkpoints'
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _resumed_steps(text: str) -> list[int]:
  return [int(s) for s in re.findall(r'Resumed from checkpoint at step (\d+)', text)]


@pytest.fixture(scope='session')
def uninterrupted(cluster, tmp_path_factory):
  """The 2-task job run to the end once per session; the preemption test compares its loss with it."""
  shared = _shared_dir(tmp_path_factory)
  result = shared / 'uninterrupted.json'
  with _locked(shared / 'uninterrupted.lock'):
    if not result.exists():
      job = Job(cluster, 'mae-uninterrupted', shared / 'uninterrupted', STEPS, '--time=0:05:00')
      info = job.wait_done()
      result.write_text(json.dumps({'info': info, 'log': str(job.log), 'workdir': str(job.workdir)}))
  return json.loads(result.read_text())


def test_slurm_real_two_tasks_join_one_jax_job_and_finish(uninterrupted):
  info, text = uninterrupted['info'], pathlib.Path(uninterrupted['log']).read_text(errors='replace')
  assert (info['JobState'], info['ExitCode'], info['Restarts']) == ('COMPLETED', '0:0', '0'), text[-3000:]
  # Both srun tasks joined one jax.distributed job found from SLURM_* variables: 2 x 4 CPU devices.
  assert 'jax.distributed: starting (SLURM' in text
  for process in (0, 1):
    assert re.search(rf'JAX process {process} / 2, local devices \[(CpuDevice\(id=\d+\)(, )?){{4}}\]', text)
  assert re.search(r"Mesh \{'data': 8, 'fsdp': 1, 'tensor': 1\}", text)  # 8 global devices.
  assert 'trainer exited with status 0' in text
  assert common.SUCCESS_MARKER in text
  workdir = pathlib.Path(uninterrupted['workdir'])
  assert (workdir / 'checkpoints' / str(STEPS)).is_dir()
  assert metrics_lib.read_metrics(str(workdir))[-1]['step'] == STEPS


def test_slurm_real_preempted_job_is_requeued_and_resumes_to_the_same_loss(cluster, uninterrupted, tmp_path):
  job = Job(cluster, 'mae-preempted', tmp_path, STEPS, '--time=0:05:00')
  job.wait_training()
  # What a preemption with PreemptMode=REQUEUE does: SIGTERM to every process, then Slurm requeues.
  cluster.run('scontrol', 'requeue', job.id)
  info = job.wait_done(restarts=1)
  text = job.text()
  assert (info['JobState'], info['ExitCode'], info['Restarts']) == ('COMPLETED', '0:0', '1'), text[-3000:]
  first, second = text.split('restart 1', 1)
  assert 'trainer exited with status 75' in first
  assert 'COMPLETING, left to Slurm' in first  # Slurm requeues it by itself.
  resumed = _resumed_steps(second)
  assert len(resumed) == 2 and resumed[0] == resumed[1] and 0 < resumed[0] < STEPS, second[-3000:]
  assert common.SUCCESS_MARKER in second and common.SUCCESS_MARKER not in first
  reference = metrics_lib.read_metrics(str(uninterrupted['workdir']))[-1]
  final = job.metrics()[-1]
  assert final['step'] == reference['step'] == STEPS
  assert final['train/loss'] == reference['train/loss']


def test_slurm_real_time_limit_signal_saves_and_requeues(cluster, tmp_path):
  # Slurm 22.05 sends the signal up to 30 s before it is due (it checks time limits every 30 s): here
  # 30 to 60 s into the 2-minute job, when the trainer is past jax.distributed.initialize (after
  # which a SIGTERM is saved at the next step) and far from 100000 steps.
  job = Job(cluster, 'mae-time-limit', tmp_path, 100_000, '--time=0:02:00', '--signal_seconds=60')
  info = job.wait(lambda i: int(i.get('Restarts', 0)) >= 1 or i.get('JobState') in ('TIMEOUT', 'FAILED'),
                  'requeued', timeout=JOB_TIMEOUT + 120)
  cluster.run('scancel', job.id)  # The requeued run would resume (tested above) and run for 2 minutes.
  text = job.text()
  assert info['Restarts'] == '1', text[-3000:]
  assert 'time limit in <= 60s: SIGTERM to the trainer, then requeue' in text
  assert 'trainer exited with status 75' in text
  assert 'requeueing; the next run resumes from the newest checkpoint' in text
  saved = job.checkpoints()
  assert saved and 0 < saved[-1] < job.steps, text[-3000:]
