"""MAE pretraining: `train_and_evaluate(config, workdir)`.

One code path from one CPU to a TPU pod: a named mesh, state initialised
directly into its shardings, a jitted train step with donated state, Orbax
checkpoints with automatic resume, preemption handling and clu metrics.
"""

import functools
import json
import os
import signal
import threading
import time
from typing import Any, Iterator

from absl import logging
from clu import parameter_overview
from clu import periodic_actions
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mae_jax import checkpoint as ckpt_lib
from mae_jax import flops as flops_lib
from mae_jax import metrics as metrics_lib
from mae_jax import models
from mae_jax import optim
from mae_jax import parallel
from mae_jax.models import vit


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken (skipped non-finite steps count too)
  params: Any
  opt_state: Any
  nonfinite_run: jax.Array  # consecutive non-finite steps
  nonfinite_total: jax.Array  # all skipped steps
  halted: jax.Array  # set when nonfinite_run reached the limit: the state stops changing


class NonFiniteLossError(RuntimeError):
  """Raised when too many consecutive steps had non-finite loss or gradients."""


class PreemptionFlag:
  """Set by SIGTERM; the loop saves a checkpoint and exits cleanly.

  With several processes every one must stop at the same step (the save is
  collective), but SIGTERM reaches them at different times: `requested(step)`
  then agrees across processes every `sync_every_steps` steps (an all-gather
  of one flag per process) and says True on all of them at the same step.
  """

  def __init__(self, sync_every_steps: int = 10):
    if sync_every_steps < 1:
      raise ValueError(f'preemption_sync_every_steps={sync_every_steps}: must be >= 1')
    self.event = threading.Event()
    self.sync_every_steps = sync_every_steps
    self._previous = {}

  def install(self):
    if threading.current_thread() is not threading.main_thread():
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


# ----------------------------------------------------------------------------
# Config: model, data size, validation before any compile.

MODEL_CONFIG_KEYS_NOT_FIELDS = ('name',)


def build_model(config: ml_collections.ConfigDict):
  """The MaskedAutoencoder a config describes (data shape, loss and perf knobs included)."""
  overrides = {k: v for k, v in config.model.items() if k not in MODEL_CONFIG_KEYS_NOT_FIELDS}
  overrides.update(image_size=config.dataset.image_size, in_channels=config.dataset.channels,
                   norm_pix_loss=config.norm_pix_loss)
  return models.get_model(config.model.name, **overrides)


def num_train_examples(config) -> int:
  if config.dataset.name == 'synthetic':
    return int(config.dataset.get('num_examples', 1024))
  from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.num_examples(config.dataset, config.dataset.train_split)


