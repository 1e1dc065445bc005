"""The training loop every trainer shares: state, guarded update, resume, preemption, logging.

Pretraining (`train`), fine-tuning (`finetune`) and linear probing (`linprobe`)
build their model, optimizer, jitted step and input, then hand them to
`train_loop`. What they share lives here and nowhere else:

* `TrainState` (with optional BatchNorm statistics) and `guarded_update`, the
  optimizer step that skips non-finite steps;
* `restore_or_init`: resume from the workdir's newest checkpoint, else
  initialise straight into the shardings;
* `PreemptionFlag` and `save_or_stop`: SIGTERM saves one step (agreed across
  processes) and stops;
* `prefetch_to_mesh`, metric averaging and throughput, the workdir's
  config.json / results.json.
"""

import dataclasses
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import periodic_actions

from mae_jax import checkpoint as ckpt_lib
from mae_jax import console, fileio, parallel, wandb_writer
from mae_jax import flops as flops_lib
from mae_jax.models import vit

RESULTS_FILE = 'results.json'


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # Optimizer steps taken (skipped non-finite steps count too).
  params: Any  # What trains.
  opt_state: Any
  nonfinite_run: jax.Array  # Consecutive non-finite steps.
  nonfinite_total: jax.Array  # All skipped steps.
  halted: jax.Array  # Set when nonfinite_run reached the limit: the state stops changing.
  batch_stats: Any = flax.struct.field(default_factory=dict)  # BatchNorm statistics (the probe's head).


def new_state(params, tx: optax.GradientTransformation, batch_stats=None) -> TrainState:
  """Step 0 of `params` with a fresh optimizer state."""
  zero = jnp.zeros([], jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite_run=zero,
                    nonfinite_total=zero, halted=jnp.zeros([], jnp.bool_),
                    batch_stats={} if batch_stats is None else batch_stats)


class NonFiniteLossError(RuntimeError):
  """Raised when too many consecutive steps had non-finite loss or gradients."""


def guarded_update(state: TrainState, loss, grads, tx, max_nonfinite: int, **other_fields):
  """Applies the optimizer step unless the loss or gradients are non-finite.

  `other_fields` (e.g. batch_stats) are new values of further state fields,
  kept only when the step is applied. Returns (new_state, grad_norm, finite).

  The choice is a `lax.cond`: a finite step costs the optimizer update and
  nothing more, where selecting between new and old values of every
  parameter and moment would read and write them all a second time.
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~state.halted
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)

  def apply(operand):
    params, opt_state, _ = operand
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(other_fields)

  def skip(operand):
    # As the reference, a skipped step leaves the moments (and Adam's bias-correction count)
    # alone, but the learning-rate schedule follows the iteration: its counters advance.
    params, opt_state, others = operand
    advance = lambda x: x._replace(count=optax.safe_increment(x.count)) if is_schedule(x) else x
    return params, jax.tree.map(advance, opt_state, is_leaf=is_schedule), others

  others = {name: getattr(state, name) for name in other_fields}
  params, opt_state, others = jax.lax.cond(finite, apply, skip, (state.params, state.opt_state, others))
  nonfinite_run = jnp.where(finite, 0, state.nonfinite_run + 1)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, nonfinite_run=nonfinite_run,
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      halted=state.halted | (nonfinite_run >= max_nonfinite), **others)
  return new_state, grad_norm, finite


def value_and_grad(loss_fn, params, aux, inputs: tuple, rng, accum_steps: int, micro_sharding=None):
  """(loss, aux, grads) of loss_fn(params, aux, *inputs, key) -> (loss, new aux), over accum_steps micro-batches.

  With accum_steps > 1 every input splits into strided micro-batches (every
  device's rows in every micro-batch), micro-batch i draws its randomness from
  fold_in(rng, i), aux (e.g. BatchNorm statistics) threads through them in
  order, and loss and grads are the micro-batches' means.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, aux), grads = grad_fn(params, aux, *inputs, rng)
    return loss, aux, grads

  def split(x):  # [B, ...] -> [accum_steps, B / accum_steps, ...], strided.
    x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  def accumulate(carry, xs):
    loss_sum, grad_sum, aux = carry
    index, first, *rest = xs
    if micro_sharding is not None:
      first = jax.lax.with_sharding_constraint(first, micro_sharding)
    (loss, aux), grads = grad_fn(params, aux, first, *rest, jax.random.fold_in(rng, index))
    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads), aux), None

  zeros = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, params), aux)
  (loss, grads, aux), _ = jax.lax.scan(accumulate, zeros,
                                       (jnp.arange(accum_steps), *[split(x) for x in inputs]))
  return loss / accum_steps, aux, jax.tree.map(lambda g: g / accum_steps, grads)


