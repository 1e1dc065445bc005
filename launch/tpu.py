r"""Launches MAE training on Cloud TPU VMs, single host, pod or multi-slice.

Steps, in order (pick a subset with --steps):
  create  `gcloud compute tpus tpu-vm create`, or with --queued / --num_slices>1
          `gcloud compute tpus queued-resources create` and wait until ACTIVE. A TPU
          of that name left by an earlier launch (a rerun of the command) is used
          once it is up; a lost one, or one being deleted, is created again; one
          of another accelerator type stops the launch (and is not deleted).
  setup   Copy the code to every worker of every slice and install it with
          `.ci/setup tpu` (a .venv with Python 3.11+, kept across setups; with
          --python, `pip install -e .[tpu]` into that interpreter): a `git archive`
          tarball of --source_dir at --git_ref sent with `tpu-vm scp --worker=all`
          (committed files only), or with --repo_url a `git clone` on each worker.
          The commands run on the workers are in launch/worker_scripts.py.
  run     `gcloud compute tpus tpu-vm ssh NODE --worker=all --command=...` on each
          slice node at once, streaming the logs. The job counts as done when every
          worker prints a success marker after the trainer exits with status 0.
          A trainer that halted on non-finite losses (exit status 65), or stopped on
          a setting or flag to fix (78, 2), ends the launch at once: a rerun would fail
          again. (Before `create`, the config and its --override / --config.KEY flags
          are read here as the trainer will, and the config file must be committed
          at --git_ref.) Otherwise the TPU state is
          read with `describe`; a PREEMPTED/TERMINATED VM (or a SUSPENDED/FAILED
          queued resource) is deleted, recreated and set up again, one being
          repaired or restarted is waited for, a healthy one reruns the job. A
          failed run, re-create or setup is tried again after a backoff
          (--retry_backoff_seconds, doubling; a preempted run at once). Reruns, re-creates and
          setups together take at most --max_retries retries; the trainer resumes
          from the newest checkpoint in --workdir. A trainer left running by an
          earlier attempt on the same VM gets SIGTERM and is waited for (it may be
          saving) before the new one starts; after --stale_trainer_timeout seconds
          it is killed. On a multi-host slice the trainer gets --distributed=on.
          Workers run it under nohup (launch/worker_scripts.py).
  delete  Delete the TPU VM or queued resource (also after a failure, Ctrl-C,
          SIGTERM or SIGHUP); --keep skips it.

Multi-slice jobs use a queued resource with `--node-count`; its nodes are named
NODE_PREFIX-0 ... NODE_PREFIX-(N-1). The TPU runtime sets the MEGASCALE_*
variables on queued-resource slices and jax picks them up; use --env for extras.

Exit status: 0 when the job finished; 65 when the trainer halted on non-finite
losses (not retried); 75 when the retries ran out while the TPU kept being
preempted (rerun the same command later to resume); 130 when interrupted (Ctrl-C,
SIGTERM, SIGHUP); 1 for other failures (a trainer's 78 included); 2 for usage errors.

Every value is passed as one argv element and the remote `--command=` string is
built with `shlex.quote` around every piece, so config values may contain spaces,
quotes, `$(...)` or `;`. --dry_run (or --dry-run) prints every command, one per
line, in the order it would run, and runs nothing.

Examples:

  # Single host, preview the commands.
  python -m launch.tpu --tpu_name=mae-v4-8 --zone=us-central2-b \
    --accelerator_type=v4-8 --config=configs/mae_pretrain.py:variant=B/16 \
    --workdir=gs://my-bucket/mae/base --dry_run

  # A v4-128 pod (16 workers) on spot capacity, with config overrides.
  python launch/tpu.py --tpu_name=mae-v4-128 --zone=us-central2-b --project=my-proj \
    --accelerator_type=v4-128 --spot --config=configs/mae_pretrain.py:variant=L/16 \
    --workdir=gs://my-bucket/mae/l16 --override=optim.base_lr=1.5e-4 --max_retries=10

  # Two v5e-256 slices through a queued resource; flags after `--` go to the trainer.
  python -m launch.tpu --tpu_name=mae-ms --zone=us-west4-a --accelerator_type=v5litepod-256 \
    --num_slices=2 --config=configs/mae_pretrain.py:variant=L/16 --workdir=gs://my-bucket/mae/ms \
    -- --config.num_epochs=800

Python API (what the CLI calls):

  from launch import common, tpu
  job = tpu.TpuJob(tpu_name='mae-v4-8', zone='us-central2-b', accelerator_type='v4-8',
                   config='configs/mae_pretrain.py:variant=B/16', workdir='gs://my-bucket/mae/base')
  tpu.launch(job, common.Runner(dry_run=True))
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
  # Run as `python launch/tpu.py`: make the repository root importable.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common, worker_scripts  # pylint: disable=g-import-not-at-top
from launch.gcloud_commands import (  # noqa: F401  # pylint: disable=g-import-not-at-top  # Part of this API.
  accelerator_type_command,
  archive_command,
  create_command,
  delete_command,
  describe_command,
  local_tarball,
  scp_command,
  ssh_command,
)
from mae_jax import accelerators  # pylint: disable=g-import-not-at-top  # the TPU table; needs no jax

STEPS = ('create', 'setup', 'run', 'delete')

# TPU VM states after which the VM has to be recreated.
_VM_LOST_STATES = ('PREEMPTED', 'TERMINATED', 'STOPPED', 'STOPPING', '')
# Queued-resource states after which the resource has to be recreated.
_QR_LOST_STATES = ('SUSPENDING', 'SUSPENDED', 'FAILED', '')
_QR_WAITING_STATES = ('ACCEPTED', 'WAITING_FOR_RESOURCES', 'PROVISIONING', 'CREATING')
_VM_WAITING_STATES = ('CREATING', 'STARTING', 'RESTARTING', 'REPAIRING')
_MAX_REPAIR_WAIT_SECONDS = 1800.0  # A TPU still repairing or restarting after a failed run is then re-created.

# The longest wait between two failed re-creates or setups.
_MAX_BACKOFF_SECONDS = 900.0

_NAME = re.compile(r'[a-z]([-a-z0-9]{0,52}[a-z0-9])?')
_ZONE = re.compile(r'[a-z]+-[a-z]+[0-9]+-[a-z]')


@dataclasses.dataclass(frozen=True)
class TpuJob:
  """Everything needed to launch one job; field names match the CLI flags."""
  tpu_name: str
  zone: str
  accelerator_type: str
  config: str = ''
  workdir: str = ''
  project: str = ''
  runtime_version: str = ''
  num_slices: int = 1
  queued: bool = False
  node_prefix: str = ''
  spot: bool = False
  preemptible: bool = False
  reserved: bool = False
  create_flags: tuple[str, ...] = ()
  source_dir: str = '.'
  git_ref: str = 'HEAD'
  repo_url: str = ''
  remote_dir: str = 'mae-jax'
  pip_extras: str = 'tpu'
  python: str = ''  # '': the .venv that .ci/setup makes (Python 3.11+ even where python3 is 3.10).
  overrides: tuple[str, ...] = ()
  env: tuple[str, ...] = ()
  extra_args: tuple[str, ...] = ()
  max_retries: int = 3
  poll_seconds: float = 60.0
  retry_backoff_seconds: float = 30.0
  stale_trainer_timeout: int = 600

  def __post_init__(self):
    for name in ('create_flags', 'overrides', 'env', 'extra_args'):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if not _NAME.fullmatch(self.tpu_name):
      raise ValueError(f'--tpu_name={self.tpu_name!r}: must be 1-54 lowercase letters, digits '
                       'or dashes, starting with a letter and not ending with a dash')
    if not _ZONE.fullmatch(self.zone):
      raise ValueError(f'--zone={self.zone!r}: expected a zone such as us-central2-b')
    accelerators.parse_accelerator_type(self.accelerator_type)
    if self.num_slices < 1:
      raise ValueError(f'--num_slices={self.num_slices}: must be >= 1')
    if self.node_prefix and not _NAME.fullmatch(self.node_prefix):
      raise ValueError(f'--node_prefix={self.node_prefix!r}: must look like a TPU name, '
                       'e.g. mae-slice')
    if self.spot and self.preemptible:
      raise ValueError('--spot and --preemptible: pick one (spot is the newer model)')
    if self.preemptible and self.use_queued_resource:
      raise ValueError('--preemptible: not available for queued resources; use --spot')
    if self.max_retries < 0:
      raise ValueError(f'--max_retries={self.max_retries}: must be >= 0')
    if self.poll_seconds <= 0:
      raise ValueError(f'--poll_seconds={self.poll_seconds}: must be > 0')
    if self.retry_backoff_seconds < 0:
      raise ValueError(f'--retry_backoff_seconds={self.retry_backoff_seconds}: must be >= 0')
    if self.stale_trainer_timeout < 0:
      raise ValueError(f'--stale_trainer_timeout={self.stale_trainer_timeout}: must be >= 0 (seconds)')
    remote = os.path.normpath(self.remote_dir)
    if (not self.remote_dir or os.path.isabs(self.remote_dir) or remote == '.'
        or remote.startswith('..') or self.remote_dir.startswith('~')):
      raise ValueError(f'--remote_dir={self.remote_dir!r}: must be a path relative to the '
                       'home directory on the workers, e.g. mae-jax (setup replaces it)')
    if self.workdir and not (self.workdir.startswith(('gs://', '/'))):
      raise ValueError(f'--workdir={self.workdir!r}: must be gs://... (shared by all workers) '
                       'or an absolute path; a relative one would land in --remote_dir, '
                       'which setup replaces')
    for flag in self.create_flags:
      if not flag.startswith('--'):
        raise ValueError(f'--create_flag={flag!r}: must be a gcloud flag such as '
                         '--network=my-net')
    common.parse_env(self.env)
    common.config_override_args(self.overrides)

  @property
  def use_queued_resource(self) -> bool:
    return self.queued or self.num_slices > 1

  @property
  def slice_type(self) -> accelerators.AcceleratorType:
    """The parsed --accelerator_type: chip, chips, hosts and gcloud's spelling."""
    return accelerators.parse_accelerator_type(self.accelerator_type)

  @property
  def workers_per_slice(self) -> int:
    return self.slice_type.num_hosts

  @property
  def num_processes(self) -> int:
    """Trainer processes: one per worker of every slice."""
    return self.workers_per_slice * self.num_slices

  @property
  def node_names(self) -> list[str]:
    """Names of the TPU VM nodes (one per slice)."""
    if self.num_slices == 1:
      return [self.tpu_name]
    prefix = self.node_prefix or self.tpu_name
    return [f'{prefix}-{i}' for i in range(self.num_slices)]

  @property
  def resolved_runtime_version(self) -> str:
    return self.runtime_version or self.slice_type.chip.runtime_version


