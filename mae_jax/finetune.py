r"""Fine-tuning of a pretrained MAE encoder (config.downstream='finetune').

  python -m mae_jax.main --config=configs/finetune.py:variant=B/16 \
    --config.pretrained_workdir=PRETRAIN_DIR --workdir=FT_DIR

The whole ViT classifier trains: global average pooling of the patch tokens +
fc_norm (or the cls token after the encoder's norm), head
trunc-normal(head_init_std), layer-wise lr decay, drop path, RandAugment,
random erasing, mixup / cutmix with label smoothing, warmup + cosine; top-1 /
top-5 on dataset.eval_split. A fine-tuning checkpoint holds the classifier
params (`encoder`, `fc_norm` or nothing, `head`), so it can be exported or used
as `pretrained_workdir` again.

Training images are augmented in TensorFlow per example, as a pure function of
(seed, example position), so resuming replays it exactly (`data.inputs`,
`data.augment`); mixup / cutmix run on the device, one draw per data-parallel
shard of the batch ('batch' mode, as the reference's one draw per GPU) or per
example ('elem').
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mae_jax import checkpoint as ckpt_lib
from mae_jax import data, parallel, pretrain_step, supervised, train_state
from mae_jax import flops as flops_lib
from mae_jax.data import augment, inputs
from mae_jax.models import from_config
from mae_jax.weights import pretrained


def finetune_step(state: train_state.TrainState, batch: dict, frozen=None, *, model, tx, lr_fn, num_classes: int,
                  label_smoothing: float, mix: Callable, accum_steps: int, max_nonfinite: int, base_rng,
                  micro_sharding=None):
  """One fine-tuning step: smoothed targets, mixup / cutmix, drop path, AdamW with layer decay."""
  del frozen
  rng = jax.random.fold_in(base_rng, state.step)
  mix_key, drop_key = jax.random.split(rng)
  targets = augment.smooth_one_hot(batch['label'], num_classes, label_smoothing)
  images, targets, _ = mix(mix_key, batch['image'], targets)

  def loss_fn(params, batch_stats, images, targets, key):
    logits = model.apply({'params': params}, images, train=True, rngs={'dropout': key})
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean(), batch_stats

  loss, _, grads = train_state.value_and_grad(loss_fn, state.params, state.batch_stats, (images, targets), drop_key,
                                              accum_steps, micro_sharding)
  new_state, grad_norm, finite = train_state.guarded_update(state, loss, grads, tx, max_nonfinite,
                                                            batch_stats=state.batch_stats)
  return new_state, train_state.step_metrics(loss, grad_norm, finite, lr_fn(state.step), batch)


def mixer(config, mesh) -> Callable:
  """mixup_cutmix with the config's settings over the whole batch, in data-parallel size x grad_accum_steps
  contiguous groups: as many draws, of as many examples each, as one per GPU and micro-batch in the reference."""
  return functools.partial(
      augment.mixup_cutmix, mixup_alpha=float(config.mixup), cutmix_alpha=float(config.cutmix),
      prob=float(config.mixup_prob), switch_prob=float(config.mixup_switch_prob), mode=config.mixup_mode,
      # One draw per group: as one per GPU (and micro-batch) in the reference.
      num_groups=parallel.batch_axis_size(mesh) * config.grad_accum_steps)


# The keys of a fine-tuning batch: normalised images, integer labels and the rows whose record could not
# be decoded (all False for sources that cannot fail), so every source feeds the one compiled step.
BATCH_KEYS = ('image', 'label', 'corrupt')


@dataclasses.dataclass
class FinetuneStep(pretrain_step.TrainStep):
  """The fine-tuning step as it runs: what `finetune` trains with and `mae_jax.aot` compiles.

  `jitted` takes (state, batch); `step_fn` is the same function unjitted, with
  the (state, batch, frozen) signature of `supervised.Task.step_fn`.
  """
  step_fn: Any = None  # (state, batch, frozen=None) -> (state, metrics); init_fn takes the rng alone.
  num_classes: int = 0
  flops_per_image: float = 0.0  # analytic training FLOPs (flops.classifier_train_flops)


def train_flops_per_image(config: ml_collections.ConfigDict, num_classes: int) -> float:
  """Analytic fine-tuning FLOPs per image: 3 x the classifier's forward over all 1 + L tokens."""
  return flops_lib.classifier_train_flops(from_config.encoder_kwargs(config), num_classes)


def config_num_classes(config) -> int:
  """config.num_classes, which must be > 0 where no data set is read (mae_jax.aot)."""
  num_classes = int(config.num_classes)
  if num_classes <= 0:
    raise ValueError(f'num_classes={num_classes}: the fine-tuning step needs the number of classes; set '
                     '--config.num_classes=N (the trainer reads it from the data set when <= 0)')
  return num_classes


