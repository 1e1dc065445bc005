"""The shell scripts the TPU launcher runs on every worker (launch/tpu.py): setting up the code, running the trainer.

Each is one `--command=` string for `gcloud compute tpus tpu-vm ssh --worker=all`,
run from the worker's home folder, every value quoted with shlex. `job` is a
launch.tpu.TpuJob.
"""

from __future__ import annotations

import re
import shlex

from launch import common

TARBALL = 'mae-jax-code.tar.gz'  # The code as `git archive` made it, copied to the home folder.
PID_FILE = '.mae_jax_job_{}.pid'  # In the home folder, beside --remote_dir (which setup replaces).
OUT_FILE = '.mae_jax_job_{}.out'  # The trainer's output, beside its pid file (tail streams it to ssh).
VENV_PYTHON = '.venv/bin/python'  # What .ci/setup makes in --remote_dir: the default interpreter.
KEPT_VENV = '.mae_jax_venv_{}'  # Where setup keeps --remote_dir's .venv while it replaces the code.


def _name(job) -> str:
  return re.sub(r'[^A-Za-z0-9_.-]', '_', job.remote_dir)


def setup_script(job) -> str:
  """Shell command that puts the code in --remote_dir and installs it.

  Without --python, `.ci/setup` installs it into --remote_dir/.venv (Python
  3.11+); that .venv is kept aside while the code is replaced, so a rerun or a
  retry reinstalls only what changed.
  """
  q = shlex.quote
  directory = q(job.remote_dir)
  kept = q(KEPT_VENV.format(_name(job)))
  parts = [f'rm -rf {kept}', f'if [ -d {directory}/.venv ]; then mv {directory}/.venv {kept}; fi'] if not job.python \
      else []
  if job.repo_url:
    parts += [f'rm -rf {directory}',
              shlex.join(['git', 'clone', '--quiet', job.repo_url, job.remote_dir])]
    if job.git_ref and job.git_ref != 'HEAD':
      parts.append(shlex.join(['git', '-C', job.remote_dir, 'checkout', '--quiet',
                               job.git_ref]))
  else:
    parts += [f'rm -rf {directory}', f'mkdir -p {directory}',
              f'tar -xzf {q(TARBALL)} -C {directory}', f'rm -f {q(TARBALL)}']
  package = f'.[{job.pip_extras}]' if job.pip_extras else '.'
  if job.python:
    return ' && '.join(parts + [f'cd {directory}',
                                shlex.join([job.python, '-m', 'pip', 'install', '--quiet', '-e', package])])
  return ' && '.join(parts + [f'if [ -d {kept} ]; then mv {kept} {directory}/.venv; fi', f'cd {directory}',
                              'SETUP_DEMO_DATA=0 ' + shlex.join(['bash', '.ci/setup', job.pip_extras or 'tpu'])])


def trainer_args(job) -> list[str]:
  """Trainer flags beyond config and workdir; flags after `--` come last and so win."""
  # A pod's workers find each other through JAX's cluster detection; `on` makes a failure loud.
  return (['--distributed=on'] if job.num_processes > 1 else []) + list(job.extra_args)


def run_script(job) -> str:
  """Shell command run on every worker: wait for a stale copy, run the trainer, report its status.

  The trainer runs under nohup with its output in a file beside the pid file,
  which `tail` streams to the ssh session: a dropped ssh connection (a closed
  pipe, a hangup) leaves the trainer running instead of killing it at its next
  line. Its pid goes to a file so that a rerun on the same VM can stop exactly
  that process first: SIGTERM, then wait until it is gone (it may be saving a
  checkpoint into the same workdir), SIGKILL after --stale_trainer_timeout
  seconds. A SIGTERM to this script (a maintenance event stops every process)
  does not end it before the trainer: it waits for the trainer's save and
  status. The exit status is printed as EXIT_MARKER=STATUS, plus the success
  marker for 0.
  """
  q = shlex.quote
  env = [('PYTHONUNBUFFERED', '1'), *common.parse_env(job.env)]
  trainer = shlex.join(['nohup', *common.job_argv(job.python or VENV_PYTHON, job.config, job.workdir,
                                                  job.overrides, trainer_args(job), env)])
  pid_file = '"$pid_file"'
  timeout = int(job.stale_trainer_timeout)
  return '; '.join([
      'pid_file="$PWD"/' + q(PID_FILE.format(_name(job))),
      'out_file="$PWD"/' + q(OUT_FILE.format(_name(job))),
      f'cd {q(job.remote_dir)} || exit 1',
      # Alive and still a trainer: not a zombie (empty cmdline), not a reused pid.
      "alive() { tr '\\000' ' ' < \"/proc/$1/cmdline\" 2>/dev/null | grep -q -F mae_jax.main; }",
      f'old=$(cat {pid_file} 2>/dev/null)',
      'if [ -n "$old" ] && alive "$old"; then '
      f'echo "# stopping the previous trainer (pid $old); waiting up to {timeout}s for it to exit"; '
      'kill -TERM "$old" 2>/dev/null; waited=0; '
      f'while alive "$old" && [ "$waited" -lt {timeout} ]; do sleep 1; waited=$((waited + 1)); done; '
      'if alive "$old"; then '
      f'echo "# the previous trainer is still running after {timeout}s; killing it"; '
      'kill -KILL "$old" 2>/dev/null; waited=0; '
      'while alive "$old" && [ "$waited" -lt 30 ]; do sleep 1; waited=$((waited + 1)); done; fi; fi',
      # A trap (not an ignore, which the trainer would inherit): `wait` returns early, the loop waits again.
      "trap 'echo \"# SIGTERM: waiting for the trainer to save and exit\"' TERM",
      # The file exists before tail opens it (else a trainer that has not opened it yet leaves tail nothing).
      ': > "$out_file"',
      f'{trainer} >> "$out_file" 2>&1 < /dev/null & pid=$!',
      f'echo "$pid" > {pid_file}',
      'tail -n +1 -f --pid="$pid" "$out_file" & tail_pid=$!',
      'while kill -0 "$pid" 2>/dev/null; do wait "$pid"; done',
      'wait "$pid"',
      'status=$?',
      'wait "$tail_pid"',
      # Only this trainer's pid: an old script waking up late must not remove a newer trainer's.
      f'if [ "$(cat {pid_file} 2>/dev/null)" = "$pid" ]; then rm -f {pid_file}; fi',
      f'echo {common.EXIT_MARKER}"$status"',
      f'if [ "$status" -eq 0 ]; then echo {common.SUCCESS_MARKER}; fi',
      'exit "$status"',
  ])