def train_steps(config, num_examples: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) from num_train_steps or num_epochs; total_steps >= 1."""
  steps_per_epoch = max(1, num_examples // config.batch_size)
  if config.get('num_train_steps', -1) > 0:
    return steps_per_epoch, int(config.num_train_steps)
  if config.get('num_epochs', 0) <= 0:
    raise ValueError('num_train_steps and num_epochs are both <= 0: set one of them')
  total_steps = round(config.num_epochs * steps_per_epoch)
  if total_steps < 1:
    raise ValueError(
        f'num_epochs={config.num_epochs} x {steps_per_epoch} steps per epoch ({num_examples} examples '
        f'of dataset.train_split // batch_size={config.batch_size}) is {total_steps} training steps: '
        'raise num_epochs or set num_train_steps > 0')
  return steps_per_epoch, total_steps


# The loop settings both trainers read: (key, default, what it does).
LOOP_SETTINGS = (
    ('log_every_steps', None, 'train metrics are averaged and written every log_every_steps steps'),
    ('max_nonfinite_steps', 10, 'the run stops after this many non-finite steps in a row'),
    ('preemption_sync_every_steps', 10, 'processes agree on a SIGTERM every this many steps'),
)


def check_loop_settings(config, mesh: jax.sharding.Mesh | None) -> None:
  """The checks the pretraining and downstream trainers share: loop settings, attention backend."""
  for key, default, meaning in LOOP_SETTINGS:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{key}={value!r}: must be an integer >= 1 ({meaning})')
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  vit.check_attention_platform(config.model.get('attention_impl', 'xla'), platform)


def validate_config(config, mesh: jax.sharding.Mesh | None = None) -> None:
  """Fails fast, naming the key, on settings that cannot work. No compile happens here."""
  if config.batch_size <= 0:
    raise ValueError(f'batch_size={config.batch_size}: must be positive')
  if config.batch_size % jax.process_count():
    raise ValueError(f'batch_size={config.batch_size} is not divisible by the {jax.process_count()} processes')
  accum = config.get('grad_accum_steps', 1)
  if accum < 1 or config.batch_size % accum:
    raise ValueError(f'grad_accum_steps={accum}: must be >= 1 and divide batch_size={config.batch_size}')
  if mesh is not None:
    dp = parallel.batch_axis_size(mesh)
    micro = config.batch_size // accum
    if micro % dp:
      raise ValueError(
          f'batch_size={config.batch_size} (micro-batch {micro} with grad_accum_steps={accum}) is not '
          f'divisible by the data-parallel size {dp} = mesh data x fsdp {dict(mesh.shape)}')
  models.num_visible(build_model(config).num_patches, config.mask_ratio)
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise ValueError('num_train_steps and num_epochs are both <= 0: set one of them')
  check_loop_settings(config, mesh)


def mesh_context(mesh: jax.sharding.Mesh):
  """The context the step is traced and run under: sets the (abstract) mesh, so
  activation sharding constraints inside the model see it."""
  return jax.set_mesh(mesh)


# ----------------------------------------------------------------------------
# The step.

def init_state(model, tx, config, rng) -> TrainState:
  size = config.dataset.image_size
  images = jnp.zeros((1, size, size, config.dataset.channels), jnp.float32)
  params_rng, mask_rng = jax.random.split(rng)
  params = model.init({'params': params_rng, 'mask': mask_rng}, images, mask_ratio=config.mask_ratio,
                      train=False)['params']
  zero = jnp.zeros([], jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), nonfinite_run=zero,
                    nonfinite_total=zero, halted=jnp.zeros([], jnp.bool_))


def guarded_update(state, loss, grads, tx, max_nonfinite: int, **other_fields):
  """Applies the optimizer step unless the loss or gradients are non-finite.

  `state` is any flax.struct state with step, params, opt_state, nonfinite_run,
  nonfinite_total and halted; `other_fields` (e.g. batch_stats) are new values
  of further fields, kept only when the step is applied. Returns
  (new_state, grad_norm, finite).
  """
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~state.halted
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  # As the reference, a skipped step leaves the moments (and Adam's bias-correction count)
  # alone, but the learning-rate schedule follows the iteration: its counters advance.
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  keep_opt = lambda new, old: jax.tree.map(lambda n, o: n if is_schedule(n) else keep(n, o), new, old,
                                           is_leaf=is_schedule)
  nonfinite_run = jnp.where(finite, 0, state.nonfinite_run + 1)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep_opt(new_opt_state, state.opt_state),
      nonfinite_run=nonfinite_run,
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      halted=state.halted | (nonfinite_run >= max_nonfinite),
      **{name: keep(value, getattr(state, name)) for name, value in other_fields.items()})
  return new_state, grad_norm, finite


def train_step(state: TrainState, batch: dict, *, model, tx, lr_fn, mask_ratio: float, accum_steps: int,
               max_nonfinite: int, base_rng, micro_sharding=None):
  """One optimizer step over the global batch (optionally as accumulated micro-batches)."""
  rng = jax.random.fold_in(base_rng, state.step)

  def loss_fn(params, images, key):
    loss, _, _ = model.apply({'params': params}, images, mask_ratio=mask_ratio, rngs={'mask': key},
                             train=True)
    return loss

  images = batch['image']
  if accum_steps == 1:
    loss, grads = jax.value_and_grad(loss_fn)(state.params, images, rng)
  else:
    # Strided split keeps every device's rows in every micro-batch.
    micro = images.reshape((images.shape[0] // accum_steps, accum_steps) + images.shape[1:])
    micro = jnp.swapaxes(micro, 0, 1)

    def accumulate(carry, xs):
      index, chunk = xs
      if micro_sharding is not None:
        chunk = jax.lax.with_sharding_constraint(chunk, micro_sharding)
      loss, grads = jax.value_and_grad(loss_fn)(state.params, chunk, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros([], jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum_steps), micro))
    loss, grads = jax.tree.map(lambda x: x / accum_steps, (loss, grads))

  new_state, grad_norm, finite = guarded_update(state, loss, grads, tx, max_nonfinite)
  metrics = {'train/loss': loss, 'train/grad_norm': grad_norm, 'train/lr': lr_fn(state.step),
             'train/skipped': (~finite).astype(jnp.float32)}
  if 'corrupt' in batch:
    metrics['train/corrupt_images'] = jnp.sum(batch['corrupt'].astype(jnp.int32))
  return new_state, metrics


# ----------------------------------------------------------------------------
# Input.

def create_input_iterator(config, start_step: int) -> Iterator[dict]:
  """This process's local batches from `start_step` on; a pure function of (seed, step)."""
  kwargs = dict(global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
                process_index=jax.process_index(), process_count=jax.process_count())
  if config.dataset.name == 'synthetic':
    from mae_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.create_pretrain_iterator(config.dataset, **kwargs)
  from mae_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline.create_pretrain_iterator(config.dataset, **kwargs)


