"""One training job per workdir: the lease file (mae_jax/workdir_lease.py)."""

import json
import os
import threading
import time

import pytest

from configs import test as test_config
from mae_jax import checkpoint, fileio, train, workdir_lease


class Clock:
  """A clock that `sleep` moves on, and that runs `each_sleep` at every sleep (another job's renewals)."""

  def __init__(self):
    self.now = 1000.0
    self.each_sleep = lambda: None

  def __call__(self):
    return self.now

  def sleep(self, seconds):
    self.now += seconds
    self.each_sleep()


def _lease(workdir, clock):
  return workdir_lease.Lease(str(workdir), clock=clock, sleep=clock.sleep, renew_seconds=60, stale_seconds=300,
                             poll_seconds=10)


def _foreign(workdir, renewed, job='other', stopping=False):
  path = os.path.join(workdir, workdir_lease.LEASE_NAME)
  fileio.write_text(path, json.dumps({'job': job, 'process': 'another', 'host': 'elsewhere', 'pid': 1,
                                      'started': 0, 'renewed': renewed, 'stopping': stopping}))
  return path


def test_a_live_job_keeps_its_workdir_and_a_dead_ones_lease_is_taken_over(tmp_path):
  clock = Clock()
  mine = _lease(tmp_path, clock).acquire()
  path = os.path.join(tmp_path, workdir_lease.LEASE_NAME)
  assert json.loads(open(path).read())['job'] == mine.record['job']
  mine.release()
  assert not os.path.exists(path)

  # Another job renews its lease while this one waits: refused (exit 78), without waiting out the 300 s.
  _foreign(tmp_path, renewed=clock.now - 30)
  clock.each_sleep = lambda: clock.now > 1040 and _foreign(tmp_path, renewed=clock.now)
  with pytest.raises(checkpoint.WorkdirError, match=r'another job \(host elsewhere, pid 1\) is training in this '
                                                    r'workdir.*Stop that job or use another --workdir'):
    _lease(tmp_path, clock).acquire()
  assert clock.now <= 1060

  # A job that died: its lease is not renewed and is taken over once 300 s old.
  clock.each_sleep = lambda: None
  _foreign(tmp_path, renewed=clock.now - 100)
  start = clock.now
  lease = _lease(tmp_path, clock).acquire()
  assert 199 <= clock.now - start <= 203 and lease.held  # 200 s to go stale, 2 s for racing writes to land.
  # Renewed as the job trains, and released on the way out.
  clock.now += 61
  lease.renew()
  assert json.loads(open(path).read())['renewed'] == clock.now
  lease.check()
  lease.release()
  assert not os.path.exists(path)
  # A lease removed while this job waits: taken at once.
  _foreign(tmp_path, renewed=clock.now)
  clock.each_sleep = lambda: os.remove(path) if os.path.exists(path) else None
  assert _lease(tmp_path, clock).acquire().held


def test_a_second_training_job_on_a_workdir_stops_before_reading_it(tmp_path, monkeypatch):
  """The trainer takes the lease before any checkpoint is read; a live job's lease stops it (WorkdirError)."""
  workdir = str(tmp_path / 'run')
  config = test_config.get_config('steps=2')
  result = train.train_and_evaluate(config, workdir)
  assert result['status'] == 'done' and not os.path.exists(os.path.join(workdir, workdir_lease.LEASE_NAME))
  monkeypatch.setattr(workdir_lease, 'STALE_SECONDS', 30.0)
  monkeypatch.setattr(workdir_lease, 'POLL_SECONDS', 0.1)
  path = _foreign(workdir, renewed=time.time())
  stop = threading.Event()

  def other_job():  # Renews its lease while the second job waits.
    while not stop.wait(0.05):
      _foreign(workdir, renewed=time.time())

  renewer = threading.Thread(target=other_job, daemon=True)
  renewer.start()
  config.num_train_steps = 4
  start = time.time()
  try:
    with pytest.raises(checkpoint.WorkdirError, match='another job'):
      train.train_and_evaluate(config, workdir)
  finally:
    stop.set()
    renewer.join()
  assert time.time() - start < 20  # Refused as soon as a renewal was seen, not after the 30 s.
  assert checkpoint.latest_step(workdir) == 2  # Nothing trained.
  os.remove(path)


