"""Entry point: `python -m mae_jax.main --config=configs/FILE.py[:ARGS] --workdir=DIR`.

Runs pretraining, or what `config.downstream` names (finetune, linprobe, knn)
for the configs that have that key (configs/finetune.py, configs/linprobe.py).

Overrides: `--config.KEY=VALUE` (e.g. `--config.batch_size=512`). Multi-process
jobs (TPU pods, SLURM, multi-slice, or the --coordinator_address flags) initialise
jax.distributed before anything touches the devices (mae_jax.distributed;
--distributed=auto|on|off).

Exit status: 0 when the run finished, PREEMPTED_EXIT_CODE (75) when it saved and
stopped early (SIGTERM, a preemption notice: rerun to resume), NONFINITE_EXIT_CODE
(65) when it halted on non-finite losses (rerunning repeats it: launchers do not
retry), CONFIG_EXIT_CODE (78) when the run cannot go on as configured (a setting that
the checks before any compile refuse, e.g. a batch the devices cannot split, a resume
that does not fit the config, a workdir its processes do not share: not retried either),
1 for other errors (those with a setting to fix end in one line, their traceback
in the log file).
"""

import json
import os
import sys
import traceback

import jax
from absl import app, flags, logging

from mae_jax import checkpoint as ckpt_lib
from mae_jax import (
  config_tools,
  console,
  distributed,
  fileio,
  finetune,
  knn,
  linprobe,
  loop,
  supervised,
  train,
  train_state,
  workdir_lease,
)

FLAGS = flags.FLAGS
PREEMPTED_EXIT_CODE = loop.STOPPED_EXIT_CODE  # 75, EX_TEMPFAIL: saved and stopped early; rerun to resume.
NONFINITE_EXIT_CODE = 65  # EX_DATAERR: halted on non-finite losses; a rerun would diverge again.
CONFIG_EXIT_CODE = 78  # EX_CONFIG: a setting or file to fix; a rerun as it is fails the same way.


def define_flags():
  """The command line of `python -m mae_jax.main` (defined by `run`, not on import: this module is a library too)."""
  config_tools.define_config_flag('Experiment config file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the resolved config.')
  flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (explicit multi-process jobs).')
  flags.DEFINE_integer('num_processes', None, 'Number of processes (explicit multi-process jobs).')
  flags.DEFINE_integer('process_id', None, 'This process (explicit multi-process jobs).')
  flags.DEFINE_enum('distributed', 'auto', distributed.MODES,
                    'jax.distributed: auto = start it for multi-process jobs (the flags above, SLURM, GKE or '
                    'GCE TPU pods, multi-slice), on = always (fails when no cluster is found), off = never.')
  console.define_flags()  # --verbose, --progress.
  flags.adopt_module_key_flags(console)  # Listed by --help.
  flags.mark_flags_as_required(['config', 'workdir'])


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
  console.setup('main', FLAGS.workdir)  # Library INFO logs to WORKDIR/logs/, not the terminal (--verbose).
  try:
    _run_main()
  except BaseException as e:  # The traceback also goes to the log file (and with it to a gs:// workdir).
    if not isinstance(e, SystemExit):
      logging.info('Stopped on this exception:', exc_info=e)
    console.copy_log_to_workdir()
    _leave_a_failed_job(e)
    raise
  console.copy_log_to_workdir()  # gs:// workdirs: the log outlives the worker's disk.


def _leave_a_failed_job(error: BaseException) -> None:
  """A process of a multi-process job that fails leaves at once, with its status.

  Its normal exit waits in jax.distributed's shutdown barrier for every other
  process (5 minutes), while they wait in a collective for it, and then all
  abort with status 134. Leaving without the barrier ends the others within
  seconds (they lose the job's coordination service: 134 there), and this
  process's status, the one that says what went wrong, reaches the launcher.
  A preemption (75) is every process's, agreed: it leaves the normal way.
  """
  code = (0 if error.code is None else error.code) if isinstance(error, SystemExit) else 1
  code = code if isinstance(code, int) else 1  # sys.exit('message') is status 1.
  if code in (0, PREEMPTED_EXIT_CODE) or not distributed.is_initialized():
    return
  if isinstance(error, SystemExit) and not isinstance(error.code, (int, type(None))):
    sys.stderr.write(f'{error.code}\n')
  elif not isinstance(error, SystemExit):
    traceback.print_exception(error)
  workdir_lease.release_all()  # os._exit skips the atexit handlers that would.
  for flush in (sys.stdout.flush, sys.stderr.flush, logging.flush):
    try:
      flush()
    except (OSError, ValueError):  # A closed pipe (`| head`) must not keep this process in the barrier.
      pass
  os._exit(code)  # pylint: disable=protected-access


def _run_main():
  # TensorFlow only feeds data: keep it off the accelerators.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU') if tf.config.list_physical_devices('TPU') else None
  try:
    distributed.initialize(FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  except ValueError as e:  # Contradicting or incomplete flags.
    sys.stderr.write(f'error: {e}\n')  # One line and exit 2, as for the other flags (not retried).
    sys.exit(2)
  console.start_backends()  # A stray libtpu's probe errors go to the log file.
  logging.info('JAX process %d / %d, local devices %s', jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    result = run_experiment(FLAGS.config, FLAGS.workdir)
  except train_state.NonFiniteLossError as e:
    # A distinct status, so that launchers stop instead of replaying the same divergence.
    logging.error('Halted on non-finite losses (exit status %d, not retried): %s', NONFINITE_EXIT_CODE, e)
    sys.exit(NONFINITE_EXIT_CODE)
  except (config_tools.ConfigError, loop.ResumeError, ckpt_lib.WorkdirError) as e:
    # A run that cannot go on as configured (checks of the settings, a resume that does not fit, a workdir not
    # shared): rerunning fails the same way, so launchers do not retry.
    console.exit_on_error(e, code=CONFIG_EXIT_CODE)
  except (ValueError, FileNotFoundError, fileio.StorageError, loop.CheckpointReadError) as e:
    # Mostly a file to fix (a data set not found, a damaged checkpoint): one line here, the traceback in the log.
    console.exit_on_error(e, show_log=True)
  logging.info('Finished: %s', result)
  if jax.process_index() == 0:  # The result, on stdout: evaluations, the last loss, where it stopped.
    shown = {k: v for k, v in result.items() if k.startswith('eval/') or k in ('status', 'step', 'train/loss')}
    try:
      print(json.dumps(shown, sort_keys=True), flush=True)
    except BrokenPipeError:  # Nobody reads stdout any more (`| head`): the run itself went well.
      sys.stdout = open(os.devnull, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  if result.get('status') == 'preempted':
    # Saved and stopped early: a non-zero code tells launchers to relaunch (resume is automatic).
    sys.exit(PREEMPTED_EXIT_CODE)


def run():
  """Console-script entry point."""
  define_flags()
  app.run(main, flags_parser=config_tools.parse_flags)


if __name__ == '__main__':
  run()
