"""One training job per workdir: a lease file that process 0 holds while its job trains there.

Two jobs started on one workdir (a launch repeated by mistake, a sweep run twice)
would both save checkpoints there, each taking the other's for its own, and
write two metric streams. The lease stops the second one before it reads or
writes anything:

- `WORKDIR/.mae_jax_lease.json` names the job holding it (host, pid, a random
  id, when it started) and when it was last renewed. Process 0 writes it when the
  job starts; a background thread renews it every `RENEW_SECONDS` (compiles,
  evaluations and saves included) until the job removes it on its way out.
- A job that finds a lease of another job waits: a lease renewed meanwhile
  belongs to a live job, and the new one stops (`WorkdirError`, exit 78: not
  retried), unless that job is stopping (it marks its lease when asked to stop:
  a requeued or relaunched job waits for its predecessor's save). A lease that is
  not renewed (a job that died without removing it: a worker VM lost, SIGKILL) is
  taken over `STALE_SECONDS` after its last renewal, at once when it names a
  process of this host that has ended; one that cannot be read is waited on,
  never taken for absent.
- A holder whose lease names another job at its next renewal (taken over after a
  stall longer than STALE_SECONDS) stops at its next log step (`check`).

Two jobs that take the lease at the same moment: on a local (or NFS) workdir the
file is created exclusively, so one of them finds the other's and waits as above.
Object stores cannot create only if absent, so there (and when replacing a stale
lease) the job writes its lease, waits `SETTLE_SECONDS` for writes racing with it
to land, and reads it back: the job whose write came last holds it, the other
waits. A write delayed by more than that is still caught at the holder's next
renewal (`check`). The file is read and written through `fileio`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import jax
import numpy as np
from absl import logging

from mae_jax import fileio
from mae_jax.checkpoint import WorkdirError

LEASE_NAME = '.mae_jax_lease.json'
RENEW_SECONDS = 60.0
STALE_SECONDS = 300.0  # A lease not renewed for this long belongs to a job that died: it is taken over.
POLL_SECONDS = 10.0
SETTLE_SECONDS = 2.0  # After writing a lease that others may write at the same moment, before reading it back.

_PROCESS = uuid.uuid4().hex  # This process: a lease it took in an earlier run (a failed call) is its own.


def _of_this_process(record) -> bool:
  """Whether a lease record read back was written by this process (any of its jobs)."""
  return isinstance(record, dict) and record.get('process') == _PROCESS
_HELD = []  # The leases this process holds (released on the way out, also by main's fast exit).
_ABSENT, _UNREADABLE = 'absent', 'unreadable'


def _pid_namespace() -> str:
  """This boot's and pid namespace's identity ('' where /proc does not say): pids compare only within one.

  The host name alone is not enough: two machines may share one, and a pid
  namespace's id is the same on every Linux host; the boot id is not.
  """
  try:
    with open('/proc/sys/kernel/random/boot_id', encoding='utf-8') as f:
      boot = f.read().strip()
    return f'{boot}/{os.readlink("/proc/self/ns/pid")}'
  except OSError:
    return ''


def _ended_here(record) -> bool:
  """Whether a lease names a process of this host (and pid namespace) that has ended (a job killed outright)."""
  if not isinstance(record, dict) or record.get('host') != socket.gethostname():
    return False
  namespace = _pid_namespace()
  if not namespace or record.get('pid_namespace') != namespace or not isinstance(record.get('pid'), int):
    return False
  try:
    os.kill(record['pid'], 0)
  except ProcessLookupError:
    return True
  except OSError:  # Another user's process: alive.
    return False
  return False


class Lease:
  """The lease of one workdir, held by process 0 of the job (the other processes hold nothing)."""

  def __init__(self, workdir: str, *, clock: Callable[[], float] | None = None,
               sleep: Callable[[float], None] | None = None, renew_seconds: float | None = None,
               stale_seconds: float | None = None, poll_seconds: float | None = None,
               settle_seconds: float | None = None):
    self.path = fileio.join(workdir, LEASE_NAME)
    self.workdir = workdir
    self.clock, self.sleep = clock or time.time, sleep or time.sleep
    self.renew_seconds = RENEW_SECONDS if renew_seconds is None else renew_seconds
    self.stale_seconds = STALE_SECONDS if stale_seconds is None else stale_seconds
    self.poll_seconds = POLL_SECONDS if poll_seconds is None else poll_seconds
    self.settle_seconds = SETTLE_SECONDS if settle_seconds is None else settle_seconds
    self.record = {'job': uuid.uuid4().hex, 'process': _PROCESS, 'host': socket.gethostname(), 'pid': os.getpid(),
                   'pid_namespace': _pid_namespace(), 'started': self.clock(), 'renewed': self.clock(),
                   'stopping': False}
    self.held = False
    self.lost = ''  # Why the lease is no longer this job's (another job took it over).
    self._lock = threading.Lock()
    self._done = threading.Event()
    self._thread = None

  def _read(self, first: bool = False):
    """The lease record, _ABSENT, or _UNREADABLE (a storage error, a file being replaced).

    `first`: the job's first look at its workdir, where storage out of reach
    (fileio.StorageError: no network, no credentials) stops the job at once.
    """
    try:
      if not fileio.exists(self.path):
        return _ABSENT
      return json.loads(fileio.read_text(self.path))
    except fileio.StorageError:
      if first:
        raise
      logging.warning('Could not reach %s; taking it as held', self.path)
      return _UNREADABLE
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except  # Any storage client's error.
      logging.warning('Could not read %s (%s: %s); taking it as held', self.path, type(e).__name__, e)
      return _UNREADABLE

  def _payload(self) -> str:
    self.record['renewed'] = self.clock()
    return json.dumps(self.record) + '\n'

  def _write(self) -> None:
    payload = self._payload()
    fileio.makedirs(self.workdir)
    fileio.write_text(self.path, payload)

  def _is_ours(self, record) -> bool:
    return isinstance(record, dict) and record.get('job') == self.record['job']

  def _take(self, replacing):
    """Writes this job's lease over `replacing` (what was found: absent, stale or this process's own).

    None when the lease is this job's; otherwise the lease found instead (another
    job's, written at the same moment), for the caller to wait on.
    """
    created = fileio.create_exclusive(self.path, self._payload().encode('utf-8'))
    if created:
      return None
    if created is False:  # A local file was there: the one being replaced, or a job that came first.
      found = self._read()
      if found != replacing and not _of_this_process(found):
        return found
    self._write()
    self.sleep(self.settle_seconds)  # Racing writes land; the last one holds the lease.
    found = self._read()
    for _ in range(3):  # A read that failed once (a storage hiccup) is not another job's lease.
      if found != _UNREADABLE:
        break
      self.sleep(self.poll_seconds)
      found = self._read()
    return None if self._is_ours(found) else found

  def _wait_for(self, other) -> tuple[str | None, object]:
    """Waits while another job's lease stands.

    (None, what to replace: _ABSENT or the stale lease) once it is gone or
    stale, else (why that job is live, its lease).
    """
    if _ended_here(other):  # Its process is gone: no need to wait for the lease to go stale.
      logging.warning('Taking over the lease of a job that ended without removing it (pid %s on this host)',
                      other.get('pid'))
      return None, other
    renewed = float(other.get('renewed', 0)) if isinstance(other, dict) else self.clock()
    deadline = renewed + self.stale_seconds
    if self.clock() < deadline:
      who = (f'host {other.get("host")}, pid {other.get("pid")}, renewed {self.clock() - renewed:.0f} s ago'
             if isinstance(other, dict) else 'unreadable')
      logging.warning('%s holds the lease of another job (%s): waiting up to %.0f s for it to end or go stale',
                      self.workdir, who, deadline - self.clock())
    while self.clock() < deadline:
      self.sleep(min(self.poll_seconds, max(deadline - self.clock(), 0.0)))
      now = self._read()
      if now == _ABSENT:
        return None, _ABSENT
      if now == _UNREADABLE or now == other:
        continue
      if _of_this_process(now):  # This process's own write (a read-back that failed): its lease.
        return None, now
      if now.get('stopping'):  # Renewed by a job saving on its way out: wait for it from this renewal.
        other, deadline = now, float(now.get('renewed', self.clock())) + self.stale_seconds
        continue
      return (f'another job (host {now.get("host")}, pid {now.get("pid")}) is training in this workdir: it '
              f'renewed its lease {self.path} while this job waited'), now
    logging.warning('Taking over the lease of a job that stopped renewing it (%s)',
                    f'host {other.get("host")}, pid {other.get("pid")}' if isinstance(other, dict) else 'unreadable')
    return None, other

  def acquire(self) -> Lease:
    """Takes the lease on process 0; WorkdirError on every process when another live job holds it."""
    reason = ''
    if jax.process_index() == 0:
      other = self._read(first=True)
      while True:
        ours = other == _ABSENT or _of_this_process(other)
        live, other = (None, other) if ours else self._wait_for(other)
        if live is not None:
          break
        other = self._take(other)
        if other is None:
          break
        # Another job took the lease at the same moment: it is waited on as any other.
      if live is None:
        self.held = True
        _HELD.append(self)
        atexit.register(self.release)  # Also when the job fails before it releases the lease itself.
        self._thread = threading.Thread(target=self._heartbeat, name='workdir-lease', daemon=True)
        self._thread.start()
      else:
        reason = live
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      refused = int(multihost_utils.broadcast_one_to_all(np.int32(bool(reason))))
      reason = reason or ('another job is training in this workdir (process 0 says which)' if refused else '')
    if reason:
      raise WorkdirError(f'--workdir={self.workdir}: {reason}. Stop that job or use another --workdir; the lease '
                         f'of a job that died is taken over {self.stale_seconds:.0f} s after its last renewal.')
    return self

  def _heartbeat(self) -> None:
    while not self._done.wait(self.renew_seconds):
      self.renew()

  def renew(self) -> None:
    """Writes the lease again, unless another job has taken it meanwhile (then `lost` says so)."""
    with self._lock:
      if not self.held or self.lost:
        return
      current = self._read()
      if isinstance(current, dict) and current.get('job') != self.record['job']:
        self.lost = (f'another job (host {current.get("host")}, pid {current.get("pid")}) took over the lease '
                     f'{self.path} after this job had not renewed it for {self.stale_seconds:.0f} s')
        logging.error('%s', self.lost)
        return
      try:
        self._write()
      except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except  # Any storage client's error.
        logging.warning('Could not renew %s (%s: %s); trying again later', self.path, type(e).__name__, e)

  def mark_stopping(self) -> None:
    """Says in the lease that this job is saving on its way out: a job waiting for it keeps waiting."""
    if self.held and not self.record['stopping']:
      self.record['stopping'] = True
      self.renew()

  def check(self) -> None:
    """Raises WorkdirError when another job has taken the lease over (call it at log steps, every process)."""
    lost = self.lost
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      if int(multihost_utils.broadcast_one_to_all(np.int32(bool(lost)))):
        lost = lost or 'another job took over the lease (process 0 says which)'
    if lost:
      raise WorkdirError(f'--workdir={self.workdir}: {lost}; stopping before both jobs write there')

  def release(self) -> None:
    """Stops renewing and removes the lease if this job still holds it."""
    self._done.set()
    with self._lock:
      if not self.held:
        return
      self.held = False
      if self in _HELD:
        _HELD.remove(self)
      current = self._read()
      if isinstance(current, dict) and current.get('job') == self.record['job']:
        try:
          fileio.remove(self.path)
        except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
          logging.warning('Could not remove %s (%s); the next job takes it over once stale', self.path, e)


def acquire(workdir: str) -> Lease:
  """The workdir's lease for this job (call on every process together, before reading checkpoints)."""
  return Lease(workdir).acquire()


@contextlib.contextmanager
def held(workdir: str) -> Iterator[Lease]:
  """The workdir's lease while the block runs, released however it ends (an error included)."""
  lease = acquire(workdir)
  try:
    yield lease
  finally:
    lease.release()


def release_all() -> None:
  """Releases every lease this process holds (main calls it before leaving a failed job at once)."""
  for lease in list(_HELD):
    lease.release()