def test_a_stopping_job_is_waited_for_a_stalled_holder_learns_it_lost_the_lease(tmp_path):
  clock = Clock()
  # The holder was asked to stop (SIGTERM) and renews while it saves: a relaunched job waits, then takes over.
  _foreign(tmp_path, renewed=clock.now, stopping=True)
  path = os.path.join(tmp_path, workdir_lease.LEASE_NAME)
  saves = iter(range(3))
  clock.each_sleep = lambda: (_foreign(tmp_path, renewed=clock.now, stopping=True) if next(saves, None) is not None
                              else os.path.exists(path) and os.remove(path))
  lease = _lease(tmp_path, clock).acquire()
  assert lease.held and json.loads(open(path).read())['job'] == lease.record['job']
  # Stalled for longer than the stale limit, it was taken over: its next renewal finds out, writes nothing, and
  # the next log step stops the job.
  _foreign(tmp_path, renewed=clock.now, job='successor')
  lease.renew()
  assert json.loads(open(path).read())['job'] == 'successor'
  with pytest.raises(checkpoint.WorkdirError, match=r'another job \(host elsewhere, pid 1\) took over the lease'):
    lease.check()
  lease.release()
  assert os.path.exists(path)  # The successor's lease stays.
  # An unreadable lease is waited on, not taken for absent.
  with open(path, 'w', encoding='utf-8') as f:
    f.write('{"job": ')
  clock.each_sleep = lambda: None
  start = clock.now
  _lease(tmp_path, clock).acquire()
  assert clock.now - start >= 300