def prefetch_to_mesh(iterator: Iterator[dict], mesh, size: int = 2) -> Iterator[dict]:
  """Moves host batches into global device arrays `size` steps ahead."""
  queue = []
  for local in iterator:
    # 'corrupt' marks rows whose record could not be decoded (replaced by another row of the batch).
    corrupt = local.get('corrupt', np.zeros((len(local['image']),), bool))
    queue.append(parallel.global_batch_from_local({'image': local['image'], 'corrupt': corrupt}, mesh))
    if len(queue) > size:
      yield queue.pop(0)
  while queue:
    yield queue.pop(0)


# ----------------------------------------------------------------------------
# The loop.

def _write_config(config, workdir):
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(config.to_json_best_effort(indent=2))


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains MAE as configured; resumes from workdir; returns the last logged metrics.

  The returned dict also holds 'status' ('done' or 'preempted') and 'step'.
  """
  jax.config.update('jax_threefry_partitionable', True)
  mesh = parallel.create_mesh(config.mesh)
  validate_config(config, mesh)
  model = build_model(config)
  steps_per_epoch, total_steps = train_steps(config, num_train_examples(config))
  tx, lr_fn = optim.create_optimizer(config.optim, global_batch=config.batch_size,
                                     steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  logging.info('Mesh %s; %d steps (%d per epoch); global batch %d', dict(mesh.shape), total_steps,
               steps_per_epoch, config.batch_size)

  # State: shapes first, then initialise straight into the shardings.
  init_rng, base_rng = jax.random.split(jax.random.key(config.seed))
  init_fn = functools.partial(init_state, model, tx, config)
  abstract_state = jax.eval_shape(init_fn, init_rng)
  rules = parallel.rules_from_config(config.mesh)
  state_shardings = parallel.tree_shardings(abstract_state, mesh, rules, config.mesh.min_fsdp_size)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       every_steps=config.checkpoint_every_steps)
  latest = checkpointer.latest_step()
  if latest is not None:
    params, opt_state, meta = checkpointer.restore(
        ckpt_lib.abstract_like(abstract_state.params, state_shardings.params),
        ckpt_lib.abstract_like(abstract_state.opt_state, state_shardings.opt_state), latest)
    put = lambda v, s: jax.device_put(jnp.asarray(v, s.dtype if hasattr(s, 'dtype') else None), s)
    state = TrainState(
        step=jax.device_put(jnp.asarray(meta['step'], jnp.int32), state_shardings.step),
        params=params, opt_state=opt_state,
        nonfinite_run=put(meta.get('nonfinite_run', 0), state_shardings.nonfinite_run),
        nonfinite_total=put(meta.get('nonfinite_total', 0), state_shardings.nonfinite_total),
        halted=put(False, state_shardings.halted))
    logging.info('Resumed from checkpoint at step %d', meta['step'])
  else:
    with mesh_context(mesh):
      state = jax.jit(init_fn, out_shardings=state_shardings)(init_rng)
  start_step = int(jax.device_get(state.step))
  _write_config(config, workdir)
  writer = metrics_lib.create_writer(workdir)
  if start_step == 0:
    logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params), include_stats=False))
    writer.write_hparams({k: v for k, v in flax.traverse_util.flatten_dict(
        _config_dict(config), sep='.').items() if isinstance(v, (int, float, str, bool))})

  micro_sharding = parallel.batch_sharding(mesh)
  step_fn = functools.partial(
      train_step, model=model, tx=tx, lr_fn=lr_fn, mask_ratio=config.mask_ratio,
      accum_steps=config.get('grad_accum_steps', 1), max_nonfinite=config.max_nonfinite_steps,
      base_rng=base_rng, micro_sharding=micro_sharding)
  metric_sharding = parallel.replicated(mesh)
  batch_shardings = {'image': parallel.batch_sharding(mesh), 'corrupt': parallel.batch_sharding(mesh)}
  jit_step = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                     out_shardings=(state_shardings, metric_sharding), donate_argnums=(0,))

  model_fields = {f: getattr(model, f) for f in models.MaskedAutoencoder.__dataclass_fields__
                  if f not in ('parent', 'name')}
  flops_per_image = flops_lib.mae_train_flops(model_fields, config.mask_ratio, model.encoder_mask_tokens)
  peak = flops_lib.peak_flops_per_device()

  batches = prefetch_to_mesh(create_input_iterator(config, start_step), mesh, config.dataset.prefetch)
  report = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer,
                                           every_steps=config.log_every_steps)
  hooks = [report]
  if config.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                          first_profile=start_step + 10))
  knn_monitor = None
  if config.get('eval_every_steps', -1) > 0:
    from mae_jax import downstream  # pylint: disable=g-import-not-at-top
    knn_monitor = downstream.KnnMonitor(model, config, mesh)
  preemption = PreemptionFlag(config.get('preemption_sync_every_steps', 10)).install()
  pending, last_metrics, status = [], {}, 'done'
  corrupt_seen = 0
  timer_step, timer_start = start_step, None
  step = start_step
  try:
    with mesh_context(mesh):
      while step < total_steps:
        batch = next(batches)
        state, step_metrics = jit_step(state, batch)
        pending.append(step_metrics)
        step += 1
        for hook in hooks:
          hook(step)
        if timer_start is None:  # the first step includes compilation: time from its end
          jax.block_until_ready(step_metrics)
          timer_step, timer_start = step, time.time()
        if step % config.log_every_steps == 0 or step == total_steps:
          last_metrics.update(_log_metrics(writer, step, pending, state, timer_step, timer_start, config,
                                           flops_per_image, peak))
          corrupt_seen += int(last_metrics.get('train/corrupt_images', 0))
          _check_corrupt(corrupt_seen, (step - start_step) * config.batch_size, config)
          pending = []
          timer_step, timer_start = step, time.time()
          if bool(jax.device_get(state.halted)):
            raise NonFiniteLossError(
                f'{config.max_nonfinite_steps} consecutive steps had a non-finite loss or gradients '
                f'(at step {step}); the last good checkpoint is step {checkpointer.latest_step()}. '
                f'Lower optim.base_lr, set optim.grad_clip_norm, or check the input data.')
        if knn_monitor is not None and (step % config.eval_every_steps == 0 or step == total_steps):
          knn_metrics = knn_monitor(state.params)
          writer.write_scalars(step, knn_metrics)
          last_metrics.update(knn_metrics)
        if config.get('visualize_every_steps', -1) > 0 and step % config.visualize_every_steps == 0:
          _write_reconstructions(writer, step, model, state, batch, config, base_rng)
        if save_or_stop(checkpointer, preemption, step, total_steps, state.halted,
                        lambda: checkpointer.save(step, state.params, state.opt_state, _meta(state, config))):
          status = 'preempted'
          break
  finally:
    preemption.uninstall()
    checkpointer.close()
    writer.flush()
  last_metrics.update(status=status, step=step)
  return last_metrics


def save_or_stop(checkpointer, preemption, step: int, total_steps: int, halted, save_fn) -> bool:
  """Saves on schedule, at the end and on preemption; True when the loop must stop now.

  A run halted on non-finite steps is not saved, so the last good checkpoint stays the newest.
  """
  preempted = preemption.requested(step) or checkpointer.reached_preemption(step)
  if checkpointer.should_save(step) or step == total_steps or preempted:
    if bool(jax.device_get(halted)):
      logging.warning('Not saving step %d: the run halted on non-finite steps', step)
    else:
      save_fn()
  if preempted and step < total_steps:
    logging.warning('Preemption requested: saved step %d and stopping', step)
    return True
  return False


def _check_corrupt(corrupt: int, seen: int, config) -> None:
  """Stops a run whose input is mostly undecodable: that is a bug, not a few bad files."""
  limit = config.dataset.get('max_corrupt_fraction', 0.01)
  if seen and corrupt / seen > limit:
    raise ValueError(
        f'{corrupt} of the {seen} images read so far ({100 * corrupt / seen:.1f}%) could not be decoded or '
        f'preprocessed, more than dataset.max_corrupt_fraction={limit}: check the data set '
        f'(dataset.name={config.dataset.name!r}) and the preprocessing (the warnings above name the errors), '
        f'or raise the setting')


def _meta(state: TrainState, config) -> dict:
  return {'step': int(jax.device_get(state.step)),
          'nonfinite_run': int(jax.device_get(state.nonfinite_run)),
          'nonfinite_total': int(jax.device_get(state.nonfinite_total)),
          'config': _config_dict(config)}


def _log_metrics(writer, step, pending, state, timer_step, timer_start, config, flops_per_image, peak):
  """Averages the pending step metrics (one host sync per log period) and writes them."""
  fetched = jax.device_get(pending)
  scalars = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[-1]}
  if 'train/corrupt_images' in scalars:  # a count over the log period, not a mean
    scalars['train/corrupt_images'] = float(np.sum([m['train/corrupt_images'] for m in fetched]))
  scalars['train/lr'] = float(fetched[-1]['train/lr'])
  scalars['train/nonfinite_total'] = float(jax.device_get(state.nonfinite_total))
  if timer_start is not None and step > timer_step:
    seconds = time.time() - timer_start
    images_per_sec = (step - timer_step) * config.batch_size / seconds
    scalars['perf/images_per_sec'] = images_per_sec
    scalars['perf/images_per_sec_per_device'] = images_per_sec / jax.device_count()
    scalars['perf/step_time_sec'] = seconds / (step - timer_step)
    if peak:
      scalars['perf/mfu'] = images_per_sec * flops_per_image / (peak * jax.device_count())
  writer.write_scalars(step, scalars)
  return scalars


def _write_reconstructions(writer, step, model, state, batch, config, base_rng):
  """Writes a reconstruction grid of the first images of the batch to TensorBoard."""
  from mae_jax import visualize  # pylint: disable=g-import-not-at-top
  images = jax.device_get(batch['image'])[:8] if jax.process_count() == 1 else None
  if images is None or jax.process_index() > 0:
    return
  params = jax.device_get(state.params)
  grid = visualize.reconstruction_grid(model, params, images, config.mask_ratio,
                                       jax.random.fold_in(base_rng, 10**9 + step),
                                       mean=config.dataset.mean, std=config.dataset.std)
  writer.write_images(step, {'reconstructions': grid[None]})
