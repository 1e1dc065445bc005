"""The train state and what every jitted train step does with it.

Pretraining (`pretrain_step`), fine-tuning (`finetune`) and linear probing
(`linprobe`) build their steps from these; `loop` runs them. Nothing here reads
data or writes metrics, so a step builds and runs wherever JAX, flax and optax
do (the GPU benchmarks run on images without TensorFlow):

* `TrainState` (with optional BatchNorm statistics) and `guarded_update`, the
  optimizer step that skips non-finite steps;
* `value_and_grad` over accumulated micro-batches, and `step_metrics`;
* `check_step_settings`, run before anything compiles; `train_steps`, the
  schedule's length; `jit_step`, the jit every step runs under (donated state);
  `mesh_context`, the mesh steps are traced under.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax import optim, parallel
from mae_jax.models import vit


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
# Settings every step builder checks before anything compiles.

# (key, what it does).
LOOP_SETTINGS = (
    ('log_every_steps', 'train metrics are averaged and written every log_every_steps steps'),
    ('max_nonfinite_steps', 'the run stops after this many non-finite steps in a row'),
    ('preemption_sync_every_steps', 'processes agree on a SIGTERM every this many steps'),
)


def check_step_settings(config, mesh: jax.sharding.Mesh | None) -> None:
  """Loop settings, the batch against processes and mesh, the attention backend."""
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
  vit.canonical_dtype(config.model.dtype)
  optim.check_name(config.optim.name)


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


def jit_step(step_fn, state_shardings, batch_shardings, mesh: jax.sharding.Mesh, *other_shardings):
  """jit of step_fn(state, batch, *others) -> (state, metrics) as every trainer runs it.

  The state is donated and stays in its shardings; the metrics come back replicated.
  """
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings, *other_shardings),
                 out_shardings=(state_shardings, parallel.replicated(mesh)), donate_argnums=(0,))


def mesh_context(mesh: jax.sharding.Mesh):
  """The context steps are traced and run under: sets the (abstract) mesh, so
  activation sharding constraints inside the model see it."""
  return jax.set_mesh(mesh)
