"""One training job per workdir: a lease file that process 0 holds while its job trains there.

Two jobs started on one workdir (a launch repeated by mistake, a sweep run twice)
would both save checkpoints there, each taking the other's for its own, and
write two metric streams. The lease stops the second one before it reads or
writes anything:

- `WORKDIR/.mae_jax_lease.json` names the job holding it (host, pid, a random
  id, when it started) and when it was last renewed. Process 0 writes it when the
  job starts, renews it every `RENEW_SECONDS` while it trains and removes it on
  its way out, preempted or failed alike.
- A job that finds a lease of another job waits: a lease that is renewed meanwhile
  belongs to a live job, and the new one stops (`WorkdirError`, exit 78: not
  retried); a lease left by a job that died without removing it (a worker VM
  lost) is taken over once it is `STALE_SECONDS` old.

The file is read and written through `fileio`, local paths and gs:// alike.
Storage is not a lock service: two jobs started within the same second may both
take it; the case it is for, a second job started while one trains, is caught.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
import uuid
from collections.abc import Callable

import jax
import numpy as np
from absl import logging

from mae_jax import fileio
from mae_jax.checkpoint import WorkdirError

LEASE_NAME = '.mae_jax_lease.json'
RENEW_SECONDS = 60.0
STALE_SECONDS = 300.0  # A lease not renewed for this long belongs to a job that died: it is taken over.
POLL_SECONDS = 10.0

_HELD = []  # The leases this process holds (released on the way out, also by main's fast exit).


class Lease:
  """The lease of one workdir, held by process 0 of the job (the other processes hold nothing)."""

  def __init__(self, workdir: str, *, clock: Callable[[], float] | None = None,
               sleep: Callable[[float], None] | None = None, renew_seconds: float | None = None,
               stale_seconds: float | None = None, poll_seconds: float | None = None):
    self.path = fileio.join(workdir, LEASE_NAME)
    self.workdir = workdir
    self.clock, self.sleep = clock or time.time, sleep or time.sleep
    self.renew_seconds = RENEW_SECONDS if renew_seconds is None else renew_seconds
    self.stale_seconds = STALE_SECONDS if stale_seconds is None else stale_seconds
    self.poll_seconds = POLL_SECONDS if poll_seconds is None else poll_seconds
    self.record = {'job': uuid.uuid4().hex, 'host': socket.gethostname(), 'pid': os.getpid(),
                   'started': self.clock(), 'renewed': self.clock()}
    self.held = False

  def _read(self) -> dict | None:
    try:
      if not fileio.exists(self.path):
        return None
      return json.loads(fileio.read_text(self.path))
    except (ValueError, OSError) as e:  # Half-written or unreadable: not a live job's.
      logging.warning('Could not read %s (%s); taking it as no lease', self.path, e)
      return None

  def _write(self) -> None:
    self.record['renewed'] = self.clock()
    fileio.makedirs(self.workdir)
    fileio.write_text(self.path, json.dumps(self.record) + '\n')

  def _wait_for(self, other: dict) -> str | None:
    """Waits while `other`'s lease stands unchanged: None once it is gone or stale, else why it is live."""
    deadline = float(other.get('renewed', 0)) + self.stale_seconds
    if self.clock() < deadline:
      logging.warning('%s holds a lease of another job (host %s, pid %s, renewed %.0f s ago): waiting up to '
                      '%.0f s for it to end or go stale', self.workdir, other.get('host'), other.get('pid'),
                      self.clock() - float(other.get('renewed', 0)), deadline - self.clock())
    while self.clock() < deadline:
      self.sleep(min(self.poll_seconds, max(deadline - self.clock(), 0.0)))
      now = self._read()
      if now is None:
        return None
      if now != other:
        return (f'another job (host {now.get("host")}, pid {now.get("pid")}) is training in this workdir: it '
                f'renewed its lease {self.path} while this job waited')
    logging.warning('Taking over the lease of a job that stopped renewing it (host %s, pid %s)',
                    other.get('host'), other.get('pid'))
    return None

  def acquire(self) -> Lease:
    """Takes the lease on process 0; WorkdirError on every process when another live job holds it."""
    reason = ''
    if jax.process_index() == 0:
      other = self._read()
      ours = other is None or other.get('job') == self.record['job'] or (  # Or this process's earlier run's.
          other.get('host') == self.record['host'] and other.get('pid') == self.record['pid'])
      live = None if ours else self._wait_for(other)
      if live is None:
        self._write()
        self.held = True
        _HELD.append(self)
        atexit.register(self.release)  # Also when the job fails before its loop's own release.
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

  def renew(self) -> None:
    """Renews the lease when RENEW_SECONDS have passed (call it often); a storage error is a warning."""
    if not self.held or self.clock() - self.record['renewed'] < self.renew_seconds:
      return
    try:
      self._write()
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except  # Any storage client's error.
      logging.warning('Could not renew %s (%s: %s); trying again later', self.path, type(e).__name__, e)

  def release(self) -> None:
    """Removes the lease if this job still holds it."""
    if not self.held:
      return
    self.held = False
    if self in _HELD:
      _HELD.remove(self)
    try:
      current = self._read()
      if current is not None and current.get('job') == self.record['job']:
        fileio.remove(self.path)
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except
      logging.warning('Could not remove %s (%s); the next job takes it over once stale', self.path, e)


def acquire(workdir: str) -> Lease:
  """The workdir's lease for this job (call on every process together, before reading checkpoints)."""
  return Lease(workdir).acquire()


def release_all() -> None:
  """Releases every lease this process holds (main calls it before leaving a failed job at once)."""
  for lease in list(_HELD):
    lease.release()
