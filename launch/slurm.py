r"""Writes an sbatch script for MAE training on a SLURM GPU cluster and submits it.

One process per GPU by default (`--ntasks-per-node=GPUS` with all the node's
GPUs visible to each task; jax gives task SLURM_LOCALID its own GPU), or one
process per node driving all its GPUs (--process_mode=per_node). Either way
`jax.distributed.initialize()` in the trainer reads the coordinator address,
process count and id from the SLURM_* variables that srun sets.

Preemption and time limits (the trainer saves a checkpoint on SIGTERM and exits
75; the next run resumes from the newest checkpoint in --workdir):
  * `#SBATCH --requeue`: a preemption (PreemptMode=REQUEUE) or `scontrol requeue`
    sends SIGTERM to every process of the job, SIGKILL after KillWait, and Slurm
    queues the job again by itself. The batch shell traps SIGTERM and waits for
    the trainer's save instead of dying with it.
  * With --signal_seconds=N (default 120; below --time) the batch shell gets
    SIGUSR1 N seconds before the time limit (Slurm may send it up to 60 s
    earlier: it checks time limits periodically), sends SIGTERM to the
    trainer's tasks with `scancel --signal=TERM JOBID` (srun itself answers
    SIGTERM by killing its tasks at once), waits for them and requeues the job
    with `scontrol requeue`.
  * `scancel --batch --signal=USR1 JOBID` is "save and requeue now": the same
    handler. After a signal to the shell it requeues whatever srun's status
    (but 65, 78, 2): srun reports its tasks' highest status, and with
    --kill-on-bad-exit a stop of many tasks may read 137 (tasks still exiting
    after the first one exited 75 are killed), although every task saved.
  * Whenever the trainer exits 75 while the job is still RUNNING (also after
    `scancel --signal=TERM JOBID`, which signals the tasks only), the shell
    requeues the job. A plain `scancel`, reaching the time limit itself, or
    --norequeue end the job; it then exits with the trainer's status.
  * On success the shell prints MAE_JAX_JOB_SUCCEEDED and exits 0.
  * `--open-mode=append` keeps every run of a requeued job in one log file,
    whose folder is created at submission.

--dry_run (or --dry-run) prints the script and the sbatch command and writes or
runs nothing; otherwise the script is written to --script and `sbatch SCRIPT` is
run (argv list, no shell). Values go into the script shell-quoted; #SBATCH
values are checked to be free of spaces and quotes. --setup lines are copied
into the script as they are: they are shell code by intent (activate a venv,
load modules).

Examples:

  # 2 nodes x 8 GPUs, one process per GPU; preview.
  python -m launch.slurm --job_name=mae-l16 --nodes=2 --gpus_per_node=8 \
    --cpus_per_task=12 --partition=gpu --account=my-acct --time=24:00:00 \
    --setup='source ~/mae-jax/.venv/bin/activate' --chdir=$HOME/mae-jax \
    --config=configs/mae_pretrain.py:variant=L/16 --workdir=/shared/mae/l16 --dry_run

  # In a container (pyxis), one process per node, extra trainer flags after `--`.
  python launch/slurm.py --nodes=4 --process_mode=per_node \
    --container_image=nvcr.io#nvidia/jax:25.04-py3 --container_mounts=/shared:/shared \
    --config=configs/default.py --workdir=/shared/mae/run2 -- --config.num_epochs=800

Python API (what the CLI calls):

  from launch import common, slurm
  job = slurm.SlurmJob(nodes=2, gpus_per_node=8, config='configs/default.py',
                       workdir='/shared/mae/run1')
  print(slurm.sbatch_script(job))
  slurm.submit(job, common.Runner(dry_run=True))
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from collections.abc import Sequence

if __package__ in (None, ''):
  # Run as `python launch/slurm.py`: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # pylint: disable=g-import-not-at-top

PROCESS_MODES = ('per_gpu', 'per_node')

_JOB_NAME = re.compile(r'[A-Za-z0-9_.-]+')
# minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes[:seconds]].
_TIME = re.compile(r'[0-9]+(:[0-9]{1,2}){0,2}|[0-9]+-[0-9]{1,2}(:[0-9]{1,2}){0,2}')
# An #SBATCH value: no whitespace or quotes, which sbatch would not read as one value.
_DIRECTIVE_VALUE = re.compile(r'[^\s\'"\\]+')
_MAX_SIGNAL_SECONDS = 65535  # Slurm's upper bound for --signal=...@TIME.
PREEMPTED_EXIT_CODE = common.PREEMPTED_EXIT_CODE  # mae_jax.main after saving on SIGTERM (EX_TEMPFAIL).
NONFINITE_EXIT_CODE, CONFIG_EXIT_CODE = common.NONFINITE_EXIT_CODE, common.CONFIG_EXIT_CODE
# sbatch options the script sets from this launcher's own flags (a second one in --sbatch_flag would win).
_MANAGED_OPTIONS = {
    '--job-name': '--job_name', '-J': '--job_name', '--nodes': '--nodes', '-N': '--nodes',
    '--ntasks-per-node': '--gpus_per_node and --process_mode', '--ntasks': '--gpus_per_node and --process_mode',
    '--gpus-per-node': '--gpus_per_node', '--gpus-per-task': '--gpus_per_node (one JAX process sees them all)',
    '--cpus-per-task': '--cpus_per_task',
    '--mem': '--mem', '--partition': '--partition', '--account': '--account', '--qos': '--qos',
    '--time': '--time', '--output': '--output', '--error': '--output (one log)', '--open-mode': '--output',
    '--requeue': '--norequeue', '--no-requeue': '--norequeue', '--signal': '--signal_seconds',
    '--export': 'the script exports --env and what the trainer needs',
}


def time_limit_seconds(value: str) -> int:
  """Seconds in a Slurm time limit: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS."""
  days, _, clock = value.rpartition('-')
  parts = [int(p) for p in clock.split(':')]
  if days:
    hours, minutes, seconds = (parts + [0, 0])[:3]
  elif len(parts) == 3:
    hours, minutes, seconds = parts
  else:
    hours, (minutes, seconds) = 0, (parts + [0])[:2]
  return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclasses.dataclass(frozen=True)
class SlurmJob:
  """Everything that goes into the sbatch script; field names match the CLI flags."""
  config: str = ''
  workdir: str = ''
  job_name: str = 'mae-jax'
  nodes: int = 1
  gpus_per_node: int = 8
  process_mode: str = 'per_gpu'
  cpus_per_task: int = 0
  mem: str = ''
  partition: str = ''
  account: str = ''
  qos: str = ''
  time: str = ''
  output: str = 'slurm-%x-%j.out'
  sbatch_flags: tuple[str, ...] = ()
  chdir: str = ''
  setup: tuple[str, ...] = ()
  container_image: str = ''
  container_mounts: str = ''
  python: str = 'python'
  overrides: tuple[str, ...] = ()
  env: tuple[str, ...] = ()
  extra_args: tuple[str, ...] = ()
  requeue: bool = True
  signal_seconds: int = 120
  script: str = ''

  def __post_init__(self):
    for name in ('sbatch_flags', 'setup', 'overrides', 'env', 'extra_args'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if self.nodes < 1:
      raise ValueError(f'--nodes={self.nodes}: must be >= 1')
    if self.gpus_per_node < 1:
      raise ValueError(f'--gpus_per_node={self.gpus_per_node}: must be >= 1')
    if self.cpus_per_task < 0:
      raise ValueError(f'--cpus_per_task={self.cpus_per_task}: must be >= 0 (0 leaves it '
                       'to the cluster default)')
    if self.process_mode not in PROCESS_MODES:
      raise ValueError(f'--process_mode={self.process_mode!r}: must be one of '
                       f'{", ".join(PROCESS_MODES)}')
    if not _JOB_NAME.fullmatch(self.job_name):
      raise ValueError(f'--job_name={self.job_name!r}: use letters, digits, _ . or -')
    if self.time and not _TIME.fullmatch(self.time):
      raise ValueError(f'--time={self.time!r}: expected MINUTES, HH:MM:SS or D-HH:MM:SS')
    if not 0 <= self.signal_seconds <= _MAX_SIGNAL_SECONDS:
      raise ValueError(f'--signal_seconds={self.signal_seconds}: must be in '
                       f'[0, {_MAX_SIGNAL_SECONDS}] (0 disables the early signal)')
    if self.time and self.signal_seconds and 0 < time_limit_seconds(self.time) <= self.signal_seconds:
      raise ValueError(f'--signal_seconds={self.signal_seconds}: must be below --time={self.time} '
                       f'({time_limit_seconds(self.time)}s), or the signal comes as the job starts; '
                       'e.g. --time=0:02:00 --signal_seconds=60')
    for flag, value in (('--mem', self.mem), ('--partition', self.partition),
                        ('--account', self.account), ('--qos', self.qos),
                        ('--output', self.output)):
      if value and not _DIRECTIVE_VALUE.fullmatch(value):
        raise ValueError(f'{flag}={value!r}: #SBATCH values may not contain spaces, quotes '
                         'or backslashes')
    if not self.output:
      raise ValueError("--output='': give a log path such as slurm-%x-%j.out")
    for flag in self.sbatch_flags:
      if not flag.startswith('--') or not _DIRECTIVE_VALUE.fullmatch(flag):
        raise ValueError(f'--sbatch_flag={flag!r}: must be one sbatch option such as '
                         '--exclusive or --constraint=a100, without spaces or quotes')
      option = flag.split('=', 1)[0]
      if option in _MANAGED_OPTIONS:
        raise ValueError(f'--sbatch_flag={flag!r}: the launcher sets {option} itself '
                         f'({_MANAGED_OPTIONS[option]}); a second one would override it')
    for line in self.setup:
      if '\n' in line:
        raise ValueError(f'--setup={line!r}: give one line per --setup flag')
    common.parse_env(self.env)
    common.job_argv(self.python, self.config, self.workdir, self.overrides)

  @property
  def tasks_per_node(self) -> int:
    return self.gpus_per_node if self.process_mode == 'per_gpu' else 1

  @property
  def script_path(self) -> str:
    return self.script or os.path.join('workdirs', 'slurm', f'{self.job_name}.sbatch')


def _srun_argv(job: SlurmJob) -> list[str]:
  argv = ['srun', '--kill-on-bad-exit=1']
  if job.cpus_per_task:
    # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05).
    argv.append(f'--cpus-per-task={job.cpus_per_task}')
  if job.container_image:
    argv.append(f'--container-image={job.container_image}')
    if job.container_mounts:
      argv.append(f'--container-mounts={job.container_mounts}')
  return argv


def sbatch_script(job: SlurmJob) -> str:
  """The complete sbatch script for `job`."""
  q = shlex.quote
  directives = [
      f'--job-name={job.job_name}',
      f'--nodes={job.nodes}',
      f'--ntasks-per-node={job.tasks_per_node}',
      f'--gpus-per-node={job.gpus_per_node}',
  ]
  if job.cpus_per_task:
    directives.append(f'--cpus-per-task={job.cpus_per_task}')
  for name, value in (('mem', job.mem), ('partition', job.partition),
                      ('account', job.account), ('qos', job.qos), ('time', job.time)):
    if value:
      directives.append(f'--{name}={value}')
  directives += [f'--output={job.output}', '--open-mode=append']
  if job.requeue:
    directives.append('--requeue')
    if job.signal_seconds:
      directives.append(f'--signal=B:USR1@{job.signal_seconds}')
  else:
    directives.append('--no-requeue')  # The cluster's default (JobRequeue=1) would requeue on preemption.
    if job.signal_seconds:
      directives.append(f'--signal=TERM@{job.signal_seconds}')
  directives += list(job.sbatch_flags)

  # srun's steps inherit sbatch's --export (NONE on some sites): ALL gives them this script's exports.
  env = [('SLURM_EXPORT_ENV', 'ALL'), ('PYTHONUNBUFFERED', '1'), *common.parse_env(job.env)]
  if job.process_mode == 'per_node':
    # jax.distributed.initialize() would otherwise give the single process per
    # node only GPU SLURM_LOCALID=0; this keeps all of them.
    env.append(('JAX_LOCAL_DEVICE_IDS', ','.join(str(i) for i in range(job.gpus_per_node))))
  trainer = common.job_argv(job.python, job.config, job.workdir, job.overrides, job.extra_args)
  srun_line = shlex.join(_srun_argv(job))
  if job.container_image:
    # Expanded by the batch shell: the container starts in the directory we are in.
    srun_line += ' --container-workdir="${PWD}"'

  lines = ['#!/bin/bash',
           '# Generated by launch/slurm.py. Submit with: sbatch THIS_FILE']
  lines += [f'#SBATCH {d}' for d in directives]
  lines.append('')
  if job.chdir:
    lines.append(f'cd {q(job.chdir)} || exit 1')
  if job.setup:
    lines += ['# --setup lines, verbatim:', *job.setup]
  lines += [f'export {k}={q(v)}' for k, v in env]
  lines += [
      '',
      ('echo "job ${SLURM_JOB_ID}: ${SLURM_JOB_NUM_NODES} nodes, '
       f'{job.tasks_per_node} tasks per node, restart ${{SLURM_RESTART_COUNT:-0}}"'),
  ]
  # Slurm signals every process of the job with SIGTERM on preemption, `scontrol requeue`,
  # `scancel --signal=TERM --full` and at the time limit, and then SIGKILL after KillWait. This
  # shell waits for the trainer (which saves and exits 75) instead of dying with it.
  lines += [
      '',
      'trapped=',
      'signalled=',
      'on_sigterm() {',
      '  trapped=1',
      '  signalled=TERM',
      '  echo "job ${SLURM_JOB_ID}: SIGTERM; the trainer saves a checkpoint and exits" >&2',
      '}',
      'trap on_sigterm TERM',
  ]
  if job.requeue and job.signal_seconds:
    lines += [
        '# SIGUSR1 (to this shell only) near the time limit: SIGTERM to the trainer\'s tasks with',
        '# scancel (srun answers SIGTERM by killing them at once), so it saves; requeued below.',
        'requeue_before_time_limit() {',
        '  trapped=1',
        '  signalled=USR1',
        (f'  echo "job ${{SLURM_JOB_ID}}: time limit in <= {job.signal_seconds}s: SIGTERM to the trainer, '
         'then requeue" >&2'),
        '  for attempt in 1 2 3; do',
        '    scancel --signal=TERM "${SLURM_JOB_ID}" && break',
        '    echo "job ${SLURM_JOB_ID}: scancel failed (try ${attempt}/3)" >&2',
        '    sleep 5',
        '  done',
        '}',
        'trap requeue_before_time_limit USR1',
    ]
  lines += [
      '',
      f'{srun_line} \\',
      f'  {shlex.join(trainer)} &',
      'srun_pid=$!',
      'status=',
      'while :; do',
      '  trapped=',
      '  wait "${srun_pid}"',
      '  code=$?',
      '  # A trapped signal ends `wait` early (status > 128): wait again, for the status of srun (bash keeps',
      '  # it until it is waited for, also when srun ended meanwhile). 127: srun was already waited for.',
      '  if [ "${code}" -eq 127 ] && [ -n "${status}" ]; then break; fi',
      '  status=${code}',
      '  if [ -z "${trapped}" ] || [ "${code}" -le 128 ]; then break; fi',
      'done',
      'echo "job ${SLURM_JOB_ID}: trainer exited with status ${status}" >&2',
      'if [ "${status}" -eq 0 ]; then',
      f'  echo {common.SUCCESS_MARKER} >&2',
      '  exit 0',
      'fi',
  ]
  if job.requeue:
    lines += [
        f'# {PREEMPTED_EXIT_CODE}: the trainer saved and stopped early. Requeue unless Slurm is already',
        '# ending the job: a preemption or `scontrol requeue` requeues it by itself, and a',
        '# plain `scancel` or the time limit must stay final.',
        '# A status that a rerun repeats (65 non-finite, 78 a setting, 2 a flag) is final, signal or not.',
        f'case "${{status}}" in {NONFINITE_EXIT_CODE}|{CONFIG_EXIT_CODE}|2) signalled= ;; esac',
        f'if [ "${{status}}" -eq {PREEMPTED_EXIT_CODE} ] || [ -n "${{signalled}}" ]; then',
        '  state=',
        '  for attempt in 1 2 3 4 5; do  # A busy controller: ask again before giving up the requeue.',
        '    if state=$(squeue -h -j "${SLURM_JOB_ID}" -o %T); then break; fi',
        '    echo "job ${SLURM_JOB_ID}: squeue failed (try ${attempt}/5)" >&2',
        '    state=unknown',
        '    sleep 10',
        '  done',
        '  if [ "${state}" = RUNNING ]; then',
        '    echo "job ${SLURM_JOB_ID}: requeueing; the next run resumes from the newest checkpoint" >&2',
        '    scontrol requeue "${SLURM_JOB_ID}"',
        '  else',
        '    echo "job ${SLURM_JOB_ID}: ${state:-gone}, left to Slurm" >&2',
        '  fi',
        'fi',
    ]
  lines += ['exit "${status}"', '']
  return '\n'.join(lines)


def submit(job: SlurmJob, runner: common.Runner) -> None:
  """Writes the script and runs `sbatch SCRIPT`; in dry-run mode prints both instead."""
  script = sbatch_script(job)
  path = job.script_path
  if runner.dry_run:
    runner.echo(f'# {path}')
    runner.echo(script)
  else:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    # Slurm does not create the log's folder: a job whose folder is missing fails without a log.
    log_dir = os.path.dirname(job.output)
    if log_dir and '%' not in log_dir:
      os.makedirs(log_dir, exist_ok=True)
    elif '%' in log_dir:  # logs/%x/%j.out: Slurm expands the pattern; the folders before it can be made now.
      fixed = os.path.dirname(log_dir.split('%', 1)[0] + 'x')
      if fixed:
        os.makedirs(fixed, exist_ok=True)
      print(f'warning: --output={job.output}: Slurm does not create folders, and the one named by a pattern '
            f'({log_dir}) must exist when the job starts', file=sys.stderr)
    # --env values (e.g. an API key) are in it: the owner's only, from its creation on.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    os.fchmod(fd, 0o700)  # An existing file keeps its mode through O_CREAT.
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(script)
  runner.run(['sbatch', path])


def build_parser() -> argparse.ArgumentParser:
  """The CLI flags; every flag also accepts its dashed spelling (--dry-run)."""
  parser = argparse.ArgumentParser(
      prog='python -m launch.slurm', description=__doc__.split('\n\n')[0],
      epilog='Flags after a bare `--` are passed to mae_jax.main unchanged.')
  add = common.add_flag
  add(parser, 'job_name', default='mae-jax', help='SLURM job name.')
  add(parser, 'nodes', type=int, default=1, help='Number of nodes.')
  add(parser, 'gpus_per_node', type=int, default=8, help='GPUs per node.')
  add(parser, 'process_mode', choices=PROCESS_MODES, default='per_gpu',
      help='One process per GPU, or one per node driving all its GPUs.')
  add(parser, 'cpus_per_task', type=int, default=0, help='CPUs per task; 0: cluster default.')
  add(parser, 'mem', default='', help='Memory per node, e.g. 0 (all) or 500G.')
  add(parser, 'partition', default='', help='Partition.')
  add(parser, 'account', default='', help='Account to charge.')
  add(parser, 'qos', default='', help='Quality of service.')
  add(parser, 'time', default='', help='Time limit, e.g. 24:00:00 or 2-00:00:00.')
  add(parser, 'output', default='slurm-%x-%j.out', help='Log path (%%x name, %%j job id).')
  parser.add_argument('--sbatch_flag', '--sbatch-flag', dest='sbatch_flags', action='append',
                      default=[], help='Extra #SBATCH option, repeatable, e.g. --exclusive.')
  add(parser, 'chdir', default='', help='Repository directory on the cluster.')
  parser.add_argument('--setup', action='append', default=[],
                      help='Shell line run before srun (verbatim), repeatable, e.g. '
                      "'source .venv/bin/activate' or 'module load cuda'.")
  add(parser, 'container_image', default='', help='pyxis/enroot image for srun.')
  add(parser, 'container_mounts', default='', help='pyxis mounts, e.g. /data:/data.')
  add(parser, 'python', default='python', help='Python interpreter on the nodes.')
  add(parser, 'config', default='', help='CONFIG[:ARGS] for mae_jax.main --config.')
  add(parser, 'workdir', default='', help='Checkpoints and logs on a shared filesystem.')
  parser.add_argument('--override', dest='overrides', action='append', default=[],
                      metavar='KEY=VALUE', help='Config override, repeatable; becomes '
                      '--config.KEY=VALUE.')
  parser.add_argument('--env', action='append', default=[], metavar='NAME=VALUE',
                      help='Environment variable for the trainer, repeatable.')
  parser.add_argument('--requeue', action=argparse.BooleanOptionalAction, default=True,
                      help='Requeue after preemption and before the time limit.')
  parser.add_argument('--norequeue', dest='requeue', action='store_false',
                      help='Same as --no-requeue.')
  add(parser, 'signal_seconds', type=int, default=120,
      help='Seconds before the time limit to stop the trainer; 0: never.')
  add(parser, 'script', default='', help='Where to write the script; default '
      'workdirs/slurm/JOB_NAME.sbatch.')
  add(parser, 'dry_run', action='store_true', help='Print the script and command; run nothing.')
  return parser


def job_from_args(args: argparse.Namespace, extra_args: Sequence[str] = ()) -> SlurmJob:
  """Builds the SlurmJob from parsed flags (raises ValueError naming a bad flag)."""
  fields = {f.name for f in dataclasses.fields(SlurmJob)}
  values = {k: v for k, v in vars(args).items() if k in fields}
  return SlurmJob(**values, extra_args=tuple(extra_args))


def main(argv: Sequence[str] | None = None, runner: common.Runner | None = None) -> int:
  """CLI entry point; returns the exit status."""
  own_args, trainer_args = common.split_passthrough(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(own_args)
  try:
    job = job_from_args(args, trainer_args)
    # The trainer's config and --config.KEY flags, read here as the tasks will read them (from --chdir):
    # a typo fails now, not after the job has waited in the queue.
    common.check_job_config(job.config, job.overrides, job.extra_args,
                            job.chdir if job.chdir and os.path.isdir(job.chdir) else '.')
  except ValueError as e:
    parser.error(str(e))
  runner = runner or common.Runner(dry_run=args.dry_run)
  if not job.cpus_per_task:
    print('note: --cpus_per_task is not set: many clusters then give each task one CPU, too few to decode and '
          'augment images for a GPU; set it (e.g. --cpus_per_task=8 per GPU task)', file=sys.stderr)
  try:
    submit(job, runner)
  except common.LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