def step_metrics(loss, grad_norm, finite, lr, batch: dict) -> dict:
  """The metrics every train step reports (and the corrupt-image count when the batch has one)."""
  metrics = {'train/loss': loss, 'train/grad_norm': grad_norm, 'train/lr': lr,
             'train/skipped': (~finite).astype(jnp.float32)}
  if 'corrupt' in batch:
    metrics['train/corrupt_images'] = jnp.sum(batch['corrupt'].astype(jnp.int32))
  return metrics


# ----------------------------------------------------------------------------
# Settings every trainer reads, checked before anything compiles.

# (key, what it does).
LOOP_SETTINGS = (
    ('log_every_steps', 'train metrics are averaged and written every log_every_steps steps'),
    ('max_nonfinite_steps', 'the run stops after this many non-finite steps in a row'),
    ('preemption_sync_every_steps', 'processes agree on a SIGTERM every this many steps'),
)


def check_loop_settings(config, mesh: jax.sharding.Mesh | None) -> None:
  """Loop settings, the batch against processes and mesh, the attention backend, W&B (if enabled)."""
  wandb_writer.check(config)  # An enabled W&B without the package fails here, on every process.
  for key, meaning in LOOP_SETTINGS:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{key}={value!r}: must be an integer >= 1 ({meaning})')
  if config.batch_size <= 0 or config.batch_size % jax.process_count():
    raise ValueError(f'batch_size={config.batch_size}: must be a positive multiple of the '
                     f'{jax.process_count()} processes')
  accum = config.grad_accum_steps
  if accum < 1 or config.batch_size % accum:
    raise ValueError(f'grad_accum_steps={accum}: must be >= 1 and divide batch_size={config.batch_size}')
  if mesh is not None:
    dp = parallel.batch_axis_size(mesh)
    micro = config.batch_size // accum
    if micro % dp:
      raise ValueError(
          f'batch_size={config.batch_size} (micro-batch {micro} with grad_accum_steps={accum}) is not '
          f'divisible by the data-parallel size {dp} = mesh data x fsdp {dict(mesh.shape)}')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError('num_train_steps and num_epochs are both <= 0: set one of them')
  if mesh is not None:
    check_mesh_feeds_whole_rows(np.vectorize(lambda d: d.process_index)(mesh.devices), mesh.axis_names,
                                config.mesh.num_devices, jax.device_count(), jax.process_count())
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  vit.check_attention_platform(config.model.attention_impl, platform)


def check_mesh_feeds_whole_rows(process_grid: np.ndarray, axis_names, num_devices_setting: int,
                                device_count: int, process_count: int) -> None:
  """Each process must own whole rows of the batch: else its local batch lands on the wrong rows.

  `process_grid` holds the process index of each device of the mesh (shape
  of the mesh). The batch is split over every axis but `tensor`, so the
  devices along `tensor` (which hold the same rows) must belong to one
  process, and with several processes every device must be in the mesh.
  """
  if process_count == 1:
    return
  if num_devices_setting not in (-1, device_count):
    raise ValueError(f'mesh.num_devices={num_devices_setting} with {device_count} devices over several processes '
                     'leaves devices out, so some processes would feed rows no device holds: set '
                     'mesh.num_devices=-1')
  if 'tensor' in axis_names:
    rows = np.moveaxis(process_grid, list(axis_names).index('tensor'), -1)
    if (rows != rows[..., :1]).any():
      raise ValueError(f'mesh.tensor={rows.shape[-1]} spans processes: the devices that hold the same batch '
                       'rows must be in one process (each process feeds its own rows); lower mesh.tensor to '
                       'at most the devices per process')


