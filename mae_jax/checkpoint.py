"""Orbax checkpoints: sharded, async, atomic; resume and restore onto another mesh.

A checkpoint holds three items: `params`, `opt_state` (sharded arrays) and
`meta` (JSON: step, counters, the resolved config). Orbax writes each step to a
temporary directory and renames it when complete, so a half-written checkpoint
is never listed by `latest_step()` and never restored.
"""

import json
import os
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mae_jax import fileio

CHECKPOINT_DIR = 'checkpoints'


def _handlers():
  return {'params': ocp.StandardCheckpointHandler(), 'opt_state': ocp.StandardCheckpointHandler(),
          'meta': ocp.JsonCheckpointHandler()}


def _open(directory, options):
  return ocp.CheckpointManager(directory, item_handlers=_handlers(), options=options)


def checkpoint_dir(workdir: str) -> str:
  return os.fspath(fileio.path(fileio.join(workdir, CHECKPOINT_DIR)))


class Checkpointer:
  """Saves train state every N steps and at the end, keeps the latest K."""

  def __init__(self, workdir: str, *, keep: int = 3, every_steps: int = 0, async_save: bool = True):
    self.workdir = workdir
    self.every_steps = every_steps
    self._last_saved = None
    self._preemption_failed = False  # The preemption sync point failed once (warned).
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        create=True,
        enable_async_checkpointing=async_save,
    )
    self.manager = _open(checkpoint_dir(workdir), options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self):
    return self.manager.all_steps()

  def save_in_flight(self) -> int | None:
    """The step whose async save is still being written on this process, else None."""
    return self._last_saved if self.manager.is_saving_in_progress() else None

  def should_save(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, params, opt_state, meta: dict, force: bool = True) -> bool:
    """Starts an (async) save of the state at `step`; returns whether it saved."""
    if step in (self.manager.all_steps() or []):
      return False
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            meta=ocp.args.JsonSave(meta)),
        force=force)
    if saved:
      self._last_saved = step
      logging.info('Saving checkpoint at step %d to %s', step, self.manager.directory)
    return saved

  def restore(self, abstract_params, abstract_opt_state, step: int | None = None):
    """Restores onto the shardings of the abstract trees; returns (params, opt_state, meta)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {self.manager.directory}')
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            meta=ocp.args.JsonRestore()))
    return restored['params'], restored['opt_state'], restored['meta']

  def reached_preemption(self, step: int) -> bool:
    """True when the job got a preemption notice (multi-host safe)."""
    try:
      return bool(self.manager.reached_preemption(step))
    except Exception as e:  # pylint: disable=broad-except
      if not self._preemption_failed:  # Once: it would fail at every step.
        self._preemption_failed = True
        logging.warning('Cannot ask JAX\'s preemption service whether to stop (%s: %s): a preemption notice '
                        'will not save a checkpoint', type(e).__name__, e)
      return False

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


class CheckpointReadError(RuntimeError):
  """A checkpoint could not be read (a damaged file, a storage error); a rerun may pass."""


def error_text(error: Exception) -> str:
  """An Orbax / TensorStore error on one line, without the spec of several KB that it may append."""
  text = str(error)
  for tail in (' [tensorstore_spec', '. See full TensorStore details'):
    text = text.split(tail)[0]
  return ' '.join(text.split()) or type(error).__name__


def is_misfit(error: Exception) -> bool:
  """Whether Orbax says the saved tree does not fit the one asked for (not that a read failed)."""
  return isinstance(error, ValueError) and any(words in error_text(error) for words in MISFIT_MESSAGES)


def read_error(directory: str, step: int, error: Exception, fix: str) -> CheckpointReadError:
  """One line: the checkpoint, what failed (without tensorstore's spec of several KB) and `fix`."""
  detail = error_text(error)
  detail = detail if len(detail) <= 300 else detail[:300] + '...'
  return CheckpointReadError(f'checkpoint step {step} in {directory} could not be read ({detail}). A storage '
                             f'hiccup passes on a rerun; {fix}')


# Orbax's words for a saved tree that does not fit the one asked for (not a read failure).
MISFIT_MESSAGES = ('tree structures do not match', 'shape', 'Shape')


def load_params(workdir: str, step: int | None = None, abstract_params=None) -> tuple[Any, dict]:
  """Restores only the params (and the run's config) from a workdir's checkpoint.

  Returns (params, config_dict); `load_meta` has the step and counters. With no
  abstract tree the arrays come back as saved, on the default device.
  """
  params, meta = _load(workdir, step, abstract_params)
  return params, meta['config']


def load_meta(workdir: str, step: int | None = None) -> dict:
  """The JSON metadata of a checkpoint: step, counters, config."""
  return _load(workdir, step, None, with_params=False)[1]


def _isdir_everywhere(directory: str) -> bool:
  """Whether `directory` exists, as process 0 sees it: every process then takes the same path.

  Opening a CheckpointManager runs collective barriers, so processes must agree on
  whether to open one: another process may create the folder between their checks.
  """
  return bool(_from_process_0(int(fileio.isdir(directory))))


def _agreed_step(step: int | None) -> int | None:
  """Process 0's `step` on every process: another run may finish a checkpoint between their looks."""
  agreed = _from_process_0(-1 if step is None else step)
  return None if agreed < 0 else agreed


def _from_process_0(value: int) -> int:
  """Process 0's `value` on every process (all processes call it together); `value` itself with one."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


class WorkdirError(ValueError):
  """The workdir cannot serve the run as given (e.g. not shared by its processes); the message says why."""


def check_shared_workdir(workdir: str) -> None:
  """With several processes: each must see what process 0 writes in `workdir`, else a clear error on all.

  A path on each host's own disk (a pod worker's /home, a node's /scratch)
  would let every process save its own shards where process 0 never sees
  them; Orbax then waits for them until it times out. Call it on every
  process together, before anything is restored or saved.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  token = _from_process_0(int(time.time_ns() % 2**31))
  probe = fileio.join(workdir, f'.mae_jax_shared_{token}')
  written = True
  if jax.process_index() == 0:
    try:
      fileio.makedirs(workdir)
      fileio.write_text(probe, 'written by process 0 to check that every process sees this workdir\n')
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except  # Said on every process below.
      written = False
      logging.error('--workdir=%s: process 0 cannot write there: %s: %s', workdir, type(e).__name__, e)
  multihost_utils.sync_global_devices('mae_jax_shared_workdir_written')
  if not _from_process_0(int(written)):
    raise WorkdirError(f'--workdir={workdir}: process 0 cannot write there (its error is in its log): check the '
                       'path and its permissions')
  seen = np.asarray(multihost_utils.process_allgather(np.int32(fileio.exists(probe)))).reshape(-1)
  if jax.process_index() == 0:
    fileio.remove(probe)
  multihost_utils.sync_global_devices('mae_jax_shared_workdir_removed')
  blind = [i for i, s in enumerate(seen) if not s]
  if blind:
    raise WorkdirError(f'--workdir={workdir}: process(es) {blind} of {jax.process_count()} do not see the file '
                     'process 0 wrote there; every process of a multi-host run must write to the same storage: '
                     'use a gs:// path or a shared file system')


def latest_step(workdir: str) -> int | None:
  """Newest complete checkpoint step in a workdir (as process 0 sees it), or None.

  All processes of a job must call it together.
  """
  directory = checkpoint_dir(workdir)
  if not _isdir_everywhere(directory):
    return None
  manager = _open(directory, ocp.CheckpointManagerOptions(create=False, read_only=True))
  try:
    return _agreed_step(manager.latest_step())
  finally:
    manager.close()


def _load(workdir, step, abstract_params, with_params=True):
  directory = checkpoint_dir(workdir)
  if not _isdir_everywhere(directory):
    raise FileNotFoundError(
        f'{directory} does not exist: --workdir must be the workdir of a pretraining or '
        f'fine-tuning run (python -m mae_jax.main --workdir=...)')
  manager = _open(directory, ocp.CheckpointManagerOptions(create=False, read_only=True))
  try:
    step = _agreed_step(manager.latest_step()) if step is None else step
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {directory}')
    if step not in manager.all_steps():
      manager.reload()  # Its list is read when it opens: a run still training may have finished the step since.
    if step not in manager.all_steps():
      raise FileNotFoundError(f'step {step} is not in {directory}; available: {manager.all_steps()}')
    try:
      restored = _restore_params_and_meta(manager, step, abstract_params, with_params)
    except Exception as e:  # pylint: disable=broad-except
      if is_misfit(e):
        raise  # The caller's tree does not fit: its caller names the setting.
      earlier = [s for s in manager.all_steps() if s < step]
      raise read_error(directory, step, e, f'if it is damaged, read an earlier step ({", ".join(map(str, earlier))})'
                       if earlier else 'if it is damaged, no earlier step is kept to read instead') from e
  finally:
    manager.close()
  meta = dict(restored['meta'] or {})
  config = meta.get('config', {})
  if isinstance(config, str):
    config = json.loads(config)
  meta['config'] = config
  return restored.get('params') if with_params else None, meta


def _restore_params_and_meta(manager, step, abstract_params, with_params):
  items = {'meta': ocp.args.JsonRestore()}
  if with_params:
    if abstract_params is None:  # as saved, onto this process's first device
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract_params = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          manager.item_metadata(step)['params'])
    items['params'] = ocp.args.StandardRestore(abstract_params)
  return manager.restore(step, args=ocp.args.Composite(**items))


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying target shardings, for restoring onto a mesh."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
