"""What fine-tuning and linear probing share: config checks, classification metrics, the loop around them.

Both train on labelled data from a pretrained (or random) encoder, evaluate
top-1 / top-5 on dataset.eval_split every `eval_every_steps` (<= 0: every
epoch) and at the end, keep the best top-1 seen, and write results.json. The
training loop itself is `mae_jax.loop`'s, as for pretraining.
"""

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from mae_jax import checkpoint as ckpt_lib
from mae_jax import config_tools, loop, metrics, optim, parallel, train_state, workdir_lease
from mae_jax.data import augment

KINDS = ('finetune', 'linprobe', 'knn')


def kind(config) -> str:
  """config.downstream, checked."""
  if config.downstream not in KINDS:
    raise ValueError(f'downstream={config.downstream!r}: must be one of {KINDS}')
  return config.downstream


# Downstream settings that a trainer does not read, with the value that says what it does instead. Any other
# value would be ignored without a word, so validate_config refuses it.
UNREAD_SETTINGS = {
    'linprobe': {'freeze_encoder': True, 'drop_path_rate': 0.0, 'mixup': 0.0, 'cutmix': 0.0},
    'finetune': {'head_batchnorm': False, 'probe_cached_features': False},
}


@config_tools.settings_check
def validate_config(config, mesh) -> None:
  """Fails fast, naming the key, on settings that cannot work. No compile happens here."""
  which = kind(config)
  loop.check_loop_settings(config, mesh)
  if config.pretrained_workdir and config.pretrained_path:
    raise ValueError('pretrained_workdir and pretrained_path are both set: set one of them')
  if which == 'finetune' and config.freeze_encoder:
    raise ValueError('freeze_encoder=True with downstream=finetune: use downstream=linprobe to train '
                     'a head on a frozen encoder')
  for key, value in UNREAD_SETTINGS.get(which, {}).items():
    if key in config and config[key] != value:
      raise ValueError(f'{key}={config[key]!r} has no effect with downstream={which}, which works as '
                       f'{key}={value!r}: leave it at that')
  if which == 'knn':
    return
  if which == 'linprobe' and config.probe_cached_features and (config.randaug.num_layers or config.reprob):
    raise ValueError(f'probe_cached_features=True encodes every image once, with the eval transform: '
                     f'randaug.num_layers={config.randaug.num_layers} and reprob={config.reprob} would do nothing; '
                     'set them to 0, or probe_cached_features=False')
  if not config.randaug.increasing:
    raise ValueError('randaug.increasing=False: only timm\'s increasing op variants (rand-...-inc1, the '
                     'reference\'s recipe) are implemented; leave randaug.increasing=True')
  if not 0 <= config.label_smoothing < 1:
    raise ValueError(f'label_smoothing={config.label_smoothing}: must be in [0, 1)')
  if which != 'finetune':
    return
  if config.mixup_mode not in augment.MIXUP_MODES:
    raise ValueError(f'mixup_mode={config.mixup_mode!r}: must be one of {augment.MIXUP_MODES}')
  for key in ('mixup', 'cutmix', 'reprob'):
    if config[key] < 0:
      raise ValueError(f'{key}={config[key]}: must be >= 0')
  if config.remode not in augment.ERASE_MODES:
    raise ValueError(f'remode={config.remode!r}: must be one of {augment.ERASE_MODES}')


def make_optimizer(config, params, depth: int, steps_per_epoch: int, total_steps: int):
  """(optimizer, lr_fn) of config.optim for `params` (abstract is fine): layer decay over `depth`."""
  return optim.create_optimizer(config.optim, global_batch=config.batch_size, steps_per_epoch=steps_per_epoch,
                                total_steps=total_steps, params=params, depth=depth)


def eval_batch_size(config, mesh) -> int:
  """config.eval_batch_size (<= 0: the micro-batch), divisible by processes and data parallelism."""
  wanted = config.eval_batch_size if config.eval_batch_size > 0 else config.batch_size // config.grad_accum_steps
  return parallel.eval_batch_size(wanted, mesh)


# ----------------------------------------------------------------------------
# Metrics.