def test_two_jobs_taking_a_free_lease_at_once_one_holds_it_the_other_waits_and_stops(tmp_path):
  """Two processes started together on a local workdir (both read the lease before either writes it): the file
  is created exclusively, one job holds it, the other finds it, waits, sees it renewed and stops."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  go = tmp_path / 'go'
  script = f'''
import os, sys, time
from mae_jax import checkpoint, workdir_lease
workdir_lease.RENEW_SECONDS, workdir_lease.POLL_SECONDS, workdir_lease.STALE_SECONDS = 0.2, 0.05, 60.0
read = workdir_lease.Lease._read
def slow_read(self, *args, **kwargs):  # Slow storage: both jobs read the free lease before either writes its own.
  found = read(self, *args, **kwargs)
  time.sleep(0.5)
  return found
workdir_lease.Lease._read = slow_read
open(os.path.join({str(tmp_path)!r}, 'ready-' + sys.argv[1]), 'w').close()
while not os.path.exists({str(go)!r}):
  time.sleep(0.001)
try:
  lease = workdir_lease.acquire({str(tmp_path / 'run')!r})
except checkpoint.WorkdirError as e:
  print('refused:', e, flush=True)
  sys.exit(78)
print('held', flush=True)
time.sleep(3)
lease.release()
'''
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  jobs = [subprocess.Popen([sys.executable, '-c', script, str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=env) for i in range(2)]
  deadline = time.time() + 120
  while not all((tmp_path / f'ready-{i}').exists() for i in range(2)):
    assert time.time() < deadline and all(job.poll() is None for job in jobs), [j.communicate() for j in jobs]
    time.sleep(0.05)
  go.touch()
  outputs = [job.communicate(timeout=120) for job in jobs]
  assert sorted(job.returncode for job in jobs) == [0, 78], outputs
  refused = next(out for out, _ in outputs if out.startswith('refused'))
  assert 'is training in this workdir' in refused, outputs


def test_on_an_object_store_a_racing_write_that_lands_last_holds_the_lease(tmp_path, monkeypatch):
  """Without an exclusive create (gs://), a job reads its lease back after writing it: when another job's write
  landed after its own, the lease is that job's, which it then waits on like any other (and is refused when that
  job renews it)."""
  monkeypatch.setattr(fileio, 'create_exclusive', lambda path, data: None)
  path = os.path.join(tmp_path, workdir_lease.LEASE_NAME)
  clock = Clock()
  sleeps = iter(range(1000))
  clock.each_sleep = lambda: (next(sleeps) == 0 or clock.now > 1030) and _foreign(tmp_path, renewed=clock.now)
  with pytest.raises(checkpoint.WorkdirError, match=r'another job \(host elsewhere, pid 1\) is training'):
    _lease(tmp_path, clock).acquire()
  assert json.loads(open(path).read())['job'] == 'other'
  os.remove(path)
  # No racing write: the lease read back is this job's.
  clock.each_sleep = lambda: None
  lease = _lease(tmp_path, clock).acquire()
  assert lease.held and json.loads(open(path).read())['job'] == lease.record['job']
  lease.release()


def test_the_lease_is_renewed_in_the_background():
  import tempfile  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as workdir:
    lease = workdir_lease.Lease(workdir, renew_seconds=0.05).acquire()
    first = lease.record['renewed']
    deadline = time.time() + 10
    while json.loads(open(os.path.join(workdir, workdir_lease.LEASE_NAME)).read())['renewed'] == first:
      assert time.time() < deadline, 'not renewed'
      time.sleep(0.02)
    lease.release()
    assert not os.path.exists(os.path.join(workdir, workdir_lease.LEASE_NAME))


def test_a_run_that_fails_releases_the_lease(tmp_path):
  """A resume refused (or any error) after the lease was taken: the next job on the workdir does not wait."""
  from mae_jax import loop  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  assert train.train_and_evaluate(test_config.get_config('steps=1'), workdir)['status'] == 'done'
  changed = test_config.get_config('steps=2')
  changed.batch_size = 32
  with pytest.raises(loop.ResumeError):
    train.train_and_evaluate(changed, workdir)
  assert not os.path.exists(os.path.join(workdir, workdir_lease.LEASE_NAME))


def test_a_lease_naming_an_ended_process_of_this_host_is_taken_at_once(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  ended = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True,
                         check=True)
  path = os.path.join(tmp_path, workdir_lease.LEASE_NAME)
  record = {'job': 'killed', 'process': 'another', 'host': workdir_lease.socket.gethostname(),
            'pid': int(ended.stdout), 'pid_namespace': workdir_lease._pid_namespace(), 'started': 0,
            'renewed': 1000.0, 'stopping': False}
  fileio.write_text(path, json.dumps(record))
  clock = Clock()
  lease = _lease(tmp_path, clock).acquire()
  assert lease.held and clock.now - 1000.0 <= 2.0  # No 300 s wait (2 s: racing writes landing).
  lease.release()
  # A live process of this host (here: this one, as another job): waited on, then refused when it renews.
  fileio.write_text(path, json.dumps(dict(record, pid=os.getpid(), renewed=clock.now)))
  clock.each_sleep = lambda: _foreign(tmp_path, renewed=clock.now)
  with pytest.raises(checkpoint.WorkdirError, match='another job'):
    _lease(tmp_path, clock).acquire()


def test_sigterm_while_a_job_starts_leaves_with_75_and_frees_the_workdir(tmp_path):
  """Before the loop's own handler: the default SIGTERM killed the job where it stood (143), its lease stayed
  and the relaunch waited 5 minutes for it."""
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'run')
  path = os.path.join(workdir, workdir_lease.LEASE_NAME)
  job = subprocess.Popen([sys.executable, '-m', 'mae_jax.main', '--config=configs/test.py:steps=400',
                          f'--workdir={workdir}', '--progress=off'], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  deadline = time.time() + 120
  while not os.path.exists(path):
    assert job.poll() is None and time.time() < deadline, job.communicate()
    time.sleep(0.01)
  job.send_signal(signal.SIGTERM)
  out, err = job.communicate(timeout=120)
  assert job.returncode == 75, (out, err)
  assert 'Asked to stop (SIGTERM) before training started' in err, err
  assert not os.path.exists(path)


def test_sigterm_after_the_loop_exits_75_once(capsys):
  """After the loop's own handler is gone (the last save is durable), a SIGTERM exits 75 and says so; a second
  one on the way out is ignored."""
  import signal  # pylint: disable=g-import-not-at-top

  from mae_jax import preemption  # pylint: disable=g-import-not-at-top
  previous = signal.getsignal(signal.SIGTERM)
  with pytest.raises(preemption.Stopped) as stopped:
    with preemption.sigterm_exits():
      preemption.PreemptionFlag().install().uninstall()  # The loop ran.
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(5)
  assert stopped.value.code == 75
  assert 'Asked to stop (SIGTERM) after training (its checkpoints are saved)' in capsys.readouterr().err
  assert signal.getsignal(signal.SIGTERM) is previous


def test_storage_out_of_reach_stops_at_once_and_a_failed_read_back_is_not_another_job(tmp_path, monkeypatch):
  def unreachable(path):
    raise fileio.StorageError(f'{path}: the storage could not be reached')

  with monkeypatch.context() as patch:
    patch.setattr(fileio, 'exists', unreachable)
    with pytest.raises(fileio.StorageError):  # Not 300 s of polling first.
      _lease(tmp_path, Clock()).acquire()
  # On an object store the read-back after the write fails once: retried, and the lease is this job's.
  monkeypatch.setattr(fileio, 'create_exclusive', lambda path, data: None)
  read_text, failures = fileio.read_text, [RuntimeError('503 Service Unavailable')]

  def flaky(path):
    if failures:
      raise failures.pop()
    return read_text(path)

  monkeypatch.setattr(fileio, 'read_text', flaky)
  lease = _lease(tmp_path, Clock()).acquire()
  assert lease.held and not failures
  lease.release()