def build_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, num_examples: int,
                     num_classes: int | None = None) -> FinetuneStep:
  """Validates the config, then builds the classifier, optimizer, shardings and the jitted step for `mesh`.

  `num_examples` (the train split's size) sets only the schedule's length, never
  a shape. `num_classes` defaults to config.num_classes (which must then be > 0).
  """
  jax.config.update('jax_threefry_partitionable', True)
  supervised.validate_config(config, mesh)
  num_classes = config_num_classes(config) if num_classes is None else int(num_classes)
  model = from_config.build_classifier(config, num_classes)
  steps_per_epoch, total_steps = train_state.train_steps(config, num_examples)
  image_shape = data.image_shape(config)
  abstract_params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape))))['params']
  tx, lr_fn = supervised.make_optimizer(config, abstract_params, model.encoder['depth'], steps_per_epoch,
                                        total_steps)

  def init_fn(rng):  # A pretrained encoder is merged after init (supervised.Task.pretrained).
    return train_state.new_state(model.init({'params': rng}, jnp.zeros((1, *image_shape)))['params'], tx)

  init_rng = jax.random.key(config.seed)  # As supervised.run initialises.
  abstract_state = jax.eval_shape(init_fn, init_rng)
  state_shardings = parallel.config_shardings(abstract_state, config, mesh)
  batch_sharding = parallel.batch_sharding(mesh)
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  step_fn = functools.partial(
      finetune_step, model=model, tx=tx, lr_fn=lr_fn, num_classes=num_classes,
      label_smoothing=float(config.label_smoothing), mix=mixer(config, mesh),
      accum_steps=config.grad_accum_steps, max_nonfinite=config.max_nonfinite_steps, base_rng=base_rng,
      micro_sharding=batch_sharding)
  batch = config.batch_size
  abstract_batch = {'image': jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32),
                    'label': jax.ShapeDtypeStruct((batch,), jnp.int32),
                    'corrupt': jax.ShapeDtypeStruct((batch,), jnp.bool_)}
  batch_shardings = {key: batch_sharding for key in BATCH_KEYS}
  # The jit supervised.run applies to step_fn (frozen=None adds no argument to the program).
  jitted = train_state.jit_step(step_fn, state_shardings, batch_shardings, mesh)
  return FinetuneStep(jitted=jitted, abstract_state=abstract_state, state_shardings=state_shardings,
                      abstract_batch=abstract_batch, batch_shardings=batch_shardings, mesh=mesh, model=model,
                      init_fn=init_fn, init_rng=init_rng, base_rng=base_rng, steps_per_epoch=steps_per_epoch,
                      total_steps=total_steps, step_fn=step_fn, num_classes=num_classes,
                      flops_per_image=train_flops_per_image(config, num_classes))


def batches_with_corrupt_flags(iterator):
  """Local batches with BATCH_KEYS: sources that cannot fail to decode mark no row corrupt."""
  for local in iterator:
    corrupt = local.get('corrupt', np.zeros((len(local['image']),), bool))
    yield {'image': local['image'], 'label': local['label'], 'corrupt': corrupt}


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes the ViT classifier as configured; resumes from workdir; returns the last metrics.

  The result holds the last logged train metrics, eval/top1, eval/top5,
  eval/best_top1, 'status' ('done' or 'preempted') and 'step'. The step is
  `build_train_step`'s, the one `python -m mae_jax.aot` compiles.
  """
  mesh = parallel.create_mesh(config.mesh)
  supervised.validate_config(config, mesh)  # Before the data set is read: a bad setting is named first.
  inputs.check_input(config)
  inputs.check_eval_split(config)
  num_classes = inputs.resolve_num_classes(config)
  step = build_train_step(config, mesh, inputs.num_train_examples(config), num_classes)
  model = step.model
  logging.info('Fine-tuning %s on %s: %d classes, mesh %s, %d steps (%d per epoch), batch %d',
               config.model.name, config.dataset.name, num_classes, dict(mesh.shape), step.total_steps,
               step.steps_per_epoch, config.batch_size)

  merge = None
  if ckpt_lib.latest_step(workdir) is None:
    encoder, source = pretrained.load_pretrained_encoder(config)
    if encoder is not None:
      merge = functools.partial(pretrained.merge_encoder, encoder=encoder, source=source)
    else:
      logging.warning('No pretrained_workdir / pretrained_path: fine-tuning from random weights')

  eval_batch = supervised.eval_batch_size(config, mesh)

  @jax.jit
  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['image'], train=False)
    return supervised.classification_counts(logits, batch['label'], batch['mask'], batch.get('corrupt'))

  def eval_fn(state, frozen):
    del frozen
    batches = inputs.create_eval_iterator(config, num_classes, config.dataset.eval_split, eval_batch)
    return supervised.evaluate(eval_step, batches, mesh, state.params, config=config)

  preprocess_fn = inputs.make_train_preprocess_fn(config)
  task = supervised.Task(
      kind='finetune', init_fn=step.init_fn, step_fn=step.step_fn, eval_fn=eval_fn,
      batches_fn=lambda start: batches_with_corrupt_flags(
          inputs.create_train_iterator(config, num_classes, start, preprocess_fn)),
      pretrained=merge)
  return supervised.run(config, workdir, mesh, task, step.total_steps, step.steps_per_epoch)