class ForeignTpu(common.LaunchError):
  """A TPU of the job's name is not the slice asked for: it is left alone, not deleted."""


def _check_existing_type(job: TpuJob, runner: common.Runner) -> None:
  """An existing TPU of that name is used only if it is the slice asked for."""
  returncode, found = runner.capture(accelerator_type_command(job), dry_run_stdout=job.slice_type.name)
  wanted = job.slice_type.name
  if returncode or not found:
    runner.echo(f'# could not read the accelerator type of {job.tpu_name}; assuming {wanted}')
    return
  try:
    same = accelerators.parse_accelerator_type(found).name == wanted
  except ValueError:
    same = found == wanted
  if not same:
    raise ForeignTpu(
        f'{job.tpu_name} already exists as a {found}, not the --accelerator_type={job.accelerator_type} '
        f'({wanted}) asked for: choose another --tpu_name, or delete it first: {shlex.join(delete_command(job))}')


def _create(job: TpuJob, runner: common.Runner, reuse: bool = False) -> None:
  """Creates the TPU and waits until it is up (READY; a queued resource ACTIVE).

  With `reuse` (the launch's own create: a rerun of the command), a TPU of that
  name is used once it is up, a lost one is deleted and created again, and one
  being deleted is waited for, then created again.
  """
  queued = job.use_queued_resource
  ready, lost = ('ACTIVE', _QR_LOST_STATES) if queued else ('READY', _VM_LOST_STATES)
  waiting = _QR_WAITING_STATES if queued else _VM_WAITING_STATES
  created = runner.run(create_command(job), check=not reuse) == 0
  if created and not queued:
    return  # `tpu-vm create` returns once the VM is READY.
  deleted = False  # Seen DELETING: create it again once it is gone.
  checked = False  # The accelerator type of one that existed before this launch.
  while True:
    returncode, state = runner.capture(describe_command(job), dry_run_stdout=ready)
    state = '' if returncode else state
    if state and state != 'DELETING' and not created and not checked:
      _check_existing_type(job, runner)  # Before it is waited for, used, or deleted and created again.
      checked = True
    if state == ready:
      if not created:
        runner.echo(f'# {job.tpu_name} already exists ({state}): using it (an earlier launch of this job?)')
      return
    if state in waiting or (state == 'DELETING' and not created):
      deleted = deleted or state == 'DELETING'
      runner.echo(f'# {job.tpu_name} is {state}; waiting {job.poll_seconds:g}s')
      runner.sleep(job.poll_seconds)
      continue
    replace = bool(state) and state in lost or not state and deleted  # A lost one, or one deleted meanwhile.
    if created or not replace:
      what = f'{"queued resource " if queued else ""}{job.tpu_name} is {state or "missing"}'
      raise common.LaunchError(f'{what}; see `gcloud compute tpus {"queued-resources" if queued else "tpu-vm"} '
                               'describe`' if created else f'creating {job.tpu_name} failed and {what}')
    if state:
      runner.echo(f'# {job.tpu_name} exists but is {state}: deleting and creating it again')
      runner.run(delete_command(job), check=False)
    created = runner.run(create_command(job)) == 0
    if not queued:
      return


