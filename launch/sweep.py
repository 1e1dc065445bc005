r"""Runs a sweep: named variations of one config, each in its own workdir ROOT/NAME.

A sweep file (configs/sweeps/NAME.py) defines

  get_sweep(arg=None) -> dict(base='configs/FILE.py[:ARGS]',
                              runs=[dict(name='mask0.75_dec8', overrides={'mask_ratio': 0.75}), ...])

(`configs.common.grid` builds the runs of a product of value lists). Every run's
overrides are checked against the base config before anything starts, so a
typo fails at once, naming the close matches.

Modes:
  local  Runs the pending runs one after another on this machine, each as a
         `python -m mae_jax.main` subprocess (argv list, never a shell), or with
         --local_runner=inprocess through `train_and_evaluate` in this process.
  tpu    Creates one TPU (launch.tpu), sets it up once, runs the pending runs
         on it one after another (with launch.tpu's preemption retries) and
         deletes it. Flags this file does not know go to launch.tpu
         (--tpu_name, --zone, --accelerator_type, --spot, --steps, --keep, ...).

Resuming: a run whose trainer exits 0 is 'done': it gets a DONE marker in its
workdir (with the base config, overrides and trainer flags it ran) and is
skipped by later invocations. A later invocation that would give a finished run
other settings (a changed sweep or base, other flags after `--`) stops before
anything runs: its old results would pass for the new settings (use another
--root; or remove only that run's DONE file to continue it from its last
checkpoint with the new settings, e.g. more steps). An interrupted run (SIGTERM,
Ctrl-C, a lost TPU) has no marker and resumes from its newest checkpoint the
next time. SIGTERM sent to a local sweep reaches the running trainer, which
saves a checkpoint; the sweep then stops with exit status 75. A trainer that
exits with 75 by itself (preempted: it saved and stopped) is 'preempted' and
stops the sweep the same way; in tpu mode so does a run whose TPU kept being
preempted until launch.tpu's retries ran out. A trainer that halted on
non-finite losses (exit status 65) is 'failed' and not retried; the sweep goes
on with the next run. --max_runs=N stops after N runs, leaving the rest for a
later invocation.

At the end the last value of every metric each run logged (its metrics/ part files) goes into
one table, printed as markdown and written to ROOT/summary.md and
ROOT/summary.csv; a swept key's column shows the value each run ran (its
override, else the base config's). --metrics=NAMES picks the metric columns: a
name that no run logged is a typo, refused (exit 2) before anything runs when
runs have logged already, else after the runs, whose summary then shows every
metric. ROOT/sweep.json records the expanded runs. --dry_run prints
the plan and every command and runs or writes nothing.

Flags after a bare `--` go to every trainer; they may not set --workdir,
--config or a key the sweep sets per run, and their --config.KEY must exist in
the base config with a VALUE that reads as its type (checked before any run
starts, as --config.seed=abc would fail every run). A sweep's override must
have the base value's type (the trainer reads --config.KEY=TEXT as that type).
--only=NAMES runs those runs; the summary and ROOT/sweep.json still list every
run.

Exit status: 0 when every run it tried finished, 1 when one failed (a
non-finite halt included), 75 when interrupted or preempted (rerun to resume;
Ctrl-C, SIGTERM and SIGHUP in tpu mode included), 2 for usage errors.

Examples:

  # Four tiny runs on the CPU, then the summary table.
  python -m launch.sweep --sweep=configs/sweeps/tiny_demo_sweep.py --root=/tmp/tiny_sweep

  # The paper's mask ratio x decoder depth ablation (ViT-L, 800 epochs) on a v4-128.
  python -m launch.sweep --sweep=configs/sweeps/mask_ratio_x_decoder_depth.py \
    --root=gs://BUCKET/mae/ablation --mode=tpu --tpu_name=mae-ablation \
    --zone=us-central2-b --accelerator_type=v4-128 --spot --dry_run

  # Flags after a bare `--` go to every trainer run unchanged.
  python -m launch.sweep --sweep=configs/sweeps/tiny_demo_sweep.py --root=/tmp/s -- --config.seed=1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import TextIO

if __package__ in (None, ''):
  # Run as `python launch/sweep.py`: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import common as config_common  # pylint: disable=g-import-not-at-top
from launch import common, sweep_summary  # pylint: disable=g-import-not-at-top
from launch.sweep_spec import (  # pylint: disable=g-import-not-at-top  # noqa: F401  # Part of this module's API.
  Run,
  Sweep,
  check_done_runs,
  check_trainer_args,
  load_sweep,
  mark_done,
  run_config,
  run_settings,
  select_runs,
)
from launch.sweep_summary import is_done, read_metrics  # pylint: disable=g-import-not-at-top
from mae_jax import fileio  # pylint: disable=g-import-not-at-top

MODES = ('local', 'tpu')
LOCAL_RUNNERS = ('subprocess', 'inprocess')
EXIT_FAILED = 1
EXIT_INTERRUPTED = common.PREEMPTED_EXIT_CODE  # EX_TEMPFAIL: rerun the same command to resume.
# Statuses after which the sweep stops (exit EXIT_INTERRUPTED).
STOPPING = ('interrupted', 'preempted')


# ----------------------------------------------------------------------------
# The sweep: launch.sweep_spec.



def _trainer_argv(sweep: Sweep, run: Run, extra_args: Sequence[str], python: str) -> list[str]:
  """`python -m mae_jax.main --config=... --workdir=... --config.KEY=VALUE ...` for one run."""
  path, arg = config_common.split_spec(sweep.base)
  if not os.path.isabs(path) and not os.path.exists(path):
    path = os.path.join(config_common.REPO_ROOT, path)
  config = os.path.abspath(path) + ('' if arg is None else ':' + arg)
  return common.job_argv(python, config, run.workdir, run.override_args, extra_args)


class TrainerRunner(common.Runner):
  """Runs trainer subprocesses from the repository root; SIGTERM is passed on to them.

  `interrupted` is set when this process got SIGTERM while a trainer ran (the
  trainer saves a checkpoint and stops; the sweep then stops too).
  """

  def __init__(self, dry_run: bool = False, out: TextIO | None = None):
    super().__init__(dry_run=dry_run, out=out)
    self.interrupted = False

  def _call(self, command: tuple[str, ...]) -> int:
    process = subprocess.Popen(list(command), cwd=config_common.REPO_ROOT)

    def forward(signum, frame):
      del frame
      self.interrupted = True
      process.send_signal(signum)

    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:  # Signal handlers can only be set there.
      previous = signal.signal(signal.SIGTERM, forward)
    try:
      return process.wait()
    except BaseException:
      # Ctrl-C or an error here: let the trainer save, then stop it for good.
      self.interrupted = True
      process.terminate()
      try:
        process.wait(timeout=120)
      except subprocess.TimeoutExpired:
        process.kill()
      raise
    finally:
      if on_main_thread:
        signal.signal(signal.SIGTERM, previous)


def run_local(sweep: Sweep, *, local_runner: str = 'subprocess', max_runs: int = 0,
              extra_args: Sequence[str] = (), runner: common.Runner | None = None,
              python: str = sys.executable, statuses: dict[str, str] | None = None) -> dict[str, str]:
  """Runs the pending runs one after another; returns {name: status} of those it tried.

  A status is 'done', 'failed', 'interrupted' (this process got SIGTERM or
  Ctrl-C) or 'preempted' (the trainer exited 75); the loop stops after an
  interrupted or preempted run and after `max_runs` runs (0: no limit).
  """
  runner = runner or TrainerRunner()
  if local_runner not in LOCAL_RUNNERS:
    raise ValueError(f'--local_runner={local_runner!r}: must be one of {LOCAL_RUNNERS}')
  if local_runner == 'inprocess' and extra_args:
    raise ValueError(f'trainer flags after `--` ({" ".join(extra_args)}) need '
                     '--local_runner=subprocess; put overrides into the sweep instead')
  configs = {run.name: run_config(sweep, run) for run in sweep.runs}  # Fails before any run.
  statuses, started = {} if statuses is None else statuses, 0  # Filled as runs end (read after a Ctrl-C).
  for run in sweep.runs:
    if is_done(run):
      runner.echo(f'# {run.name}: done, skipped')
      continue
    if max_runs and started >= max_runs:
      runner.echo(f'# stopping after --max_runs={max_runs}; rerun to continue')
      break
    runner.echo(f'# {run.name}: {"resuming" if fileio.exists(run.workdir) else "starting"} in {run.workdir}')
    argv = _trainer_argv(sweep, run, extra_args, python)
    started += 1
    if runner.dry_run:
      runner.run(argv)
      continue
    config = configs[run.name]
    try:
      if local_runner == 'inprocess':
        from mae_jax import main as main_lib  # pylint: disable=g-import-not-at-top
        result = main_lib.run_experiment(config, run.workdir)
        status = 'done' if result.get('status') == 'done' else 'interrupted'
      else:
        runner.echo('$ ' + shlex.join(argv))
        returncode = runner.run(argv, check=False)
        interrupted = getattr(runner, 'interrupted', False)
        if returncode == 0 and not interrupted:  # The trainer's word: it exits 75 when it saved and stopped early.
          status = 'done'
        elif interrupted:
          status = 'interrupted'
        elif returncode == common.PREEMPTED_EXIT_CODE:
          status = 'preempted'  # Saved and stopped by a signal this sweep did not send.
        else:  # Non-finite halts (65) included: a rerun would diverge again.
          status = 'failed'
        result = {'step': read_metrics(run).get('step')}
    except Exception:  # noqa: BLE001  One failed run must not stop the others.
      runner.echo(f'# {run.name}: failed\n{traceback.format_exc()}')
      status, result = 'failed', {}
    statuses[run.name] = status
    runner.echo(f'# {run.name}: {status}')
    if status == 'done':
      mark_done(run, result, run_settings(sweep, run, extra_args))
    elif status in STOPPING:
      runner.echo(f'# {status}: rerun the same command to resume from the checkpoint')
      break
  return statuses


def run_tpu(sweep: Sweep, template, runner: common.Runner, steps: Sequence[str],
            max_runs: int = 0, statuses: dict[str, str] | None = None) -> dict[str, str]:
  """Runs the pending runs on one TPU, created and set up once; returns {name: status}.

  Args:
    sweep: the sweep; its root must be gs://... (or a path every worker shares).
    template: a launch.tpu.TpuJob with the TPU settings; config, workdir and
      overrides are set per run.
    runner: a launch.common.Runner (dry_run prints the gcloud commands).
    steps: launch.tpu steps: create and setup happen once, run per run,
      delete once at the end (also after a failure).
    max_runs: stop after this many runs (0: no limit).
  """
  from launch import tpu  # pylint: disable=g-import-not-at-top
  check_markers = not (runner.dry_run and fileio.is_remote(sweep.root))
  if not check_markers:
    runner.echo(f'# dry run: not reading DONE markers under {sweep.root}; every run is listed')
  pending = []
  for run in sweep.runs:
    if check_markers and is_done(run):
      runner.echo(f'# {run.name}: done, skipped')
    else:
      pending.append(run)
  if max_runs and len(pending) > max_runs:
    runner.echo(f'# --max_runs={max_runs}: running {", ".join(r.name for r in pending[:max_runs])}')
    pending = pending[:max_runs]
  statuses = {} if statuses is None else statuses  # Filled as runs end (read after a Ctrl-C).
  if not pending:
    return statuses
  jobs = [dataclasses.replace(template, config=sweep.base, workdir=run.workdir,
                              overrides=tuple(run.override_args)) for run in pending]
  once = [s for s in ('create', 'setup') if s in steps]
  foreign = False  # A TPU of that name but another type: left alone, as launch.tpu leaves it.
  try:
    if once:
      try:
        tpu.launch(jobs[0], runner, once)
      except tpu.ForeignTpu:
        foreign = True
        raise
    if 'run' in steps:
      for run, job in zip(pending, jobs):
        runner.echo(f'# {run.name}: running in {run.workdir}')
        try:
          tpu.launch(job, runner, ['run'])
        except common.Preempted as e:
          runner.echo(f'# {run.name}: preempted: {e}')
          statuses[run.name] = 'preempted'
          break  # The TPU keeps being preempted: stop; the same command resumes.
        except common.LaunchError as e:  # A non-finite halt too: never retried.
          runner.echo(f'# {run.name}: failed: {e}')
          statuses[run.name] = 'failed'
          continue
        statuses[run.name] = 'done'
        if not runner.dry_run:
          mark_done(run, {'step': None}, run_settings(sweep, run, template.extra_args))
  finally:
    if 'delete' in steps and not foreign and runner.run(tpu.delete_command(jobs[0]), check=False):
      runner.echo(f'# WARNING: deleting {jobs[0].tpu_name} failed; delete it by hand')
  return statuses


@contextlib.contextmanager
def compilation_cache(path: str):
  """Keeps jit compilations under `path` for this process and its trainer subprocesses.

  Runs of a sweep often share shapes, and a CPU spends most of a tiny run
  compiling: with the cache only the first run of each shape compiles. The
  previous settings come back on exit.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache as jax_cache  # pylint: disable=g-import-not-at-top
  settings = {'jax_compilation_cache_dir': path,
              'jax_persistent_cache_min_compile_time_secs': 0.0,
              'jax_persistent_cache_min_entry_size_bytes': -1}
  previous = {name: getattr(jax.config, name) for name in settings}
  previous_env = {name.upper(): os.environ.get(name.upper()) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
    os.environ[name.upper()] = str(value)
  jax_cache.reset_cache()
  try:
    yield
  finally:
    for name, value in previous.items():
      jax.config.update(name, value)
    for name, value in previous_env.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    jax_cache.reset_cache()


# ----------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m launch.sweep', description=__doc__.split('\n\n')[0], allow_abbrev=False,
      epilog='In --mode=tpu, flags not listed here go to launch.tpu; flags after a bare `--` '
             'go to every trainer run.')
  add = common.add_flag
  add(parser, 'sweep', required=True, help='configs/sweeps/NAME.py[:ARGS].')
  add(parser, 'root', required=True, help='Runs go to ROOT/NAME; gs://... for --mode=tpu.')
  add(parser, 'mode', default='local', choices=MODES, help='Where the runs go.')
  add(parser, 'local_runner', default='subprocess', choices=LOCAL_RUNNERS,
      help='local mode: a `python -m mae_jax.main` subprocess per run, or train_and_evaluate here.')
  add(parser, 'max_runs', type=int, default=0, help='Run at most this many runs now (0: all).')
  add(parser, 'only', default='', help='Comma-separated run names to consider (default: all).')
  add(parser, 'metrics', default='',
      help='Comma-separated metric columns (default: all); a name that no run logged is refused.')
  add(parser, 'compilation_cache_dir', default='',
      help='local mode: persist jit compilations here, shared by the runs (CPU sweeps).')
  add(parser, 'dry_run', action='store_true', help='Print the plan and commands; run nothing.')
  return parser


