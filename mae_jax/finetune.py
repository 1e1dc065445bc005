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

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from mae_jax import checkpoint as ckpt_lib
from mae_jax import loop, parallel, supervised
from mae_jax.data import augment, inputs
from mae_jax.models import from_config
from mae_jax.weights import pretrained


def finetune_step(state: loop.TrainState, batch: dict, frozen, *, model, tx, lr_fn, num_classes: int,
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

  loss, _, grads = loop.value_and_grad(loss_fn, state.params, state.batch_stats, (images, targets), drop_key,
                                       accum_steps, micro_sharding)
  new_state, grad_norm, finite = loop.guarded_update(state, loss, grads, tx, max_nonfinite,
                                                     batch_stats=state.batch_stats)
  return new_state, loop.step_metrics(loss, grad_norm, finite, lr_fn(state.step), batch)


def mixer(config, mesh) -> Callable:
  """mixup_cutmix with the config's settings: one draw per data-parallel shard of each micro-batch."""
  return functools.partial(
      augment.mixup_cutmix, mixup_alpha=float(config.mixup), cutmix_alpha=float(config.cutmix),
      prob=float(config.mixup_prob), switch_prob=float(config.mixup_switch_prob), mode=config.mixup_mode,
      # One draw per data-parallel shard of each micro-batch: as one per GPU in the reference.
      num_groups=parallel.batch_axis_size(mesh) * config.grad_accum_steps)


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fine-tunes the ViT classifier as configured; resumes from workdir; returns the last metrics.

  The result holds the last logged train metrics, eval/top1, eval/top5,
  eval/best_top1, 'status' ('done' or 'preempted') and 'step'.
  """
  jax.config.update('jax_threefry_partitionable', True)
  mesh = parallel.create_mesh(config.mesh)
  supervised.validate_config(config, mesh)
  num_classes = inputs.resolve_num_classes(config)
  model = from_config.build_classifier(config, num_classes)
  steps_per_epoch, total_steps = loop.train_steps(config, inputs.num_train_examples(config))
  image_shape = (1, *inputs.image_shape(config))
  abstract_params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape)))['params']
  tx, lr_fn = supervised.make_optimizer(config, abstract_params, model.encoder['depth'], steps_per_epoch,
                                        total_steps)
  logging.info('Fine-tuning %s on %s: %d classes, mesh %s, %d steps (%d per epoch), batch %d',
               config.model.name, config.dataset.name, num_classes, dict(mesh.shape), total_steps,
               steps_per_epoch, config.batch_size)

  def init_fn(rng):
    return loop.new_state(model.init({'params': rng}, jnp.zeros(image_shape))['params'], tx)

  merge = None
  if ckpt_lib.latest_step(workdir) is None:
    encoder, source = pretrained.load_pretrained_encoder(config)
    if encoder is not None:
      merge = functools.partial(pretrained.merge_encoder, encoder=encoder, source=source)
    else:
      logging.warning('No pretrained_workdir / pretrained_path: fine-tuning from random weights')

  step_fn = functools.partial(
      finetune_step, model=model, tx=tx, lr_fn=lr_fn, num_classes=num_classes,
      label_smoothing=float(config.label_smoothing), mix=mixer(config, mesh),
      accum_steps=config.grad_accum_steps, max_nonfinite=config.max_nonfinite_steps,
      base_rng=jax.random.fold_in(jax.random.key(config.seed), 1),
      micro_sharding=parallel.batch_sharding(mesh))
  eval_batch = supervised.eval_batch_size(config, mesh)

  @jax.jit
  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['image'], train=False)
    return supervised.classification_counts(logits, batch['label'], batch['mask'])

  def eval_fn(state, frozen):
    del frozen
    batches = inputs.create_eval_iterator(config, num_classes, config.dataset.eval_split, eval_batch)
    return supervised.evaluate(eval_step, batches, mesh, state.params)

  preprocess_fn = inputs.make_train_preprocess_fn(config)
  task = supervised.Task(
      kind='finetune', init_fn=init_fn, step_fn=step_fn, eval_fn=eval_fn,
      batches_fn=lambda start: inputs.create_train_iterator(config, num_classes, start, preprocess_fn),
      pretrained=merge)
  return supervised.run(config, workdir, mesh, task, total_steps, steps_per_epoch)