def _check_all(results: Sequence[common.StreamResult], nodes: Sequence[str], what: str) -> None:
  failed = [f'{n} (exit {r.returncode})' for n, r in zip(nodes, results) if r.returncode]
  if failed:
    raise common.LaunchError(f'{what} failed on {", ".join(failed)}')


def _setup(job: TpuJob, runner: common.Runner) -> None:
  nodes = job.node_names
  if not job.repo_url:
    runner.run(archive_command(job))
    _check_all(runner.stream([scp_command(job, n) for n in nodes], labels=nodes),
               nodes, 'copying the code')
  script = worker_scripts.setup_script(job)
  _check_all(runner.stream([ssh_command(job, n, script) for n in nodes], labels=nodes),
             nodes, 'installing the code')


def _run_once(job: TpuJob, runner: common.Runner) -> str:
  """Runs the job on every node: 'done', 'nonfinite', 'config', 'preempted' (a trainer exited 75) or 'failed'."""
  nodes = job.node_names
  script = worker_scripts.run_script(job)
  results = runner.stream([ssh_command(job, n, script) for n in nodes], labels=nodes,
                          dry_run_markers=job.workers_per_slice)
  ok = all(r.returncode == 0 and r.marker_count >= job.workers_per_slice for r in results)
  codes = {code for r in results for code in r.exit_codes}
  if ok and not codes - {0}:
    return 'done'
  for node, result in zip(nodes, results):
    reported = ', '.join(str(c) for c in result.exit_codes) or 'none'
    runner.echo(f'# {node}: exit status {result.returncode}, {result.marker_count} of '
                f'{job.workers_per_slice} workers reported success (trainer exit statuses: {reported})')
  if common.NONFINITE_EXIT_CODE in codes:
    return 'nonfinite'
  if common.CONFIG_EXIT_CODE in codes or common.USAGE_EXIT_CODE in codes:
    return 'config'
  return 'preempted' if common.PREEMPTED_EXIT_CODE in codes else 'failed'