def train_steps(config, num_examples: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) from num_train_steps or num_epochs; total_steps >= 1."""
  steps_per_epoch = max(1, num_examples // config.batch_size)
  if config.num_train_steps > 0:
    return steps_per_epoch, int(config.num_train_steps)
  if config.num_epochs <= 0:
    raise ValueError('num_train_steps and num_epochs are both <= 0: set one of them')
  total_steps = round(config.num_epochs * steps_per_epoch)
  if total_steps < 1:
    raise ValueError(
        f'num_epochs={config.num_epochs} x {steps_per_epoch} steps per epoch ({num_examples} examples '
        f'of dataset.train_split // batch_size={config.batch_size}) is {total_steps} training steps: '
        'raise num_epochs or set num_train_steps > 0')
  return steps_per_epoch, total_steps


def mesh_context(mesh: jax.sharding.Mesh):
  """The context steps are traced and run under: sets the (abstract) mesh, so
  activation sharding constraints inside the model see it."""
  return jax.set_mesh(mesh)


# ----------------------------------------------------------------------------
# Preemption.

class PreemptionFlag:
  """Set by SIGTERM; the loop saves a checkpoint and exits cleanly.

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

  def install(self):
    if threading.current_thread() is not threading.main_thread() or jax_preemption_service():
      return self
    for sig in (signal.SIGTERM,):
      self._previous[sig] = signal.signal(sig, lambda *_: self.event.set())
    return self

  def uninstall(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def requested(self, step: int) -> bool:
    """Whether to save and stop after `step`; the same answer on every process."""
    if jax.process_count() == 1:
      return self.event.is_set()
    if step % self.sync_every_steps:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.event.is_set()))
    return bool(np.max(flags))


def jax_preemption_service() -> bool:
  """Whether jax.distributed's preemption service watches for SIGTERM in this multi-process job."""
  if jax.process_count() == 1:
    return False
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.preemption_sync_manager is not None


def _save_in_flight(checkpointer) -> int | None:
  """The step of a save still being written on any process (the same answer on every process)."""
  step = checkpointer.save_in_flight()
  if jax.process_count() == 1:
    return step
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  steps = multihost_utils.process_allgather(np.int64(-1 if step is None else step))
  return None if int(np.max(steps)) < 0 else int(np.max(steps))


def save_or_stop(checkpointer, preemption, step: int, total_steps: int, halted,
                 save_fn) -> tuple[bool, int | None]:
  """Saves on schedule, at the end and on preemption; (whether the loop must stop now, the newest save).

  A run halted on non-finite steps is not saved, so the last good checkpoint
  stays the newest. A preemption that comes while a scheduled save is still
  being written keeps that save instead of starting a second one inside the
  grace period (the resume redoes the steps after it).
  """
  preempted = preemption.requested(step) or checkpointer.reached_preemption(step)
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
    logging.warning('Preemption requested: saved step %s and stopping', saved)
    return True, saved
  return False, saved


# ----------------------------------------------------------------------------
# State: resume or initialise.

# Settings that fix which examples step s reads (and, through the batch size, the lr scaling and the
# steps per epoch): a resumed run must keep them, and the process count. Extending num_train_steps is
# allowed: it is how a run is continued.
RESUME_KEYS = ('seed', 'batch_size', 'dataset.name', 'dataset.train_split')


def _dotted(tree: dict, key: str):
  for part in key.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def check_resume(config, workdir: str) -> None:
  """Before anything is restored or compiled: a resume keeps the data order and the schedule.

  Compares RESUME_KEYS and the process count with the newest checkpoint's;
  config.resume_allow_changes=True resumes anyway (on purpose).
  """
  if ckpt_lib.latest_step(workdir) is None or config.resume_allow_changes:
    return
  meta = ckpt_lib.load_meta(workdir)
  saved, current = meta.get('config') or {}, config_dict(config)
  changed = [f'{key}: {_dotted(saved, key)!r} -> {_dotted(current, key)!r}' for key in RESUME_KEYS
             if _dotted(saved, key) is not None and _dotted(saved, key) != _dotted(current, key)]
  if meta.get('process_count', jax.process_count()) != jax.process_count():
    changed.append(f'process count: {meta["process_count"]} -> {jax.process_count()}')
  if changed:
    raise ValueError(
        f'{workdir} holds a run (step {meta.get("step")}) with other settings that fix the data order or the lr '
        f'schedule: {"; ".join(changed)}. Use a new --workdir, put the settings back, or set '
        '--config.resume_allow_changes=True to resume with them on purpose')


