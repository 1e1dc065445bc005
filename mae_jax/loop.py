"""The training loop every trainer shares: resume, preemption, logging.

Pretraining (`train`), fine-tuning (`finetune`) and linear probing (`linprobe`)
build their model, optimizer, jitted step (from `train_state`) and input, then
hand them to `train_loop`. What they share lives here and nowhere else:

* `check_loop_settings`: the step's settings and the metric writers', before
  anything is read or compiled;
* `restore_or_init`: resume from the workdir's newest checkpoint, else
  initialise straight into the shardings;
* `PreemptionFlag` and `save_or_stop`: SIGTERM saves one step (agreed across
  processes) and stops;
* `prefetch_to_mesh`, metric averaging and throughput, the workdir's
  config.json / results.json.
"""

import dataclasses
import json
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from absl import logging
from clu import periodic_actions
from flax import traverse_util

from mae_jax import checkpoint as ckpt_lib
from mae_jax import console, fileio, parallel, train_state, wandb_writer
from mae_jax import flops as flops_lib
from mae_jax.preemption import (  # noqa: F401  # Part of the loop's API.
  STOPPED_EXIT_CODE,
  PreemptionFlag,
  Stopped,
  jax_preemption_service,
  sigterm_exits,
)

RESULTS_FILE = 'results.json'


def check_loop_settings(config, mesh: jax.sharding.Mesh | None) -> None:
  """What every trainer checks before it reads data or compiles: W&B (if enabled), then the step's settings."""
  wandb_writer.check(config)  # An enabled W&B without the package fails here, on every process.
  train_state.check_step_settings(config, mesh)


# ----------------------------------------------------------------------------
# Preemption (the handlers are mae_jax.preemption's).

def _save_in_flight(checkpointer) -> int | None:
  """The step of a save still being written on any process (the same answer on every process)."""
  step = checkpointer.save_in_flight()
  if jax.process_count() == 1:
    return step
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  steps = multihost_utils.process_allgather(np.int64(-1 if step is None else step))
  return None if int(np.max(steps)) < 0 else int(np.max(steps))


def stop_requested(checkpointer, preemption, step: int) -> bool:
  """Whether the job must save and stop after `step` (SIGTERM, Ctrl-C, JAX's preemption notice); the same
  answer on every process. Ask once per step: both sources may synchronise the processes."""
  return preemption.requested(step) or checkpointer.reached_preemption(step)


def save_or_stop(checkpointer, preemption, step: int, total_steps: int, halted,
                 save_fn, preempted: bool | None = None) -> tuple[bool, int | None]:
  """Saves on schedule, at the end and on preemption; (whether the loop must stop now, the newest save).

  A run halted on non-finite steps is not saved, so the last good checkpoint
  stays the newest. A preemption that comes while a scheduled save is still
  being written keeps that save instead of starting a second one inside the
  grace period (the resume redoes the steps after it). `preempted`: the
  step's `stop_requested` when the caller asked already.
  """
  if preempted is None:
    preempted = stop_requested(checkpointer, preemption, step)
  scheduled = checkpointer.should_save(step) or step == total_steps
  saved = step
  if scheduled or preempted:
    in_flight = None if scheduled else _save_in_flight(checkpointer)
    if bool(jax.device_get(halted)):
      logging.warning('Not saving step %d: the run halted on non-finite steps', step)
      saved = checkpointer.latest_step()
    elif in_flight is not None:
      logging.warning('Preemption at step %d while the save of step %d is being written: keeping that save, '
                      'not writing a second one in the grace period (a resume redoes steps %d-%d)',
                      step, in_flight, in_flight + 1, step)
      saved = in_flight
    else:
      save_fn()
  if preempted and step < total_steps:
    logging.warning('Asked to stop (SIGTERM, Ctrl-C or a preemption notice): saved step %s; rerun the same '
                    'command to resume', saved)
    return True, saved
  return False, saved


# ----------------------------------------------------------------------------
# State: resume or initialise.

# Settings that fix which examples step s reads (and, through the batch size, the lr scaling and the
# steps per epoch): a resumed run must keep them, and the process count. Extending num_train_steps is
# allowed: it is how a run is continued.
RESUME_KEYS = ('seed', 'batch_size', 'dataset.name', 'dataset.train_split', 'dataset.shuffle_buffer')


def _dotted(tree: dict, key: str):
  for part in key.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


class ResumeError(ValueError):
  """The workdir holds a run with other settings; the message says what changed and what to do."""


CheckpointReadError = ckpt_lib.CheckpointReadError


