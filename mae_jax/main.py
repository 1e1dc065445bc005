"""Entry point: `python -m mae_jax.main --config=configs/FILE.py[:ARGS] --workdir=DIR`.

Runs pretraining, or what `config.downstream` names (finetune, linprobe, knn)
for the configs that have that key (configs/finetune.py, configs/linprobe.py).

Overrides: `--config.KEY=VALUE` (e.g. `--config.batch_size=512`). Multi-process
jobs (TPU pods, SLURM, or the --coordinator_address flags) initialise
jax.distributed before anything touches the devices.
"""

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mae_jax import config_tools, finetune, knn, linprobe, supervised, train

FLAGS = flags.FLAGS
PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL


def define_flags():
  """The command line of `python -m mae_jax.main` (defined by `run`, not on import: this module is a library too)."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the resolved config.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (explicit multi-process jobs).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (explicit multi-process jobs).')
  flags.DEFINE_integer('process_id', None, 'This process (explicit multi-process jobs).')
  flags.mark_flags_as_required(['config', 'workdir'])


def maybe_initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Starts jax.distributed for explicit, TPU-pod and SLURM multi-process jobs."""
  if coordinator_address:
    # Only affects CPU devices (e.g. two processes on loopback); must not touch the backend yet.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1 or os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','):
    jax.distributed.initialize()  # finds the coordinator from the cluster environment
  elif os.environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()


# config.downstream -> its trainer.
DOWNSTREAM = {'finetune': finetune.finetune, 'linprobe': linprobe.linear_probe, 'knn': knn.run_knn}


def run_experiment(config, workdir: str) -> dict:
  """Runs what the config describes: pretraining, or (with a `downstream` key) fine-tuning, probe or kNN."""
  if 'downstream' not in config:
    return train.train_and_evaluate(config, workdir)
  return DOWNSTREAM[supervised.kind(config)](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Too many command-line arguments: {argv[1:]}')
  # TensorFlow only feeds data: keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU') if tf.config.list_physical_devices('TPU') else None
  maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  logging.info('JAX process %d / %d, local devices %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  result = run_experiment(FLAGS.config, FLAGS.workdir)
  logging.info('Finished: %s', result)
  if 'downstream' in FLAGS.config and jax.process_index() == 0:
    shown = {k: v for k, v in result.items() if k.startswith('eval/') or k in ('status', 'step')}
    print(json.dumps(shown, sort_keys=True))
  if result.get('status') == 'preempted':
    # Saved and stopped early: a non-zero code tells launchers to relaunch (resume is automatic).
    sys.exit(PREEMPTED_EXIT_CODE)


def run():
  """Console-script entry point."""
  define_flags()
  app.run(main, flags_parser=config_tools.parse_flags)


if __name__ == '__main__':
  run()