def _needs_recreate(job: TpuJob, runner: common.Runner) -> bool:
  """Whether the TPU is lost (delete and create it again); one being repaired or restarted is waited for."""
  lost = _QR_LOST_STATES if job.use_queued_resource else _VM_LOST_STATES
  waiting = _QR_WAITING_STATES if job.use_queued_resource else _VM_WAITING_STATES
  waited = 0.0
  while True:
    returncode, state = runner.capture(describe_command(job), dry_run_stdout='READY')
    if returncode != 0:
      state = ''  # Not found: deleted by the preemption.
    runner.echo(f'# {job.tpu_name} state: {state or "missing"}')
    if state not in waiting:  # A rerun on a TPU being repaired would fail at once and use up a retry.
      return state in lost
    if waited >= _MAX_REPAIR_WAIT_SECONDS:
      return True  # Stuck: created again.
    runner.echo(f'# waiting {job.poll_seconds:g}s until it is up again')
    runner.sleep(job.poll_seconds)
    waited += job.poll_seconds


def _run_with_retries(job: TpuJob, runner: common.Runner) -> None:
  """Runs the job until it finishes, within --max_retries retries.

  Each retry is one of: a rerun on the healthy TPU, a re-create (delete, create,
  setup) of a lost one, or another try of a re-create or setup that failed (no
  spot capacity, a pip or ssh hiccup), after a backoff that doubles. Raises
  common.NonFiniteHalt at once when a trainer halted on non-finite losses, and
  when the retries run out common.Preempted (the last setback was a
  preemption) or common.LaunchError.
  """
  retries, failures, preempted = 0, 0, False
  todo = 'run'  # What the next attempt starts with: 'recreate', 'setup' or 'run'.
  while True:
    try:
      if todo == 'recreate':
        runner.run(delete_command(job), check=False)
        _create(job, runner)
        todo = 'setup'
      if todo == 'setup':
        _setup(job, runner)
        todo, failures = 'run', 0
      outcome = _run_once(job, runner)
    except common.LaunchError as e:
      failures += 1
      what = f'{"re-create" if todo == "recreate" else todo} failed: {e}'
      if todo == 'setup':
        preempted = _needs_recreate(job, runner)  # Lost again while being set up?
        todo = 'recreate' if preempted else 'setup'
      elif todo == 'run':
        preempted = False
    else:
      if outcome == 'done':
        return
      if outcome == 'config':
        raise common.LaunchError(f'the trainer stopped on a setting, flag or file to fix (exit status '
                                 f'{common.CONFIG_EXIT_CODE} or {common.USAGE_EXIT_CODE}, its error above); '
                                 'not retrying')
      if outcome == 'nonfinite':
        raise common.NonFiniteHalt(
            f'the trainer halted on non-finite losses (exit status {common.NONFINITE_EXIT_CODE}); not retrying: '
            f'a rerun would diverge again. Lower optim.base_lr or set optim.grad_clip_norm; the last good '
            f'checkpoint is in {job.workdir}')
      lost = _needs_recreate(job, runner)
      preempted = lost or outcome == 'preempted'
      what = (f'{job.tpu_name} was lost (preempted?)' if lost else 'the trainer saved and stopped (exit status '
              f'{common.PREEMPTED_EXIT_CODE}: preempted?)' if outcome == 'preempted' else 'the job failed')
      todo = 'recreate' if lost else 'run'
      failures = 0 if preempted else failures + 1  # A failed run is rerun after the backoff, not at once.
    retries += 1
    if retries > job.max_retries:
      error = common.Preempted if preempted else common.LaunchError
      raise error(f'the job did not finish after {job.max_retries} retries (--max_retries); last: {what}'
                  + ('; rerun the same command to resume from the newest checkpoint' if preempted else ''))
    action = {'recreate': 'recreating the TPU', 'setup': 'setting it up again', 'run': 'rerunning the job'}[todo]
    runner.echo(f'# {what}; {action}, retry {retries}/{job.max_retries}')
    if failures:
      backoff = min(job.retry_backoff_seconds * 2 ** (failures - 1), _MAX_BACKOFF_SECONDS)
      runner.echo(f'# waiting {backoff:g}s first (--retry_backoff_seconds)')
      runner.sleep(backoff)