def check_resume(config, workdir: str) -> None:
  """Before anything is restored or compiled: a resume keeps the data order and the schedule.

  Compares RESUME_KEYS and the process count with the newest checkpoint's;
  config.resume_allow_changes=True resumes anyway (on purpose).
  """
  if ckpt_lib.latest_step(workdir) is None:
    return
  meta = ckpt_lib.load_meta(workdir)
  saved, current = meta.get('config') or {}, config_dict(config)
  changed = [f'{key}: {_dotted(saved, key)!r} -> {_dotted(current, key)!r}' for key in RESUME_KEYS
             if _dotted(saved, key) is not None and _dotted(saved, key) != _dotted(current, key)]
  if meta.get('process_count', jax.process_count()) != jax.process_count():
    changed.append(f'process count: {meta["process_count"]} -> {jax.process_count()}')
  if changed and not config.resume_allow_changes:
    raise ResumeError(
        f'{workdir} holds a run (step {meta.get("step")}) with other settings that fix the data order or the lr '
        f'schedule: {"; ".join(changed)}. Use a new --workdir, put the settings back, or set '
        '--config.resume_allow_changes=True to resume with them on purpose')
  others = changed_settings(saved, current)
  if others and not 0 < config.num_train_steps <= int(meta.get('step') or 0):  # (Not when nothing trains.)
    listed = '; '.join(others[:8]) + (f'; and {len(others) - 8} more' if len(others) > 8 else '')
    logging.warning('Resuming %s at step %s with settings other than its checkpoint\'s (kept in %s): %s', workdir,
                    meta.get('step'), CONFIG_FILE_UNTIL.format(step=meta.get('step')), listed)


def changed_settings(saved: dict, current: dict) -> list[str]:
  """'key: old -> new' for every setting of `current` that differs from `saved` (a config_dict each)."""
  old, new = traverse_util.flatten_dict(saved, sep='.'), traverse_util.flatten_dict(current, sep='.')
  return [f'{key}: {old.get(key)!r} -> {new[key]!r}' for key in sorted(new)
          if key in old and old[key] != new[key] and key != 'resume_allow_changes']


def restore_or_init(checkpointer, init_fn: Callable, init_rng, abstract_state, shardings, mesh, *,
                    saved_tree: Callable = lambda s: s.params,
                    from_saved: Callable = lambda saved: (saved, None),
                    config=None) -> tuple[train_state.TrainState, bool]:
  """(state, resumed): the newest checkpoint onto `shardings`, else init_fn(init_rng) computed into them.

  `abstract_state` is jax.eval_shape(init_fn, init_rng), which the caller has
  already traced to get `shardings`. `saved_tree(state)` is what a
  checkpoint's 'params' item holds (the params, or params and batch_stats);
  `from_saved` splits it back into (params, batch_stats or None). A
  checkpoint that does not fit (a model or optimizer setting changed) is a
  ResumeError naming the settings that differ from `config`.
  """
  latest = checkpointer.latest_step()
  if latest is None:
    with train_state.mesh_context(mesh):
      return jax.jit(init_fn, out_shardings=shardings)(init_rng), False
  try:
    saved, opt_state, meta = checkpointer.restore(
        ckpt_lib.abstract_like(saved_tree(abstract_state), saved_tree(shardings)),
        ckpt_lib.abstract_like(abstract_state.opt_state, shardings.opt_state), latest)
  except Exception as e:  # pylint: disable=broad-except
    # Orbax: the saved trees' structure or shapes differ from this run's, or a read failed.
    misfit = _misfit(checkpointer, latest, config, e) if isinstance(e, ValueError) else None
    if misfit is not None:
      raise misfit from None
    raise _unreadable(checkpointer, latest, e) from e
  params, batch_stats = from_saved(saved)
  put = lambda value, sharding: parallel.host_to_global(np.asarray(value, np.int32), sharding)
  state = train_state.TrainState(
      step=put(meta['step'], shardings.step), params=params, opt_state=opt_state,
      nonfinite_run=put(meta.get('nonfinite_run', 0), shardings.nonfinite_run),
      nonfinite_total=put(meta.get('nonfinite_total', 0), shardings.nonfinite_total),
      halted=parallel.host_to_global(np.zeros([], np.bool_), shardings.halted),
      batch_stats=abstract_state.batch_stats if batch_stats is None else batch_stats)
  logging.info('Resumed from checkpoint at step %d', meta['step'])
  return state, True


# ----------------------------------------------------------------------------
# Input and the workdir's files.