def _split(text: str) -> list[str]:
  return [s.strip() for s in text.split(',') if s.strip()]


def _tpu_template(tpu_args: Sequence[str], trainer_args: Sequence[str]):
  """The TpuJob settings and steps from launch.tpu flags (config/workdir come per run)."""
  from launch import tpu  # pylint: disable=g-import-not-at-top
  parser = tpu.build_parser()
  parser.prog = 'python -m launch.sweep --mode=tpu'
  args = parser.parse_args(list(tpu_args))
  for name in ('config', 'workdir', 'overrides'):
    if getattr(args, name):
      raise ValueError(f'--{name}: the sweep sets it for each run; leave it out in --mode=tpu')
  return tpu.job_from_args(args, trainer_args), tpu.parse_steps(args.steps, args.keep)


def main(argv: Sequence[str] | None = None, runner: common.Runner | None = None,
         out: TextIO | None = None) -> int:
  """CLI entry point; returns the exit status."""
  own_args, trainer_args = common.split_passthrough(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args, rest = parser.parse_known_args(own_args)
  if rest and args.mode != 'tpu':
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  if args.max_runs < 0:
    parser.error(f'--max_runs={args.max_runs}: must be >= 0')
  try:
    sweep = load_sweep(args.sweep, args.root)
    todo = select_runs(sweep, _split(args.only))  # The summary still shows every run.
    template, steps = _tpu_template(rest, trainer_args) if args.mode == 'tpu' else (None, ())
    check_trainer_args(sweep, trainer_args)
    for run in todo.runs if template is not None else ():  # What each TPU run's trainer will read, before a TPU.
      common.check_job_config(sweep.base, run.override_args, trainer_args, template.source_dir,
                              None if template.repo_url else template.git_ref)
    if not (args.dry_run and fileio.is_remote(sweep.root)):
      check_done_runs(sweep, trainer_args)
    # A --metrics name that no run has logged (when some have: a rerun to tabulate a sweep) is a typo.
    sweep_summary.check_metrics(sweep, _split(args.metrics), read=not (args.dry_run and fileio.is_remote(sweep.root)))
  except (ValueError, FileNotFoundError) as e:
    parser.error(str(e))
  if runner is None:
    runner = TrainerRunner(dry_run=args.dry_run, out=out) if args.mode == 'local' else \
        common.Runner(dry_run=args.dry_run, out=out)
  runner.echo(f'# sweep {sweep.spec}: {len(sweep.runs)} runs of {sweep.base} under {sweep.root}')
  if not args.dry_run:
    sweep_summary.write_manifest(sweep)
  statuses = {}
  try:
    if args.mode == 'local':
      cache = compilation_cache(args.compilation_cache_dir) if args.compilation_cache_dir and \
          not args.dry_run else contextlib.nullcontext()
      with cache:
        statuses = run_local(todo, local_runner=args.local_runner, max_runs=args.max_runs,
                             extra_args=trainer_args, runner=runner, statuses=statuses)
    else:
      with common.stop_signals_interrupt():  # The TPU is deleted on SIGTERM / SIGHUP too.
        statuses = run_tpu(todo, template, runner, steps, args.max_runs, statuses=statuses)
  except ValueError as e:
    parser.error(str(e))
  except common.LaunchError as e:
    runner.echo(f'error: {e}')
    return EXIT_FAILED
  except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM or SIGHUP in tpu mode (the TPU is deleted by then).
    running = [r.name for r in todo.runs if r.name not in statuses and not is_done(r)][:1]
    statuses.update({name: 'interrupted' for name in running})
    runner.echo(f'# interrupted ({e or "Ctrl-C"}): rerun the same command to resume')
  # A dry run reads local workdirs (cheap, shows what is done) but not gs:// ones.
  read = not (args.dry_run and fileio.is_remote(sweep.root))
  metrics_error = None
  try:
    columns, rows = sweep_summary.summary_rows(sweep, {} if args.dry_run else statuses, _split(args.metrics),
                                               read=read)
  except ValueError as e:  # A --metrics name that no run logged, known only now that runs have logged: a typo.
    metrics_error = str(e)
    columns, rows = sweep_summary.summary_rows(sweep, {} if args.dry_run else statuses, (), read=read)
  markdown = (sweep_summary.format_markdown(columns, rows) if args.dry_run else
              sweep_summary.write_summary(sweep, columns, rows))
  runner.echo(markdown.rstrip('\n'))
  if not args.dry_run:
    runner.echo(f'# summary: {fileio.join(sweep.root, "summary.md")}, {fileio.join(sweep.root, "summary.csv")}')
  if metrics_error:
    runner.echo(f'error: {metrics_error}; the summary above and its files show every metric instead')
  if any(status in STOPPING for status in statuses.values()):
    return EXIT_INTERRUPTED
  if 'failed' in statuses.values():
    return EXIT_FAILED
  return common.USAGE_EXIT_CODE if metrics_error else 0


if __name__ == '__main__':
  sys.exit(main())
