"""MAE pretraining: `train_and_evaluate(config, workdir)`.

One code path from one CPU to a TPU pod: a named mesh, state initialised
directly into its shardings, a jitted train step with donated state
(`build_train_step`, which `mae_jax.aot` compiles too), and the shared loop
(`mae_jax.loop`): Orbax checkpoints with automatic resume, preemption handling
and clu metrics. `config.init_from` starts step 0 from released or earlier
weights (`mae_jax.warm_start`).
"""

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview

from mae_jax import checkpoint as ckpt_lib
from mae_jax import flops as flops_lib
from mae_jax import knn, loop, metrics, models, optim, parallel, visualize, warm_start
from mae_jax.data import inputs
from mae_jax.models import from_config

# The keys of a pretraining batch: normalised images and the rows whose record could not be decoded.
BATCH_KEYS = ('image', 'corrupt')


def validate_config(config, mesh: jax.sharding.Mesh | None = None) -> None:
  """Fails fast, naming the key, on settings that cannot work. No compile happens here."""
  loop.check_loop_settings(config, mesh)
  models.num_visible(from_config.build_mae(config).num_patches, config.mask_ratio)


# ----------------------------------------------------------------------------
# The step.

def init_state(model, tx, config, rng, loaded=None) -> loop.TrainState:
  """Step 0: params from `rng`, the leaves of `loaded` (a warm start's) in place of theirs; a fresh optimizer.

  Under jit the initialisers of the replaced leaves are dead code: only the
  fresh parts (e.g. the decoder of an encoder-only file) are computed.
  """
  images = jnp.zeros((1, *inputs.image_shape(config)), jnp.float32)
  params_rng, mask_rng = jax.random.split(rng)
  params = model.init({'params': params_rng, 'mask': mask_rng}, images, mask_ratio=config.mask_ratio,
                      train=False)['params']
  if loaded is not None:
    params = warm_start.merge(params, loaded)
  return loop.new_state(params, tx)  # The optimizer state is built from the params it will train.


def train_step(state: loop.TrainState, batch: dict, *, model, tx, lr_fn, mask_ratio: float,
               accum_steps: int, max_nonfinite: int, base_rng, micro_sharding=None):
  """One optimizer step over the global batch (optionally as accumulated micro-batches)."""
  rng = jax.random.fold_in(base_rng, state.step)

  def loss_fn(params, aux, images, key):
    loss, _, _ = model.apply({'params': params}, images, mask_ratio=mask_ratio, rngs={'mask': key},
                             train=True)
    return loss, aux

  loss, _, grads = loop.value_and_grad(loss_fn, state.params, {}, (batch['image'],), rng, accum_steps,
                                       micro_sharding)

  new_state, grad_norm, finite = loop.guarded_update(state, loss, grads, tx, max_nonfinite)
  return new_state, loop.step_metrics(loss, grad_norm, finite, lr_fn(state.step), batch)


@dataclasses.dataclass
class TrainStep:
  """The pretraining step as it runs: what `train_and_evaluate` trains with and `aot` compiles."""
  jitted: Any  # jax.jit(train_step, in_shardings, out_shardings, donate_argnums=(0,))
  abstract_state: Any  # loop.TrainState of ShapeDtypeStructs
  state_shardings: Any
  abstract_batch: dict  # BATCH_KEYS -> ShapeDtypeStruct of the global batch
  batch_shardings: dict
  mesh: jax.sharding.Mesh
  model: Any
  init_fn: Any  # (rng, loaded=None) -> TrainState (init_state with the model and optimizer bound)
  init_rng: Any
  base_rng: Any  # masks of step s: fold_in(base_rng, s)
  steps_per_epoch: int
  total_steps: int

  def init_state(self):
    """Concrete state, initialised straight into its shardings (needs real devices)."""
    with loop.mesh_context(self.mesh):
      return jax.jit(self.init_fn, out_shardings=self.state_shardings)(self.init_rng)


def build_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     num_examples: int) -> TrainStep:
  """Validates the config, then builds the model, optimizer, shardings and the jitted step for `mesh`.

  `num_examples` (the train split's size) sets only the schedule's length, never a shape.
  """
  jax.config.update('jax_threefry_partitionable', True)
  validate_config(config, mesh)
  model = from_config.build_mae(config)
  steps_per_epoch, total_steps = loop.train_steps(config, num_examples)
  tx, lr_fn = optim.create_optimizer(config.optim, global_batch=config.batch_size,
                                     steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  init_rng, base_rng = jax.random.split(jax.random.key(config.seed))
  init_fn = functools.partial(init_state, model, tx, config)
  abstract_state = jax.eval_shape(init_fn, init_rng)
  state_shardings = parallel.config_shardings(abstract_state, config, mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  step_fn = functools.partial(
      train_step, model=model, tx=tx, lr_fn=lr_fn, mask_ratio=config.mask_ratio,
      accum_steps=config.grad_accum_steps, max_nonfinite=config.max_nonfinite_steps, base_rng=base_rng,
      micro_sharding=batch_sharding)
  abstract_batch = {
      'image': jax.ShapeDtypeStruct((config.batch_size, *inputs.image_shape(config)), jnp.float32),
      'corrupt': jax.ShapeDtypeStruct((config.batch_size,), jnp.bool_)}
  batch_shardings = {key: batch_sharding for key in BATCH_KEYS}
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,))
  return TrainStep(jitted=jitted, abstract_state=abstract_state, state_shardings=state_shardings,
                   abstract_batch=abstract_batch, batch_shardings=batch_shardings, mesh=mesh, model=model,
                   init_fn=init_fn, init_rng=init_rng, base_rng=base_rng, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps)


