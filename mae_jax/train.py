"""MAE pretraining: `train_and_evaluate(config, workdir)`.

One code path from one CPU to a TPU pod: a named mesh, state initialised
directly into its shardings, a jitted train step with donated state
(`pretrain_step.build_train_step`, which `mae_jax.aot` compiles too), and the shared loop
(`mae_jax.loop`): Orbax checkpoints with automatic resume, preemption handling
and clu metrics. `config.init_from` starts step 0 from released or earlier
weights (`mae_jax.warm_start`).
"""

import functools

import flax
import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview

from mae_jax import checkpoint as ckpt_lib
from mae_jax import knn, loop, metrics, parallel, pretrain_step, visualize, wandb_writer, warm_start, workdir_lease
from mae_jax.data import inputs

# ----------------------------------------------------------------------------
# Input.

def batches_with_corrupt_flags(iterator):
  """Local batches with pretrain_step.BATCH_KEYS: sources that cannot fail to decode mark no row corrupt."""
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
  wandb_writer.check(config)  # Before the data set is read: a bad setting is named first.
  pretrain_step.validate_config(config, mesh)
  inputs.check_input(config)  # The data set against the settings, before a model is built.
  config = inputs.resolve_dataset_stats(config)  # dataset.mean / std = (): the data set's stored ones.
  ckpt_lib.check_shared_workdir(workdir)  # Multi-host: one storage for all, checked first.
  # One job per workdir, before any checkpoint is read; a SIGTERM outside the loop leaves it free (75).
  with loop.sigterm_exits(), workdir_lease.held(workdir) as lease:
    return _pretrain(config, workdir, mesh, lease)


def _pretrain(config: ml_collections.ConfigDict, workdir: str, mesh, lease) -> dict:
  """train_and_evaluate's run, while the job holds the workdir's lease."""
  loop.check_resume(config, workdir)
  step = pretrain_step.build_train_step(config, mesh, inputs.num_train_examples(config))
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
                                        step.state_shardings, mesh, config=config)
  start_step = int(jax.device_get(state.step))
  loop.write_config(config, workdir, start_step, step.total_steps)
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
      flops_per_image=pretrain_step.train_flops_per_image(model, config.mask_ratio), lease=lease)
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