def prefetch_to_mesh(iterator: Iterator[dict], mesh, size: int = 2) -> Iterator[dict]:
  """Moves host batches into global arrays sharded over the batch axes, `size` steps ahead."""
  queue = []
  for local in iterator:
    queue.append(parallel.global_batch_from_local(local, mesh))
    if len(queue) > size:
      yield queue.pop(0)
  while queue:
    yield queue.pop(0)




def _misfit(checkpointer, step: int, config, error: Exception) -> ResumeError | None:
  """The ResumeError for a checkpoint whose trees do not fit this run (what Orbax found, what changed).

  None when nothing says so: no model.* / optim.* setting changed and Orbax's
  message is not about the trees (an unreadable file, a storage error): the
  caller raises a CheckpointReadError, which a launcher may retry.
  """
  detail = ckpt_lib.error_text(error)
  detail = detail if len(detail) <= 240 else detail[:240] + '...'
  changed = []
  if config is not None:
    try:
      meta = ckpt_lib.load_meta(checkpointer.workdir, step)
    except Exception:  # pylint: disable=broad-except  # Damaged too: the caller reports the read error.
      meta = {}
    saved = traverse_util.flatten_dict(meta.get('config') or {}, sep='.')
    current = traverse_util.flatten_dict(config_dict(config), sep='.')
    changed = [f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in sorted(set(saved) | set(current))
               if k.startswith(('model.', 'optim.')) and saved.get(k) != current.get(k)]
  if not changed and not any(words in detail for words in ckpt_lib.MISFIT_MESSAGES):
    return None
  return ResumeError(
      f'{checkpointer.workdir} holds a run (step {step}) whose parameters or optimizer state do not fit this '
      f'config{": " + "; ".join(changed) if changed else ""}. Use a new --workdir or put the settings back '
      f'(Orbax: {detail})')


def _unreadable(checkpointer, step: int, error: Exception) -> CheckpointReadError:
  """What failed, and how to resume from the checkpoint before it."""
  directory = ckpt_lib.checkpoint_dir(checkpointer.workdir)
  earlier = [s for s in checkpointer.all_steps() if s < step]
  aside = f'move {fileio.join(directory, str(step))} out of {directory}'
  fix = (f'{aside} to resume from step {max(earlier)}' if earlier else
         f'{aside} (the only checkpoint) to start again from step 0')
  return ckpt_lib.read_error(directory, step, error, f'if the checkpoint is damaged, {fix}')


def config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _write_workdir_file(workdir: str, name: str, text: str) -> None:
  """Process 0 writes workdir/name (the one place the loop writes a workdir file)."""
  if jax.process_index() == 0:
    fileio.write_text(fileio.join(workdir, name), text)


CONFIG_FILE = 'config.json'
CONFIG_FILE_UNTIL = 'config.until_step_{step}.json'  # The config a run trained with before it was changed.


def write_config(config, workdir: str, start_step: int = 0, total_steps: int | None = None) -> None:
  """WORKDIR/config.json: the run's settings. A resume with other settings first keeps the earlier file as
  config.until_step_START.json; a run with nothing to train leaves it as it is."""
  if total_steps is not None and start_step >= total_steps:
    return
  path = fileio.join(workdir, CONFIG_FILE)
  text = config.to_json_best_effort(indent=2)
  if start_step and jax.process_index() == 0 and fileio.exists(path):
    earlier = fileio.read_text(path)
    try:
      same = json.loads(earlier) == json.loads(text)
    except ValueError:
      same = False
    until = CONFIG_FILE_UNTIL.format(step=start_step)
    if not same and not fileio.exists(fileio.join(workdir, until)):  # (A resume that saved nothing wrote it.)
      _write_workdir_file(workdir, until, earlier)
  _write_workdir_file(workdir, CONFIG_FILE, text)