def restore_or_init(checkpointer, init_fn: Callable, init_rng, abstract_state, shardings, mesh, *,
                    saved_tree: Callable = lambda s: s.params,
                    from_saved: Callable = lambda saved: (saved, None)) -> tuple[TrainState, bool]:
  """(state, resumed): the newest checkpoint onto `shardings`, else init_fn(init_rng) computed into them.

  `abstract_state` is jax.eval_shape(init_fn, init_rng), which the caller has
  already traced to get `shardings`. `saved_tree(state)` is what a
  checkpoint's 'params' item holds (the params, or params and batch_stats);
  `from_saved` splits it back into (params, batch_stats or None).
  """
  latest = checkpointer.latest_step()
  if latest is None:
    with mesh_context(mesh):
      return jax.jit(init_fn, out_shardings=shardings)(init_rng), False
  saved, opt_state, meta = checkpointer.restore(
      ckpt_lib.abstract_like(saved_tree(abstract_state), saved_tree(shardings)),
      ckpt_lib.abstract_like(abstract_state.opt_state, shardings.opt_state), latest)
  params, batch_stats = from_saved(saved)
  put = lambda value, sharding: parallel.host_to_global(np.asarray(value, np.int32), sharding)
  state = TrainState(
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


def config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _write_workdir_file(workdir: str, name: str, text: str) -> None:
  """Process 0 writes workdir/name (the one place the loop writes a workdir file)."""
  if jax.process_index() == 0:
    fileio.write_text(fileio.join(workdir, name), text)


def write_config(config, workdir: str) -> None:
  _write_workdir_file(workdir, 'config.json', config.to_json_best_effort(indent=2))


def write_results(workdir: str, results: dict) -> None:
  _write_workdir_file(workdir, RESULTS_FILE, json.dumps(results, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------
# The loop.

@dataclasses.dataclass
class LoopResult:
  state: TrainState
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


def _check_corrupt(corrupt: int, seen: int, config) -> None:
  """Stops a run whose input is mostly undecodable: that is a bug, not a few bad files."""
  limit = config.dataset.max_corrupt_fraction
  if seen and corrupt / seen > limit:
    raise ValueError(
        f'{corrupt} of the {seen} images read so far ({100 * corrupt / seen:.1f}%) could not be decoded or '
        f'preprocessed, more than dataset.max_corrupt_fraction={limit}: check the data set '
        f'(dataset.name={config.dataset.name!r}) and the preprocessing (the warnings above name the errors), '
        f'or raise the setting')


def checkpoint_meta(state: TrainState, config, **extra) -> dict:
  """What a checkpoint's 'meta' item holds: the counters, the config and `extra`."""
  return {'step': int(jax.device_get(state.step)),
          'nonfinite_run': int(jax.device_get(state.nonfinite_run)),
          'nonfinite_total': int(jax.device_get(state.nonfinite_total)),
          'process_count': jax.process_count(), **extra, 'config': config_dict(config)}


def train_loop(config, workdir: str, mesh, *, state: TrainState, step_fn: Callable, batches: Iterator[dict],
               total_steps: int, checkpointer, writer, saved_tree: Callable = lambda s: s.params,
               extra_meta: Callable[[dict], dict] = lambda evals: {},
               evaluate: Callable | None = None, flops_per_image: float | None = None) -> LoopResult:
  """Trains from state.step to total_steps: logs, evaluates, checkpoints, stops on SIGTERM.

  Args:
    step_fn: the jitted step, (state, global batch) -> (state, metrics).
    batches: global batches (prefetch_to_mesh) from state.step on.
    saved_tree: what a checkpoint's 'params' item holds.
    extra_meta: evals -> further entries of the checkpoint's meta.
    evaluate: (step, state, batch) -> metrics to write, or None at steps that
      do not evaluate. Its time is not counted in the throughput.
    flops_per_image: training FLOPs per image, for perf/mfu.
  """
  start_step = int(jax.device_get(state.step))
  progress = console.ProgressHook(total_steps, start_step)  # A bar on a terminal, else a line per log period.
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
    with mesh_context(mesh):
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
          _check_corrupt(corrupt_seen, (step - start_step) * config.batch_size, config)
          pending = []
          window.restart(step)
          if bool(jax.device_get(state.halted)):
            raise NonFiniteLossError(
                f'{config.max_nonfinite_steps} consecutive steps had a non-finite loss or gradients '
                f'(at step {step}); the last good checkpoint is step {checkpointer.latest_step()}. '
                'Lower optim.base_lr, set optim.grad_clip_norm, or check the input data.')
        if evaluate is not None:  # Evaluations and pictures are not training time.
          results = window.excluding(evaluate, step, state, batch)
          if results:
            evals = dict(results)
            writer.write_scalars(step, evals)
            last.update(evals)
            progress.update_metrics(step, evals)
        save = lambda: checkpointer.save(step, saved_tree(state), state.opt_state,
                                         checkpoint_meta(state, config, **extra_meta(evals)))
        stop, saved_step = window.excluding(save_or_stop, checkpointer, preemption, step, total_steps,
                                            state.halted, save)
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