def launch(job: TpuJob, runner: common.Runner, steps: Sequence[str] = STEPS) -> None:
  """Runs the chosen steps; raises common.LaunchError when the job cannot finish."""
  unknown = [s for s in steps if s not in STEPS]
  if unknown:
    raise ValueError(f'--steps={",".join(steps)}: unknown step(s) {", ".join(unknown)}; '
                     f'choose from {",".join(STEPS)}')
  if 'run' in steps:  # Fail before creating: a typo in the config or its flags would fail on every worker.
    common.job_argv(job.python or worker_scripts.VENV_PYTHON, job.config, job.workdir)
    common.check_job_config(job.config, job.overrides, job.extra_args, job.source_dir,
                            None if job.repo_url else job.git_ref)
  try:
    if 'create' in steps:
      _create(job, runner, reuse=True)  # Rerunning the command resumes on the TPU it left.
    if 'setup' in steps:
      _setup(job, runner)
    if 'run' in steps:
      _run_with_retries(job, runner)
  except BaseException as e:
    # Failed or interrupted: still release the TPU, then report the first error.
    if 'delete' in steps and not isinstance(e, ForeignTpu) and runner.run(delete_command(job), check=False):
      runner.echo(f'# WARNING: deleting {job.tpu_name} failed; delete it by hand: '
                  f'{shlex.join(delete_command(job))}')
    raise
  if 'delete' in steps:
    runner.run(delete_command(job))