def write_results(workdir: str, results: dict) -> None:
  _write_workdir_file(workdir, RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class LoopResult:
  state: train_state.TrainState
  metrics: dict  # The last logged train metrics and evaluations.
  evals: dict  # The last evaluation's metrics.
  status: str  # 'done' or 'preempted'.
  step: int  # The steps trained.
  saved_step: int | None = None  # The newest checkpoint: where a resume starts (below `step` when a
  # preemption kept a save that was in flight).


class Window:
  """Wall time of a log window's training steps: evaluations, pictures and saves are left out."""

  def __init__(self, start_step: int):
    self.start_step = start_step
    self.start = None  # Set after the first step (its compilation is not training time).
    self.paused = 0.0  # Seconds spent outside training steps.
    self.input_wait = 0.0  # Seconds the loop waited for the next batch.

  def restart(self, step: int) -> None:
    self.start_step, self.start, self.paused, self.input_wait = step, time.time(), 0.0, 0.0

  def train_seconds(self) -> float | None:
    return None if self.start is None else max(time.time() - self.start - self.paused, 1e-9)

  def excluding(self, fn, *args):
    """fn(*args), its time not counted as training."""
    start = time.time()
    try:
      return fn(*args)
    finally:
      if self.start is not None:
        self.paused += time.time() - start


# Step metrics that are counts over the log window, not means.
COUNTED = ('train/corrupt_images', 'train/skipped')


def window_scalars(fetched: list[dict]) -> dict:
  """The log window's scalars: means over the applied steps, counts of the skipped and corrupt.

  A skipped (non-finite) step's loss and gradient norm are left out of the
  means, so one bad step does not turn the window's train/loss into NaN; a
  window of skipped steps only has NaN means. train/lr is the last step's.
  """
  applied = [m for m in fetched if not m.get('train/skipped', 0)]
  scalars = {}
  for key in fetched[-1]:
    if key in COUNTED:
      scalars[key] = float(np.sum([m[key] for m in fetched]))
    else:
      scalars[key] = float(np.mean([m[key] for m in applied])) if applied else float('nan')
  scalars['train/lr'] = float(fetched[-1]['train/lr'])
  return scalars


def _log_metrics(writer, step: int, pending: list, state, window: Window, batch_size: int,
                 flops_per_image: float | None) -> dict:
  """Averages the pending step metrics (one host sync per log period) and writes them."""
  scalars = window_scalars(jax.device_get(pending))
  scalars['train/nonfinite_total'] = float(jax.device_get(state.nonfinite_total))
  seconds = window.train_seconds()
  if seconds is not None and step > window.start_step:
    images_per_sec = (step - window.start_step) * batch_size / seconds
    scalars['perf/images_per_sec'] = images_per_sec
    scalars['perf/images_per_sec_per_device'] = images_per_sec / jax.device_count()
    scalars['perf/step_time_sec'] = seconds / (step - window.start_step)
    scalars['perf/input_wait_fraction'] = window.input_wait / seconds
    peak = flops_lib.peak_flops_per_device()
    if flops_per_image and peak:
      scalars['perf/mfu'] = images_per_sec * flops_per_image / (peak * jax.device_count())
  writer.write_scalars(step, scalars)
  return scalars


# Training stops on corrupt images only once they exceed the fraction of at least this many images: one bad
# image among the first few batches of a large data set is not a broken data set.
CORRUPT_CHECK_MIN_IMAGES = 1000


def check_corrupt(corrupt: int, seen: int, limit: float, what: str, fix: str = 'check the data set',
                  min_seen: int = 0) -> None:
  """Stops when more than `limit` of the `seen` images (`what`) are undecodable: a bug, not a few bad files.

  min_seen: the fraction is taken of max(seen, min_seen) images (while fewer are read, more than
  limit * min_seen corrupt images stop it).
  """
  if seen and corrupt > limit * max(seen, min_seen):
    raise ValueError(
        f'{corrupt} of the {seen} images {what} ({100 * corrupt / seen:.1f}%) could not be decoded or '
        f'preprocessed, more than dataset.max_corrupt_fraction={limit}: {fix}, or raise the setting')


def check_eval_corrupt(corrupt: int, seen: int, limit: float, what: str) -> None:
  """Evaluation images that could not be decoded are left out: a warning, an error above `limit`.

  `seen`: the images read, corrupt included; `what` names them (e.g. the split).
  """
  if not corrupt:
    return
  check_corrupt(corrupt, seen, limit, f'of {what}')
  logging.warning('%d of the %d images of %s could not be decoded or preprocessed: left out of the evaluation',
                  corrupt, seen, what)


def checkpoint_meta(state: train_state.TrainState, config, **extra) -> dict:
  """What a checkpoint's 'meta' item holds: the counters, the config and `extra`."""
  return {'step': int(jax.device_get(state.step)),
          'nonfinite_run': int(jax.device_get(state.nonfinite_run)),
          'nonfinite_total': int(jax.device_get(state.nonfinite_total)),
          'process_count': jax.process_count(), **extra, 'config': config_dict(config)}


def train_loop(config, workdir: str, mesh, *, state: train_state.TrainState, step_fn: Callable, batches: Iterator[dict],
               total_steps: int, checkpointer, writer, saved_tree: Callable = lambda s: s.params,
               extra_meta: Callable[[dict], dict] = lambda evals: {},
               evaluate: Callable | None = None, flops_per_image: float | None = None, lease=None) -> LoopResult:
  """Trains from state.step to total_steps: logs, evaluates, checkpoints, stops on SIGTERM.

  Args:
    step_fn: the jitted step, (state, global batch) -> (state, metrics).
    batches: global batches (prefetch_to_mesh) from state.step on.
    saved_tree: what a checkpoint's 'params' item holds.
    extra_meta: evals -> further entries of the checkpoint's meta.
    evaluate: (step, state, batch) -> metrics to write, or None at steps that
      do not evaluate. Its time is not counted in the throughput.
    flops_per_image: training FLOPs per image, for perf/mfu.
    lease: the job's `workdir_lease.Lease`: checked at log steps, marked when the job is asked to stop.
  """
  start_step = int(jax.device_get(state.step))
  progress = console.ProgressHook(total_steps, start_step)  # A bar on a terminal, else a line per log period.
  if start_step >= total_steps:
    progress.note(f'{workdir} already holds step {start_step} (num_train_steps={total_steps}): nothing to train '
                  '(a larger num_train_steps trains further).')
  elif start_step:
    progress.note(f'Resuming at step {start_step} from the checkpoint in {workdir}')
  hooks = [periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps), progress]
  if config.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                          first_profile=start_step + 10))
  preemption = PreemptionFlag(config.preemption_sync_every_steps).install()
  pending, last, evals, status = [], {}, {}, 'done'
  corrupt_seen = 0
  window = Window(start_step)
  step, saved_step = start_step, None
  try:
    with train_state.mesh_context(mesh):
      while step < total_steps:
        wait_start = time.time()
        batch = next(batches)
        window.input_wait += time.time() - wait_start
        state, metrics = step_fn(state, batch)
        pending.append(metrics)
        step += 1
        for hook in hooks:
          window.excluding(hook, step)
        if window.start is None:  # The first step includes compilation: time from its end.
          jax.block_until_ready(metrics)
          window.restart(step)
        if step % config.log_every_steps == 0 or step == total_steps:
          scalars = _log_metrics(writer, step, pending, state, window, config.batch_size, flops_per_image)
          last.update(scalars)
          progress.update_metrics(step, scalars)
          corrupt_seen += int(last.get('train/corrupt_images', 0))
          if lease is not None:  # Renewed in the background; taken over by another job after a stall?
            lease.check()
          check_corrupt(corrupt_seen, (step - start_step) * config.batch_size, config.dataset.max_corrupt_fraction,
                        'read so far', f'check the data set (dataset.name={config.dataset.name!r}) and the '
                        'preprocessing (the warnings above name the errors)', min_seen=CORRUPT_CHECK_MIN_IMAGES)
          pending = []
          window.restart(step)
          if bool(jax.device_get(state.halted)):
            raise train_state.NonFiniteLossError(
                f'{config.max_nonfinite_steps} consecutive steps had a non-finite loss or gradients '
                f'(at step {step}); the last good checkpoint is step {checkpointer.latest_step()}. '
                'Lower optim.base_lr, set optim.grad_clip_norm, or check the input data.')
        preempted = stop_requested(checkpointer, preemption, step)
        if preempted and lease is not None:
          lease.mark_stopping()  # A job relaunched meanwhile waits for this one's save instead of refusing.
        if preempted and step < total_steps and evaluate is not None:
          # The grace period is for the save: an evaluation due now (a kNN bank, a pass over a split) could
          # outlast it. The resumed run goes on from this step; this step's evaluation is not redone.
          # In the log only: the terminal's stop line says what matters, and most steps have no evaluation due.
          logging.info('Stopping after step %d: its evaluation, if one was due, is skipped', step)
        elif evaluate is not None:  # Evaluations and pictures are not training time.
          results = window.excluding(evaluate, step, state, batch)
          if results:
            evals = dict(results)
            writer.write_scalars(step, evals)
            last.update(evals)
            progress.update_metrics(step, evals)
        save = lambda: checkpointer.save(step, saved_tree(state), state.opt_state,
                                         checkpoint_meta(state, config, **extra_meta(evals)))
        stop, saved_step = window.excluding(save_or_stop, checkpointer, preemption, step, total_steps,
                                            state.halted, save, preempted)
        if checkpointer.should_save(step):  # gs:// workdirs: the log so far, should the worker die unannounced.
          window.excluding(console.copy_log_to_workdir)
        if stop:
          status = 'preempted'
          break
  finally:
    progress.close()
    # The SIGTERM handler stays until the last save is durable: a second SIGTERM (a requeue, a
    # launcher's kill) during the final commit must not kill the process half-way.
    try:
      checkpointer.close()
    finally:
      preemption.uninstall()
      writer.flush()
  return LoopResult(state=state, metrics=last, evals=evals, status=status, step=step,
                    saved_step=saved_step if status == 'preempted' else step)
