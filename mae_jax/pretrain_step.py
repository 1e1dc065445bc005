"""The MAE pretraining step: `build_train_step(config, mesh, num_examples)`.

What `train.train_and_evaluate` trains with and `mae_jax.aot` compiles: the
model, optimizer and shardings of a config, state initialised straight into its
shardings, and the jitted step with donated state. It reads no data and writes
no metrics (no TensorFlow), so benchmarks build exactly the trainer's step on
any machine with JAX, flax and optax.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from mae_jax import config_tools, data, models, optim, parallel, train_state, warm_start
from mae_jax import flops as flops_lib
from mae_jax.models import from_config

# The train split's size for a step built without a data set (mae_jax.aot, the benchmarks): ImageNet-1k's.
# Only the schedule's length depends on it, never a shape of the compiled step.
NOMINAL_TRAIN_EXAMPLES = 1_281_167
# The keys of a pretraining batch: normalised images and the rows whose record could not be decoded.
BATCH_KEYS = ('image', 'corrupt')


@config_tools.settings_check
def validate_config(config, mesh: jax.sharding.Mesh | None = None) -> None:
  """Fails fast, naming the key, on settings that cannot work. No compile happens here."""
  train_state.check_step_settings(config, mesh)
  models.num_visible(from_config.build_mae(config).num_patches, config.mask_ratio)


# ----------------------------------------------------------------------------
# The step.

def init_state(model, tx, config, rng, loaded=None) -> train_state.TrainState:
  """Step 0: params from `rng`, the leaves of `loaded` (a warm start's) in place of theirs; a fresh optimizer.

  Under jit the initialisers of the replaced leaves are dead code: only the
  fresh parts (e.g. the decoder of an encoder-only file) are computed.
  """
  images = jnp.zeros((1, *data.image_shape(config)), jnp.float32)
  params_rng, mask_rng = jax.random.split(rng)
  params = model.init({'params': params_rng, 'mask': mask_rng}, images, mask_ratio=config.mask_ratio,
                      train=False)['params']
  if loaded is not None:
    params = warm_start.merge(params, loaded)
  return train_state.new_state(params, tx)  # The optimizer state is built from the params it will train.


def train_step(state: train_state.TrainState, batch: dict, *, model, tx, lr_fn, mask_ratio: float,
               accum_steps: int, max_nonfinite: int, base_rng, micro_sharding=None):
  """One optimizer step over the global batch (optionally as accumulated micro-batches)."""
  rng = jax.random.fold_in(base_rng, state.step)

  def loss_fn(params, aux, images, key):
    loss, _, _ = model.apply({'params': params}, images, mask_ratio=mask_ratio, rngs={'mask': key},
                             train=True)
    return loss, aux

  loss, _, grads = train_state.value_and_grad(loss_fn, state.params, {}, (batch['image'],), rng, accum_steps,
                                              micro_sharding)

  new_state, grad_norm, finite = train_state.guarded_update(state, loss, grads, tx, max_nonfinite)
  return new_state, train_state.step_metrics(loss, grad_norm, finite, lr_fn(state.step), batch)


@dataclasses.dataclass
class TrainStep:
  """The pretraining step as it runs: what `train_and_evaluate` trains with and `aot` compiles."""
  jitted: Any  # train_state.jit_step(train_step, ...): (state, batch) -> (state, metrics), state donated
  abstract_state: Any  # train_state.TrainState of ShapeDtypeStructs
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
    with train_state.mesh_context(self.mesh):
      return jax.jit(self.init_fn, out_shardings=self.state_shardings)(self.init_rng)


def build_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     num_examples: int) -> TrainStep:
  """Validates the config, then builds the model, optimizer, shardings and the jitted step for `mesh`.

  `num_examples` (the train split's size) sets only the schedule's length, never a shape.
  """
  jax.config.update('jax_threefry_partitionable', True)
  validate_config(config, mesh)
  model = from_config.build_mae(config)
  steps_per_epoch, total_steps = train_state.train_steps(config, num_examples)
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
      'image': jax.ShapeDtypeStruct((config.batch_size, *data.image_shape(config)), jnp.float32),
      'corrupt': jax.ShapeDtypeStruct((config.batch_size,), jnp.bool_)}
  batch_shardings = {key: batch_sharding for key in BATCH_KEYS}
  jitted = train_state.jit_step(step_fn, state_shardings, batch_shardings, mesh)
  return TrainStep(jitted=jitted, abstract_state=abstract_state, state_shardings=state_shardings,
                   abstract_batch=abstract_batch, batch_shardings=batch_shardings, mesh=mesh, model=model,
                   init_fn=init_fn, init_rng=init_rng, base_rng=base_rng, steps_per_epoch=steps_per_epoch,
                   total_steps=total_steps)


def train_flops_per_image(model: models.MaskedAutoencoder, mask_ratio: float) -> float:
  """Analytic training FLOPs per image of `model` (flops.mae_train_flops)."""
  fields = {f: getattr(model, f) for f in models.MaskedAutoencoder.__dataclass_fields__
            if f not in ('parent', 'name')}
  return flops_lib.mae_train_flops(fields, mask_ratio, model.encoder_mask_tokens)
