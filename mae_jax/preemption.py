"""Stopping a job cleanly: SIGTERM, Ctrl-C and JAX's preemption notice.

`PreemptionFlag` is the training loop's handler: the loop saves a checkpoint
after the step it is asked at and exits with status 75, which launchers rerun.
`sigterm_exits` covers the job outside it (the lease, restore, init; what
follows the last save), where there is nothing new to save.
"""

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import jax
import numpy as np


class PreemptionFlag:
  """Set by SIGTERM (and, with one process, the first Ctrl-C); the loop saves a checkpoint and exits cleanly.

  With several processes every one must stop at the same step (the save is
  collective), but SIGTERM reaches them at different times. When
  jax.distributed runs its preemption service (the default), that service owns
  SIGTERM: it tells every process, and `Checkpointer.reached_preemption` (JAX's
  preemption sync point) says True on all of them at the same step, so no
  Python handler is installed here (one would replace the service's notifier).
  Without the service, `requested(step)` agrees across processes every
  `sync_every_steps` steps (an all-gather of one flag per process).
  """

  def __init__(self, sync_every_steps: int = 10):
    if sync_every_steps < 1:
      raise ValueError(f'preemption_sync_every_steps={sync_every_steps}: must be >= 1')
    self.event = threading.Event()
    self.sync_every_steps = sync_every_steps
    self._previous = {}
    self._agree = True  # False where nothing can set the flag on a process of several: no all-gather then.

  def install(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    _TRAINING.set()  # sigterm_exits' handler: after the loop, 'after training'.
    if not jax_preemption_service():
      self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: self.event.set())
    elif jax.process_count() > 1:  # The service's sync point stops the loop (Checkpointer.reached_preemption).
      self._agree = False
    if jax.process_count() == 1:  # Ctrl-C saves and stops too (a pod's processes get no terminal's Ctrl-C).
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
    return self

  def _interrupt(self, signum, frame):
    del signum, frame
    if self.event.is_set():  # The second Ctrl-C: stop at once.
      raise KeyboardInterrupt
    self.event.set()
    sys.stderr.write('\nCtrl-C: saving a checkpoint after this step, then stopping; rerun the same command to '
                     'resume (Ctrl-C again stops at once, without saving)\n')

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer on every process."""
    if jax.process_count() == 1:
      return self.event.is_set()
    if not self._agree or step % self.sync_every_steps:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.event.is_set()))
    return bool(np.max(flags))


STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL, as a preempted run's: launchers rerun it.
_TRAINING = threading.Event()  # Set once the loop's own handler (PreemptionFlag) is installed.


class Stopped(SystemExit):
  """SIGTERM outside the training loop: leave through the normal exit (the workdir's lease released)."""

  def __init__(self):
    super().__init__(STOPPED_EXIT_CODE)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
  """SIGTERM outside the training loop (the lease, restore, init; evaluations and results after it) exits 75.

  The default action kills the process where it stands: no atexit, so the
  workdir's lease stays and the relaunch waits for it to go stale. Inside the
  loop its own handler (PreemptionFlag) saves and stops, and stays until the
  last save is durable; after it, the rerun finds the checkpoints and finishes
  (an evaluation is redone). One process only: the processes of a
  multi-process job must stop together (the loop's handler and JAX's
  preemption service agree on a step).
  """
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield
    return
  _TRAINING.clear()

  def stop(signum, frame):
    del signum, frame
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # One stop: a second SIGTERM must not cut the way out short.
    when = ('after training (its checkpoints are saved); rerun the same command to finish' if _TRAINING.is_set()
            else 'before training started (nothing new to save); rerun the same command to start (or resume)')
    sys.stderr.write(f'Asked to stop (SIGTERM) {when}\n')
    raise Stopped()

  previous = signal.signal(signal.SIGTERM, stop)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def jax_preemption_service() -> bool:
  """Whether jax.distributed's preemption service watches for SIGTERM in this multi-process job."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.preemption_sync_manager is not None