def build_parser() -> argparse.ArgumentParser:
  """The CLI flags; every flag also accepts its dashed spelling (--dry-run)."""
  parser = argparse.ArgumentParser(
      prog='python -m launch.tpu', description=__doc__.split('\n\n')[0],
      epilog='Flags after a bare `--` are passed to mae_jax.main unchanged.')
  add = common.add_flag
  add(parser, 'tpu_name', required=True, help='TPU VM or queued-resource name.')
  add(parser, 'zone', required=True, help='e.g. us-central2-b.')
  add(parser, 'accelerator_type', required=True,
      help='Slice type, e.g. v4-8, v4-128, v5p-256, v5litepod-256 (or v5e-256), v6e-64.')
  add(parser, 'project', default='', help='GCP project; default: gcloud config.')
  add(parser, 'runtime_version', default='',
      help='TPU software version; default per generation, e.g. tpu-ubuntu2204-base for v4.')
  add(parser, 'num_slices', type=int, default=1,
      help='Slices; >1 creates a multi-slice queued resource (--node-count).')
  add(parser, 'queued', action='store_true',
      help='Create a queued resource even for one slice.')
  add(parser, 'node_prefix', default='', help='Multi-slice node name prefix; default --tpu_name.')
  add(parser, 'spot', action='store_true', help='Spot capacity (may be preempted).')
  add(parser, 'preemptible', action='store_true', help='Preemptible TPU VM (older model).')
  add(parser, 'reserved', action='store_true', help='Use reserved capacity.')
  parser.add_argument('--create_flag', '--create-flag', dest='create_flags', action='append',
                      default=[], help='Extra gcloud create flag, repeatable, e.g. '
                      '--create_flag=--network=my-net.')
  add(parser, 'source_dir', default='.', help='Local git repository to copy.')
  add(parser, 'git_ref', default='HEAD', help='Commit, branch or tag to copy or check out.')
  add(parser, 'repo_url', default='',
      help='git clone this URL on the workers instead of copying --source_dir.')
  add(parser, 'remote_dir', default='mae-jax', help='Code directory on the workers (replaced).')
  add(parser, 'pip_extras', default='tpu', help='Extras for `pip install -e .[EXTRAS]`.')
  add(parser, 'python', default='', help='Python on the workers, installed into as it is; default: a .venv '
      'that .ci/setup makes in --remote_dir (Python 3.11+; TPU VM images have 3.10).')
  add(parser, 'config', default='', help='CONFIG[:ARGS] for mae_jax.main --config.')
  add(parser, 'workdir', default='', help='Checkpoints and logs; gs://... for pods.')
  parser.add_argument('--override', dest='overrides', action='append', default=[],
                      metavar='KEY=VALUE', help='Config override, repeatable; becomes '
                      '--config.KEY=VALUE.')
  parser.add_argument('--env', dest='env', action='append', default=[], metavar='NAME=VALUE',
                      help='Environment variable for the trainer, repeatable.')
  add(parser, 'max_retries', type=int, default=3,
      help='Retries (reruns, re-creates, setups) after failure or preemption before giving up.')
  add(parser, 'poll_seconds', type=float, default=60.0,
      help='Seconds between state checks while a queued resource waits.')
  add(parser, 'retry_backoff_seconds', type=float, default=30.0,
      help='Wait before trying a failed re-create or setup again; doubles per failure in a row.')
  add(parser, 'stale_trainer_timeout', type=int, default=600,
      help='Seconds a trainer left by an earlier attempt gets to save and exit before it is killed.')
  add(parser, 'steps', default=','.join(STEPS),
      help=f'Comma-separated subset of {",".join(STEPS)}.')
  add(parser, 'keep', action='store_true', help='Do not delete the TPU at the end.')
  add(parser, 'dry_run', action='store_true', help='Print the commands; run nothing.')
  return parser