def train_flops_per_image(model: models.MaskedAutoencoder, mask_ratio: float) -> float:
  """Analytic training FLOPs per image of `model` (flops.mae_train_flops)."""
  fields = {f: getattr(model, f) for f in models.MaskedAutoencoder.__dataclass_fields__
            if f not in ('parent', 'name')}
  return flops_lib.mae_train_flops(fields, mask_ratio, model.encoder_mask_tokens)


# ----------------------------------------------------------------------------
# Input.

def batches_with_corrupt_flags(iterator):
  """Local batches with BATCH_KEYS: sources that cannot fail to decode mark no row corrupt."""
  for local in iterator:
    corrupt = local.get('corrupt', np.zeros((len(local['image']),), bool))
    yield {'image': local['image'], 'corrupt': corrupt}


# ----------------------------------------------------------------------------
# The loop.

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains MAE as configured; resumes from workdir; returns the last logged metrics.

  The returned dict also holds 'status' ('done' or 'preempted') and 'step'.
  """
  mesh = parallel.create_mesh(config.mesh)
  validate_config(config, mesh)  # Before the data set is read: a bad setting is named first.
  config = inputs.resolve_dataset_stats(config)  # dataset.mean / std = (): the data set's stored ones.
  loop.check_resume(config, workdir)
  step = build_train_step(config, mesh, inputs.num_train_examples(config))
  model = step.model
  logging.info('Mesh %s; %d steps (%d per epoch); global batch %d', dict(mesh.shape), step.total_steps,
               step.steps_per_epoch, config.batch_size)
  knn_monitor = knn.KnnMonitor(model, config, mesh) if config.eval_every_steps > 0 else None

  # config.init_from, read, checked and placed before anything compiles (None when resuming).
  warm = warm_start.prepare(config, workdir, step.abstract_state.params, step.state_shardings.params)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       every_steps=config.checkpoint_every_steps)
  init_fn, init_args = step.init_fn, step.init_rng
  if warm is not None:
    init_fn, init_args = lambda args: step.init_fn(*args), (step.init_rng, warm.params)
  state, resumed = loop.restore_or_init(checkpointer, init_fn, init_args, step.abstract_state,
                                        step.state_shardings, mesh)
  start_step = int(jax.device_get(state.step))
  loop.write_config(config, workdir)
  writer = metrics.create_writer(workdir, start_step, config)
  if not resumed:
    logging.info('Parameters:\n%s', parameter_overview.get_parameter_overview(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params), include_stats=False))
    writer.write_hparams({k: v for k, v in flax.traverse_util.flatten_dict(
        loop.config_dict(config), sep='.').items() if isinstance(v, (int, float, str, bool))})

  def evaluate(step_index, state, batch):
    results = {}
    if knn_monitor is not None and (step_index % config.eval_every_steps == 0
                                    or step_index == step.total_steps):
      results.update(knn_monitor(state.params))
    if config.visualize_every_steps > 0 and step_index % config.visualize_every_steps == 0:
      _write_reconstructions(writer, step_index, model, state, batch, config, step.base_rng, mesh)
    return results

  batches = loop.prefetch_to_mesh(
      batches_with_corrupt_flags(inputs.create_pretrain_iterator(config, start_step)), mesh,
      config.dataset.prefetch)
  result = loop.train_loop(
      config, workdir, mesh, state=state, step_fn=step.jitted, batches=batches,
      total_steps=step.total_steps, checkpointer=checkpointer, writer=writer, evaluate=evaluate,
      flops_per_image=train_flops_per_image(model, config.mask_ratio))
  return {**result.metrics, 'status': result.status, 'step': result.step, 'saved_step': result.saved_step}


def _write_reconstructions(writer, step, model, state, batch, config, base_rng, mesh):
  """Writes a reconstruction grid of the first images of the batch to TensorBoard.

  Every process takes part (the params may span hosts); only the few images
  drawn are gathered, replicated, and process 0 writes the grid.
  """
  replicated = parallel.replicated(mesh)
  count = min(8, batch['image'].shape[0])
  images = jax.jit(lambda x: x[:count], out_shardings=replicated)(batch['image'])
  reconstruct = functools.partial(visualize.reconstruct, model, mask_ratio=config.mask_ratio)
  outputs = jax.jit(reconstruct, out_shardings=replicated)(
      state.params, images, rng=jax.random.fold_in(base_rng, 10**9 + step))
  if jax.process_index() == 0:
    host = lambda x: np.asarray(x.addressable_data(0))
    grid = visualize.grid_of(host(images), *[host(x) for x in outputs], mean=config.dataset.mean,
                             std=config.dataset.std, bands=config.dataset.display_bands)
    writer.write_images(step, {'reconstructions': grid[None]})