def classification_counts(logits, labels, mask, corrupt=None) -> dict:
  """Sums over real examples: correct top-1, correct top-5 (top-K for K < 5 classes), loss, count.

  With the batch's `corrupt` flags, also the images left out as undecodable.
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  k = min(5, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hits = top == labels[:, None]
  loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
  counts = {'correct1': jnp.sum(hits[:, 0] * mask), 'correct5': jnp.sum(jnp.any(hits, axis=1) * mask),
            'loss': jnp.sum(loss * mask), 'count': jnp.sum(mask)}
  if corrupt is not None:
    counts['corrupt'] = jnp.sum(corrupt.astype(jnp.int32))
  return counts


def summarize_counts(totals: dict, prefix: str = 'eval/') -> dict:
  count = max(float(totals['count']), 1.0)
  out = {f'{prefix}top1': float(totals['correct1']) / count,
         f'{prefix}top5': float(totals['correct5']) / count,
         f'{prefix}loss': float(totals['loss']) / count,
         f'{prefix}num_examples': float(totals['count'])}
  if totals.get('corrupt'):
    out[f'{prefix}corrupt_images'] = float(totals['corrupt'])
  return out


def evaluate(eval_step, batches, mesh, *args, config=None) -> dict:
  """Sums eval_step(*args, batch) counts over padded global batches.

  With `config`, undecodable images (the counts' 'corrupt') are checked against
  config.dataset.max_corrupt_fraction and reported as eval/corrupt_images.
  """
  totals = None
  for batch in loop.prefetch_to_mesh(batches, mesh):
    counts = eval_step(*args, batch)
    totals = counts if totals is None else jax.tree.map(jnp.add, totals, counts)
  if totals is None:
    raise ValueError('the eval split is empty: check dataset.eval_split')
  totals = jax.device_get(totals)
  if config is not None and 'corrupt' in totals:
    corrupt = int(totals['corrupt'])
    loop.check_eval_corrupt(corrupt, int(totals['count']) + corrupt, config.dataset.max_corrupt_fraction,
                            f'dataset.eval_split={config.dataset.eval_split!r}')
  return summarize_counts(totals)


# ----------------------------------------------------------------------------
# The run.

def pin_pretrained_step(config, workdir: str):
  """A copy of `config` whose pretrained_step names one checkpoint: the encoder this run trains on.

  A linear probe's checkpoints hold only its head; the frozen encoder is read
  again at every start. So a resumed probe takes the encoder its checkpoint
  recorded (`meta['pretrained']`, pretrained_record): the same step, not the
  newest one of a pretraining run that went on in the meantime, and the same
  source; a fresh one takes the newest step there is now.
  """
  config = config.copy_and_resolve_references()
  saved = ckpt_lib.latest_step(workdir)
  recorded = (ckpt_lib.load_meta(workdir, saved).get('pretrained') or {}) if saved is not None else {}
  if recorded:
    where = f'the run in {workdir} (step {saved}) was trained on the encoder of {_encoder_name(recorded)}'
    same_source = (_same_path(recorded.get('workdir', ''), config.pretrained_workdir)
                   and _same_path(recorded.get('path', ''), config.pretrained_path))
    if not same_source or (config.pretrained_workdir and config.pretrained_step >= 0
                           and config.pretrained_step != recorded.get('step')):
      current = _encoder_name(pretrained_record(config).get('pretrained') or {})
      raise loop.ResumeError(f'{where}, this one asks for {current}. Resume with that encoder, or start the '
                             'new one in a new workdir')
    if not config.pretrained_workdir:
      return config
    try:
      ckpt_lib.load_meta(recorded['workdir'], recorded['step'])
    except FileNotFoundError as e:
      raise loop.ResumeError(f'{where}, which is gone ({e}); start a new workdir to train on another step') from None
    if config.pretrained_step < 0:
      logging.info('Resuming on the encoder the checkpoint records: %s step %d', recorded['workdir'], recorded['step'])
    config.pretrained_step = int(recorded['step'])
    return config
  # A fresh run (or a checkpoint from before the record): the newest step now.
  newest = ckpt_lib.latest_step(config.pretrained_workdir) if config.pretrained_workdir else None
  if config.pretrained_step < 0 and newest is not None:  # None: loading names what is missing.
    config.pretrained_step = int(newest)
  return config


def pretrained_record(config) -> dict:
  """What a checkpoint's meta['pretrained'] holds (pin_pretrained_step reads it back)."""
  if config.pretrained_workdir:
    return {'pretrained': {'workdir': config.pretrained_workdir, 'step': int(config.pretrained_step)}}
  if config.pretrained_path:
    return {'pretrained': {'path': config.pretrained_path}}
  return {'pretrained': {'random_init': True}}


def _encoder_name(record: dict) -> str:
  if 'workdir' in record:
    return f'{record["workdir"]} step {record["step"]}'
  return record.get('path') or 'a random initialisation'


def _same_path(a: str, b: str) -> bool:
  return a.rstrip('/') == b.rstrip('/')


@dataclasses.dataclass(frozen=True)
class Task:
  """What differs between fine-tuning and linear probing."""
  kind: str
  init_fn: Callable  # rng -> train_state.TrainState
  step_fn: Callable  # (state, batch, frozen) -> (state, metrics)
  eval_fn: Callable  # (state, frozen) -> metrics dict
  batches_fn: Callable  # start_step -> local batches
  frozen: Any = None  # Encoder params (on the mesh) the step reads but does not train.
  # params (global arrays) -> params whose encoder leaves are the pretrained host arrays.
  pretrained: Callable | None = None
  meta: dict = dataclasses.field(default_factory=dict)  # Further entries of every checkpoint's meta.
  saved_tree: Callable = lambda s: s.params  # What a checkpoint's 'params' item holds.
  from_saved: Callable = lambda saved: (saved, None)  # -> (params, batch_stats or None)


def _best_so_far(workdir: str, default: float) -> float:
  values = [r['eval/top1'] for r in metrics.read_metrics(workdir) if 'eval/top1' in r]
  return max(values, default=default)


def run(config, workdir: str, mesh, task: Task, total_steps: int, steps_per_epoch: int) -> dict:
  """Initialises or resumes, trains to total_steps with evals and checkpoints; returns the metrics."""
  ckpt_lib.check_shared_workdir(workdir)  # Multi-host: one storage for all, checked first.
  # One job per workdir, before any checkpoint is read; a SIGTERM outside the loop leaves it free (75).
  with loop.sigterm_exits(), workdir_lease.held(workdir) as lease:
    return _run(config, workdir, mesh, task, total_steps, steps_per_epoch, lease)


def _run(config, workdir: str, mesh, task: Task, total_steps: int, steps_per_epoch: int, lease) -> dict:
  """run's training, while the job holds the workdir's lease."""
  loop.check_resume(config, workdir)
  init_rng = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(task.init_fn, init_rng)
  shardings = parallel.config_shardings(abstract_state, config, mesh)
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints,
                                       every_steps=config.checkpoint_every_steps)
  state, resumed = loop.restore_or_init(checkpointer, task.init_fn, init_rng, abstract_state, shardings, mesh,
                                        saved_tree=task.saved_tree, from_saved=task.from_saved, config=config)
  if not resumed and task.pretrained is not None:
    # Leaf by leaf: the pretrained encoder's host arrays go into their shardings, the rest stays
    # as initialised. Nothing is fetched: with FSDP over hosts no process holds all of a param.
    state = state.replace(params=parallel.place_tree(task.pretrained(state.params), shardings.params))
  start_step = int(jax.device_get(state.step))
  loop.write_config(config, workdir, start_step, total_steps)
  writer = metrics.create_writer(workdir, start_step, config)
  frozen = task.frozen
  frozen_shardings = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
  jit_step = train_state.jit_step(task.step_fn, shardings, parallel.batch_sharding(mesh), mesh, frozen_shardings)
  every = config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch

  def evaluate_now(step, state, batch):
    del batch
    if step % every and step != total_steps:
      return None
    start = time.time()
    evals = task.eval_fn(state, frozen)
    evals['eval/best_top1'] = max(evals['eval/top1'], _best_so_far(workdir, evals['eval/top1']))
    logging.info('Step %d: eval top-1 %.4f top-5 %.4f (%.1f s)', step, evals['eval/top1'],
                 evals['eval/top5'], time.time() - start)
    return evals

  batches = loop.prefetch_to_mesh(task.batches_fn(start_step), mesh, config.dataset.prefetch)
  result = loop.train_loop(
      config, workdir, mesh, state=state, step_fn=lambda s, b: jit_step(s, b, frozen), batches=batches,
      total_steps=total_steps, checkpointer=checkpointer, writer=writer, saved_tree=task.saved_tree,
      extra_meta=lambda evals: {'downstream': task.kind, **task.meta,
                                'eval': {k: float(v) for k, v in evals.items()}},
      evaluate=evaluate_now, lease=lease)
  evals = result.evals
  if result.status == 'done' and not evals:  # Resumed at the end: evaluate the final state again.
    with train_state.mesh_context(mesh):
      evals = task.eval_fn(result.state, frozen)
  out = {**result.metrics, **evals, 'status': result.status, 'step': result.step,
         'saved_step': result.saved_step}
  if result.status == 'done':
    loop.write_results(workdir, {**out, 'downstream': task.kind})
  return out