def job_from_args(args: argparse.Namespace, extra_args: Sequence[str] = ()) -> TpuJob:
  """Builds the TpuJob from parsed flags (raises ValueError naming a bad flag)."""
  fields = {f.name for f in dataclasses.fields(TpuJob)}
  values = {k: v for k, v in vars(args).items() if k in fields}
  return TpuJob(**values, extra_args=tuple(extra_args))


def parse_steps(steps: str, keep: bool = False) -> list[str]:
  chosen = [s.strip() for s in steps.split(',') if s.strip()]
  unknown = [s for s in chosen if s not in STEPS]
  if not chosen or unknown:
    raise ValueError(f'--steps={steps!r}: choose a comma-separated subset of {",".join(STEPS)}')
  if keep:
    chosen = [s for s in chosen if s != 'delete']
  return chosen


def main(argv: Sequence[str] | None = None, runner: common.Runner | None = None) -> int:
  """CLI entry point; returns the exit status."""
  own_args, trainer_args = common.split_passthrough(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  args = parser.parse_args(own_args)
  try:
    job = job_from_args(args, trainer_args)
    steps = parse_steps(args.steps, args.keep)
  except ValueError as e:
    parser.error(str(e))
  runner = runner or common.Runner(dry_run=args.dry_run)
  try:
    with common.stop_signals_interrupt():
      launch(job, runner, steps)
  except ValueError as e:
    parser.error(str(e))
  except common.LaunchError as e:
    print(f'error: {e}', file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt as e:
    print(f'error: interrupted ({e or "Ctrl-C"})', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
