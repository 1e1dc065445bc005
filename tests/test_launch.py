"""Tests for launch/: TPU and SLURM launchers, driven through their CLI entry points.

Nothing here runs gcloud or sbatch: dry-run Runners print and record commands,
and ScriptedRunner is a real-mode Runner whose process-starting methods answer
from a script, so the retry and preemption logic runs exactly as in production.
"""

import io
import json
import os
import pathlib
import shlex
import signal
import stat
import subprocess
import sys
import time

import pytest

from launch import common, slurm, tpu, worker_scripts

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZONE = 'us-central2-b'
# Spaces, both quote kinds, command substitution and a command separator.
NASTY = 'it\'s a "test" $(touch {pwned}); echo `id` & exit 7'


def tpu_argv(*extra, **flags):
  defaults = {'tpu_name': 'mae-test', 'zone': ZONE, 'accelerator_type': 'v4-8',
              'config': 'configs/mae_pretrain.py:variant=B/16', 'workdir': 'gs://bucket/mae/run1'}
  defaults.update(flags)
  return [f'--{k}' if v is True else f'--{k}={v}' for k, v in defaults.items()] + list(extra)


def dry_run_tpu(*extra, **flags):
  runner = common.Runner(dry_run=True, out=io.StringIO())
  assert tpu.main(tpu_argv(*extra, **flags), runner=runner) == 0
  return runner


def printed_lines(runner):
  return runner.out.getvalue().splitlines()


def kinds(runner):
  """A short name per recorded command: ('tpu-vm', 'ssh'), ('git', 'archive'), ..."""
  out = []
  for c in runner.commands:
    if c[0] == 'gcloud':
      out.append((c[3], c[4]))
    else:
      out.append((c[0], c[3] if c[0] == 'git' else c[1]))
  return out


def remote_command(argv):
  (command,) = [a for a in argv if a.startswith('--command=')]
  return command[len('--command='):]


def is_run(argv):
  return argv[0] == 'gcloud' and argv[4] == 'ssh' and ' -m mae_jax.main ' in remote_command(argv)


def trainer_words(argv):
  """The trainer's argv inside a run command's remote script."""
  words = shlex.split(remote_command(argv))
  start = words.index('mae_jax.main') - 2
  return words[start:words.index('>>', start)]  # Its output goes to a file (`tail` streams it).


class ScriptedRunner(common.Runner):
  """A real-mode Runner that records commands and answers from a script.

  Args:
    states: stdout of successive `describe` calls.
    job_results: for each run of the job, one StreamResult per node.
    failures: {'create' | 'setup': numbers}: which of those commands fail, counting from 1
      (the first create and setup are the launch's own; re-creates follow).
  """

  def __init__(self, states=(), job_results=(), failures=None, existing_type='v4-8'):
    super().__init__(dry_run=False, out=io.StringIO())
    self.states = list(states)
    self.existing_type = existing_type  # What describe says an existing TPU is.
    self.job_results = list(job_results)
    self.failures = dict(failures or {})
    self.seen = {'create': 0, 'setup': 0}
    self.sleeps = []

  def _fails(self, what):
    self.seen[what] += 1
    return self.seen[what] in self.failures.get(what, ())

  def sleep(self, seconds):
    self.sleeps.append(seconds)

  def _call(self, command):
    return 1 if command[4:5] == ('create',) and self._fails('create') else 0

  def _call_capture(self, command):
    if any('acceleratorType' in part for part in command):
      return 0, self.existing_type
    return 0, self.states.pop(0)

  def _call_stream(self, commands, labels, marker):
    if is_run(commands[0]):
      return self.job_results.pop(0)
    failed = commands[0][4] == 'ssh' and self._fails('setup')
    return [common.StreamResult(1 if failed else 0, 0) for _ in commands]


# TPU: accelerator types (hosts per slice: test_accelerators.py).


def test_accelerator_type_is_sent_in_gclouds_spelling():
  # v5e-16 is how aot names the slice; gcloud only knows v5litepod-16.
  runner = ScriptedRunner(states=['READY'], job_results=[[common.StreamResult(0, 3)],
                                                         [common.StreamResult(0, 4)]])
  assert tpu.main(tpu_argv(accelerator_type='v5e-16'), runner=runner) == 0
  create = runner.commands[0]
  assert '--accelerator-type=v5litepod-16' in create
  assert '--version=v2-alpha-tpuv5-lite' in create
  assert '3 of 4 workers' in runner.out.getvalue()  # a 16-chip v5e slice has 4 hosts


# TPU: dry-run command sequences.


def test_single_host_dry_run_prints_every_command_in_order():
  runner = dry_run_tpu('--dry_run', project='my-proj', spot=True)
  lines = printed_lines(runner)
  # One line per command, and each line parses back to exactly that argv.
  assert [tuple(shlex.split(line)) for line in lines] == runner.commands
  assert kinds(runner) == [('tpu-vm', 'create'), ('git', 'archive'), ('tpu-vm', 'scp'),
                           ('tpu-vm', 'ssh'), ('tpu-vm', 'ssh'), ('tpu-vm', 'delete')]
  assert lines[0] == ('gcloud compute tpus tpu-vm create mae-test --zone=us-central2-b '
                      '--project=my-proj --accelerator-type=v4-8 '
                      '--version=tpu-ubuntu2204-base --spot')
  assert lines[-1] == ('gcloud compute tpus tpu-vm delete mae-test --zone=us-central2-b '
                       '--project=my-proj --quiet')
  scp, setup, run = runner.commands[2:5]
  assert '--worker=all' in scp and scp[-4].endswith('.tar.gz')
  assert remote_command(setup).endswith('&& cd mae-jax && SETUP_DEMO_DATA=0 bash .ci/setup tpu')
  assert trainer_words(run)[:3] == ['.venv/bin/python', '-m', 'mae_jax.main']  # The venv .ci/setup made.
  assert "pip install --quiet -e '.[tpu]'" in remote_command(dry_run_tpu('--steps=setup', python='python3').commands[2])
  assert remote_command(run).count(' -m mae_jax.main ') == 1
  assert '--config=configs/mae_pretrain.py:variant=B/16' in shlex.split(remote_command(run))


def test_dash_spelling_of_flags_is_accepted():
  runner = common.Runner(dry_run=True, out=io.StringIO())
  argv = ['--tpu-name=mae-test', f'--zone={ZONE}', '--accelerator-type=v4-8',
          '--config=configs/test.py', '--workdir=gs://b/w', '--max-retries=1', '--dry-run']
  assert tpu.main(argv, runner=runner) == 0
  assert runner.commands[0][:6] == ('gcloud', 'compute', 'tpus', 'tpu-vm', 'create', 'mae-test')


def test_pod_runs_on_all_16_workers():
  runner = dry_run_tpu(accelerator_type='v4-128')
  ssh = [c for c in runner.commands if c[4] == 'ssh']
  assert len(ssh) == 2  # setup and run, each one command covering every worker.
  assert all('--worker=all' in c and c[5] == 'mae-test' for c in ssh)
  assert '--accelerator-type=v4-128' in runner.commands[0]


def test_pod_reruns_when_a_worker_did_not_report_success():
  # Exit status 0 but only 15 of 16 markers: the job is not done.
  runner = ScriptedRunner(states=['READY'], job_results=[
      [common.StreamResult(0, 15)], [common.StreamResult(0, 16)]])
  assert tpu.main(tpu_argv(accelerator_type='v4-128'), runner=runner) == 0
  assert kinds(runner) == [('tpu-vm', 'create'), ('git', 'archive'), ('tpu-vm', 'scp'),
                           ('tpu-vm', 'ssh'), ('tpu-vm', 'ssh'), ('tpu-vm', 'describe'),
                           ('tpu-vm', 'ssh'), ('tpu-vm', 'delete')]
  assert '15 of 16 workers' in runner.out.getvalue()


def test_multislice_uses_queued_resource_and_runs_every_node():
  runner = dry_run_tpu(tpu_name='mae-ms', accelerator_type='v5litepod-256', num_slices=2,
                       project='my-proj')
  create, describe = runner.commands[:2]
  assert create == ('gcloud', 'compute', 'tpus', 'queued-resources', 'create', 'mae-ms',
                    f'--zone={ZONE}', '--project=my-proj',
                    '--accelerator-type=v5litepod-256',
                    '--runtime-version=v2-alpha-tpuv5-lite', '--node-count=2',
                    '--node-prefix=mae-ms')
  assert describe[3:5] == ('queued-resources', 'describe')
  assert '--format=value(state.state)' in describe
  assert kinds(runner)[2:] == [('git', 'archive')] + [('tpu-vm', 'scp')] * 2 + [
      ('tpu-vm', 'ssh')] * 4 + [('queued-resources', 'delete')]
  runs = [c for c in runner.commands if is_run(c)]
  assert [c[5] for c in runs] == ['mae-ms-0', 'mae-ms-1']
  assert all('--worker=all' in c for c in runs)
  assert runner.commands[-1] == ('gcloud', 'compute', 'tpus', 'queued-resources', 'delete',
                                 'mae-ms', f'--zone={ZONE}', '--project=my-proj', '--force',
                                 '--quiet')


def test_single_slice_queued_resource_uses_node_id():
  runner = dry_run_tpu('--queued', '--spot', '--steps=create')
  assert kinds(runner) == [('queued-resources', 'create'), ('queued-resources', 'describe')]
  assert '--node-id=mae-test' in runner.commands[0]
  assert not any(a.startswith('--node-count') for a in runner.commands[0])


@pytest.mark.parametrize('steps, expected', [
    ('create', [('tpu-vm', 'create')]),
    ('setup', [('git', 'archive'), ('tpu-vm', 'scp'), ('tpu-vm', 'ssh')]),
    ('run,delete', [('tpu-vm', 'ssh'), ('tpu-vm', 'delete')]),
    ('delete', [('tpu-vm', 'delete')]),
])
def test_steps_select_phases(steps, expected):
  assert kinds(dry_run_tpu(f'--steps={steps}')) == expected


def test_keep_skips_delete():
  assert ('tpu-vm', 'delete') not in kinds(dry_run_tpu('--keep'))


def test_repo_url_clones_on_workers_instead_of_copying():
  runner = dry_run_tpu('--steps=setup', repo_url='https://github.com/me/mae-jax.git',
                       git_ref='v1.0')
  (setup,) = runner.commands
  script = remote_command(setup)
  assert 'git clone --quiet https://github.com/me/mae-jax.git mae-jax' in script
  assert 'git -C mae-jax checkout --quiet v1.0' in script


# TPU: preemption and retries (real-mode control flow, scripted answers).


def test_preempted_vm_is_recreated_and_job_rerun():
  runner = ScriptedRunner(states=['PREEMPTED'], job_results=[
      [common.StreamResult(255, 0)], [common.StreamResult(0, 1)]])
  assert tpu.main(tpu_argv(spot=True), runner=runner) == 0
  setup_and_run = [('git', 'archive'), ('tpu-vm', 'scp'), ('tpu-vm', 'ssh'), ('tpu-vm', 'ssh')]
  assert kinds(runner) == ([('tpu-vm', 'create')] + setup_and_run +
                           [('tpu-vm', 'describe'), ('tpu-vm', 'delete'), ('tpu-vm', 'create')] +
                           setup_and_run + [('tpu-vm', 'delete')])


def test_suspended_multislice_is_recreated():
  runner = ScriptedRunner(states=['ACTIVE', 'SUSPENDED', 'ACTIVE'], job_results=[
      [common.StreamResult(255, 0), common.StreamResult(0, 0)],
      [common.StreamResult(0, 4), common.StreamResult(0, 4)]])
  argv = tpu_argv(accelerator_type='v5litepod-16', num_slices=2)
  assert tpu.main(argv, runner=runner) == 0
  assert kinds(runner).count(('queued-resources', 'create')) == 2
  assert kinds(runner).count(('queued-resources', 'delete')) == 2
  assert sum(is_run(c) for c in runner.commands) == 4


def test_retries_are_bounded_and_the_tpu_is_still_deleted(capsys):
  runner = ScriptedRunner(states=['READY'] * 3,
                          job_results=[[common.StreamResult(1, 0)]] * 3)
  assert tpu.main(tpu_argv(max_retries=2), runner=runner) == 1
  assert sum(is_run(c) for c in runner.commands) == 3
  assert ('tpu-vm', 'create') not in kinds(runner)[1:]  # READY: rerun, no recreate.
  assert kinds(runner)[-1] == ('tpu-vm', 'delete')
  assert '--max_retries' in capsys.readouterr().err


def test_queued_resource_waits_until_active():
  runner = ScriptedRunner(states=['WAITING_FOR_RESOURCES', 'PROVISIONING', 'ACTIVE'])
  assert tpu.main(tpu_argv('--queued', '--steps=create', poll_seconds=0.001),
                  runner=runner) == 0
  assert kinds(runner) == [('queued-resources', 'create')] + [
      ('queued-resources', 'describe')] * 3


def test_an_existing_queued_resource_of_another_size_is_left_alone(capsys):
  runner = ScriptedRunner(states=['ACTIVE'], failures={'create': (1,)}, existing_type='v4-16')
  assert tpu.main(tpu_argv('--queued'), runner=runner) == 1
  assert kinds(runner) == [('queued-resources', 'create')] + [('queued-resources', 'describe')] * 2
  assert '--format=value(tpu.nodeSpec[0].node.acceleratorType)' in runner.commands[-1]
  assert 'already exists as a v4-16' in capsys.readouterr().err


def test_failed_queued_resource_is_an_error_and_deleted(capsys):
  runner = ScriptedRunner(states=['FAILED'])
  assert tpu.main(tpu_argv('--queued'), runner=runner) == 1
  assert kinds(runner)[-1] == ('queued-resources', 'delete')
  assert 'FAILED' in capsys.readouterr().err


SETUP = [('git', 'archive'), ('tpu-vm', 'scp'), ('tpu-vm', 'ssh')]


def test_failed_recreate_after_a_preemption_is_retried_with_backoff():
  """No spot capacity twice: delete + create again after 30 s, then 60 s; the job then finishes."""
  runner = ScriptedRunner(states=['PREEMPTED'], failures={'create': (2, 3)}, job_results=[
      [common.StreamResult(255, 0)], [common.StreamResult(0, 1, (0,))]])
  assert tpu.main(tpu_argv(spot=True, max_retries=3), runner=runner) == 0
  recreate = [('tpu-vm', 'delete'), ('tpu-vm', 'create')]
  assert kinds(runner) == ([('tpu-vm', 'create')] + SETUP + [('tpu-vm', 'ssh'), ('tpu-vm', 'describe')]
                           + recreate * 3 + SETUP + [('tpu-vm', 'ssh'), ('tpu-vm', 'delete')])
  assert runner.sleeps == [30.0, 60.0]
  assert 'retry 3/3' in runner.out.getvalue()


def test_failed_setup_after_a_preemption_is_retried_on_the_new_vm():
  """A pip or ssh hiccup during setup: the VM is still READY, so only setup runs again."""
  runner = ScriptedRunner(states=['PREEMPTED', 'READY'], failures={'setup': (2,)}, job_results=[
      [common.StreamResult(255, 0)], [common.StreamResult(0, 1, (0,))]])
  assert tpu.main(tpu_argv(spot=True, retry_backoff_seconds=5), runner=runner) == 0
  assert kinds(runner) == ([('tpu-vm', 'create')] + SETUP + [('tpu-vm', 'ssh'), ('tpu-vm', 'describe'),
                                                           ('tpu-vm', 'delete'), ('tpu-vm', 'create')]
                           + SETUP + [('tpu-vm', 'describe')] + SETUP + [('tpu-vm', 'ssh'), ('tpu-vm', 'delete')])
  assert runner.sleeps == [5.0]
  assert 'setup failed' in runner.out.getvalue()


def test_recreate_failing_past_max_retries_exits_75_and_deletes(capsys):
  runner = ScriptedRunner(states=['PREEMPTED'], failures={'create': range(2, 10)},
                          job_results=[[common.StreamResult(255, 0)]])
  assert tpu.main(tpu_argv(spot=True, max_retries=2), runner=runner) == common.PREEMPTED_EXIT_CODE == 75
  assert kinds(runner)[-5:] == [('tpu-vm', 'delete'), ('tpu-vm', 'create')] * 2 + [('tpu-vm', 'delete')]
  err = capsys.readouterr().err
  assert '--max_retries' in err and 'rerun the same command' in err


def test_nonfinite_halt_is_not_retried(capsys):
  """Every worker reports exit status 65: no describe, no rerun; the TPU is deleted; the launcher exits 65."""
  runner = ScriptedRunner(job_results=[[common.StreamResult(1, 0, (65, 65, 65, 65))]])
  assert tpu.main(tpu_argv(accelerator_type='v4-32', max_retries=5), runner=runner) == 65
  assert kinds(runner) == [('tpu-vm', 'create')] + SETUP + [('tpu-vm', 'ssh'), ('tpu-vm', 'delete')]
  assert 'non-finite' in capsys.readouterr().err


def test_rerunning_the_command_uses_the_tpu_that_exists(capsys):
  """create fails (ALREADY_EXISTS: an earlier launch's TPU): it is READY, so the job runs on it, not deleted first."""
  runner = ScriptedRunner(states=['READY'], failures={'create': (1,)},
                          job_results=[[common.StreamResult(0, 1, (0,))]])
  assert tpu.main(tpu_argv(), runner=runner) == 0
  assert kinds(runner) == [('tpu-vm', 'create'), ('tpu-vm', 'describe'), ('tpu-vm', 'describe')] + SETUP + [
      ('tpu-vm', 'ssh'), ('tpu-vm', 'delete')]  # Its state, then its accelerator type.
  assert 'mae-test already exists (READY): using it' in runner.out.getvalue()
  # One of that name but another size is not used (nor deleted: it may be someone else's).
  runner = ScriptedRunner(states=['READY'], failures={'create': (1,)}, existing_type='v4-32')
  assert tpu.main(tpu_argv(), runner=runner) == 1
  assert kinds(runner) == [('tpu-vm', 'create'), ('tpu-vm', 'describe'), ('tpu-vm', 'describe')]
  assert ('--format=value(acceleratorType)' in runner.commands[2]
          and 'mae-test already exists as a v4-32, not the --accelerator_type=v4-8' in capsys.readouterr().err)
  # Lost (or still being created), and of another type: not deleted and created again, not waited for.
  for state in ('PREEMPTED', 'CREATING'):
    runner = ScriptedRunner(states=[state], failures={'create': (1,)}, existing_type='v4-32')
    assert tpu.main(tpu_argv(), runner=runner) == 1
    assert kinds(runner) == [('tpu-vm', 'create'), ('tpu-vm', 'describe'), ('tpu-vm', 'describe')], state
  # v5e-16 asked for, v5litepod-16 found: the same slice in gcloud's spelling.
  runner = ScriptedRunner(states=['READY'], failures={'create': (1,)}, existing_type='v5litepod-16',
                          job_results=[[common.StreamResult(0, 4, (0,))]])
  assert tpu.main(tpu_argv(accelerator_type='v5e-16'), runner=runner) == 0
  # A lost one of that name is replaced; none at all (describe fails): the create's failure stands.
  runner = ScriptedRunner(states=['PREEMPTED'], failures={'create': (1,)}, job_results=[[common.StreamResult(0, 1)]])
  assert tpu.main(tpu_argv(), runner=runner) == 0
  assert kinds(runner)[:5] == [('tpu-vm', 'create'), ('tpu-vm', 'describe'), ('tpu-vm', 'describe'),
                               ('tpu-vm', 'delete'), ('tpu-vm', 'create')]  # Its state, its type (the same).
  runner = ScriptedRunner(failures={'create': (1,)})
  runner._call_capture = lambda command: (1, '')  # NOT_FOUND
  assert tpu.main(tpu_argv(), runner=runner) == 1
  assert kinds(runner) == [('tpu-vm', 'create'), ('tpu-vm', 'describe'), ('tpu-vm', 'delete')]
  # Still being created by the earlier launch: waited for until READY, not set up half-made.
  runner = ScriptedRunner(states=['CREATING', 'READY'], failures={'create': (1,)},
                          job_results=[[common.StreamResult(0, 1)]])
  assert tpu.main(tpu_argv(poll_seconds=7), runner=runner) == 0
  assert kinds(runner)[:3] == [('tpu-vm', 'create'), ('tpu-vm', 'describe'), ('tpu-vm', 'describe')]
  assert runner.sleeps == [7.0] and 'mae-test is CREATING; waiting 7s' in runner.out.getvalue()
  # Being deleted (an earlier launch's cleanup): waited for until it is gone, then created again.
  answers = [(0, 'DELETING'), (1, '')]
  runner = ScriptedRunner(failures={'create': (1,)}, job_results=[[common.StreamResult(0, 1)]])
  runner._call_capture = lambda command: answers.pop(0)
  assert tpu.main(tpu_argv(poll_seconds=1), runner=runner) == 0
  assert kinds(runner)[:4] == [('tpu-vm', 'create'), ('tpu-vm', 'describe'), ('tpu-vm', 'describe'),
                               ('tpu-vm', 'create')]


def test_sigterm_stops_the_launcher_like_ctrl_c_and_deletes_the_tpu(tmp_path):
  """A CI timeout's SIGTERM: the running ssh is stopped and the TPU deleted, then exit 130."""
  log = tmp_path / 'gcloud.log'
  fake = tmp_path / 'bin' / 'gcloud'
  fake.parent.mkdir()
  fake.write_text('#!/bin/sh\necho "$*" >> "$GCLOUD_LOG"\n'
                  'case "$*" in *mae_jax.main*) exec sleep 60 ;; esac\n')
  fake.chmod(0o755)
  env = {**os.environ, 'PATH': f'{fake.parent}{os.pathsep}{os.environ["PATH"]}', 'GCLOUD_LOG': str(log)}
  proc = subprocess.Popen([sys.executable, '-m', 'launch.tpu', *tpu_argv(source_dir=REPO_ROOT)], cwd=REPO_ROOT,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while 'mae_jax.main' not in (log.read_text() if log.exists() else '') and time.time() < deadline:
    time.sleep(0.2)
  proc.terminate()
  _, err = proc.communicate(timeout=60)
  calls = log.read_text().splitlines()
  assert proc.returncode == 130 and 'error: interrupted (signal SIGTERM)' in err, err
  assert calls[-1].startswith('compute tpus tpu-vm delete mae-test'), calls


def test_a_setting_to_fix_is_not_retried(capsys):
  """Exit status 78 (say a resume that no longer fits the model): rerunning as it is fails the same way."""
  runner = ScriptedRunner(job_results=[[common.StreamResult(1, 0, (78, 78))]])
  assert tpu.main(tpu_argv(accelerator_type='v4-16', max_retries=5), runner=runner) == 1
  assert kinds(runner) == [('tpu-vm', 'create')] + SETUP + [('tpu-vm', 'ssh'), ('tpu-vm', 'delete')]
  assert 'setting, flag or file to fix (exit status 78 or 2' in capsys.readouterr().err
  # Exit status 2: the trainer refused its command line (a flag this check could not see).
  runner = ScriptedRunner(job_results=[[common.StreamResult(1, 0, (2, 2))]])
  assert tpu.main(tpu_argv(accelerator_type='v4-16', max_retries=5), runner=runner) == 1
  assert sum(is_run(c) for c in runner.commands) == 1


def test_every_spelling_of_a_trainer_config_flag_is_read():
  """absl takes --config.KEY VALUE, a bare --config.FLAG and --noconfig.FLAG as well as --config.KEY=VALUE."""
  common.check_job_config('configs/test.py', (), ['--config.seed', '3', '--config.norm_pix_loss',
                                                  '--noconfig.norm_pix_loss', '--config.seed=4'])
  with pytest.raises(ValueError, match="unknown config key 'sed'; close matches: seed"):
    common.check_job_config('configs/test.py', (), ['--config.sed', '3'])
  with pytest.raises(ValueError, match="unknown config key 'norm_pix_los'"):
    common.check_job_config('configs/test.py', (), ['--noconfig.norm_pix_los'])


@pytest.mark.parametrize('flags,match', [
    (dict(config='configs/mae_pretrain.py:variant=L/61'), "unknown variant 'L/61'; close matches: L/16"),
    (dict(override='optim.bse_lr=1.5e-4'), "unknown config key 'optim.bse_lr'; close matches: optim.base_lr"),
    (dict(override='optim.base_lr=fast'), "optim.base_lr=fast: value='fast': expected a number"),
    (dict(config='configs/no_such.py'), 'configs/no_such.py is not committed at --git_ref=HEAD'),
])
def test_the_config_and_its_flags_are_read_before_a_tpu_is_created(flags, match, capsys):
  runner = common.Runner(dry_run=True, out=io.StringIO())
  with pytest.raises(SystemExit) as stopped:
    tpu.main(tpu_argv('--dry_run', **flags), runner=runner)
  assert stopped.value.code == 2 and not runner.commands
  assert match in capsys.readouterr().err


def test_trainer_preempted_on_a_healthy_vm_is_rerun():
  """Exit status 75 (it saved and stopped; the VM is READY again): rerun without recreating."""
  runner = ScriptedRunner(states=['READY'], job_results=[
      [common.StreamResult(1, 0, (75,))], [common.StreamResult(0, 1, (0,))]])
  assert tpu.main(tpu_argv(), runner=runner) == 0
  assert sum(is_run(c) for c in runner.commands) == 2 and kinds(runner).count(('tpu-vm', 'create')) == 1
  assert not runner.sleeps


def test_exit_codes_are_the_trainers_and_distinct():
  from mae_jax import main  # pylint: disable=g-import-not-at-top
  assert (common.PREEMPTED_EXIT_CODE, common.NONFINITE_EXIT_CODE, common.CONFIG_EXIT_CODE) == (
      main.PREEMPTED_EXIT_CODE, main.NONFINITE_EXIT_CODE, main.CONFIG_EXIT_CODE)
  assert len({0, 1, 2, common.PREEMPTED_EXIT_CODE, common.NONFINITE_EXIT_CODE, common.CONFIG_EXIT_CODE}) == 6


def test_trainer_halting_on_nonfinite_losses_exits_with_the_nonfinite_code(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO_ROOT)
  done = subprocess.run([sys.executable, '-m', 'mae_jax.main', '--config=tests/configs/tiny_synthetic.py',
                         f'--workdir={tmp_path}', '--config.optim.base_lr=1e30', '--config.optim.warmup_steps=1',
                         '--config.max_nonfinite_steps=3', '--config.checkpoint_every_steps=1'],
                        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == common.NONFINITE_EXIT_CODE, done.stderr[-3000:]
  assert 'consecutive steps had a non-finite loss' in done.stderr


def test_runner_collects_the_exit_statuses_workers_print():
  runner = common.Runner(out=io.StringIO())
  code = f'print("{common.EXIT_MARKER}65"); print("{common.EXIT_MARKER}0 {common.SUCCESS_MARKER}")'
  (result,) = runner.stream([[sys.executable, '-c', code]])
  assert result == common.StreamResult(0, 1, (65, 0))


# TPU: the trainer's start on the workers.


@pytest.mark.parametrize('flags, expected', [
    ({'accelerator_type': 'v4-8'}, False),
    ({'accelerator_type': 'v4-32'}, True),  # 4 hosts
    ({'accelerator_type': 'v5litepod-8', 'num_slices': 2}, True),  # 2 single-host slices
])
def test_multi_host_trainers_get_distributed_on(flags, expected):
  runner = dry_run_tpu('--steps=run', '--', '--config.seed=1', **flags)
  for run in filter(is_run, runner.commands):
    words = trainer_words(run)
    assert ('--distributed=on' in words) == expected
    assert words[-1] == '--config.seed=1'  # Flags after `--` come last, so they can override it.


def test_dry_run_shows_the_stale_trainer_is_waited_for():
  (run,) = dry_run_tpu('--steps=run', stale_trainer_timeout=120).commands
  script = remote_command(run)
  assert 'kill -TERM "$old"' in script and '-lt 120' in script and 'kill -KILL "$old"' in script
  assert 'sleep 10' not in script
  assert script.index('kill -KILL') < script.index(' -m mae_jax.main ')


def _stale_trainer(tmp_path, ignore_sigterm):
  """A process that looks like an old trainer (mae_jax.main in its argv); on SIGTERM it 'saves' for 1 s."""
  code = ('import os, signal, sys, time\n'
          'def stop(*_):\n'
          '  time.sleep(1); open(sys.argv[2], "w").close(); sys.exit(75)\n'
          f'signal.signal(signal.SIGTERM, {"signal.SIG_IGN" if ignore_sigterm else "stop"})\n'
          'open(sys.argv[3], "w").close()\n'
          'time.sleep(60)\n')
  saved, ready = tmp_path / 'old_saved', tmp_path / 'old_ready'
  old = subprocess.Popen([sys.executable, '-c', code, 'mae_jax.main', str(saved), str(ready)])
  deadline = time.time() + 30
  while not ready.exists():
    assert time.time() < deadline and old.poll() is None
    time.sleep(0.05)
  (tmp_path / 'mae-jax').mkdir()
  (tmp_path / '.mae_jax_job_mae-jax.pid').write_text(f'{old.pid}\n')  # Beside the code, which setup replaces.
  return old, saved


def _new_trainer(tmp_path):
  """Stands in for python: reports whether the old trainer had saved when it started."""
  path = tmp_path / 'new_python'
  path.write_text(f'#!{sys.executable}\nimport json, os\n'
                  f'print(json.dumps({{"old_saved": os.path.exists({str(tmp_path / "old_saved")!r})}}))\n')
  path.chmod(0o755)
  return str(path)


def _rerun_beside_a_stale_trainer(tmp_path, ignore_sigterm: bool, **job_fields):
  """Runs the worker script while an old trainer still runs; returns (script result, the old one's status)."""
  old, _ = _stale_trainer(tmp_path, ignore_sigterm=ignore_sigterm)
  job = tpu.TpuJob(tpu_name='mae-test', zone=ZONE, accelerator_type='v4-8', config='c.py', workdir='/tmp/w',
                   python=_new_trainer(tmp_path), **job_fields)
  try:
    done = subprocess.run(['bash', '-c', worker_scripts.run_script(job)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, check=False)
  finally:
    old.kill()
  return done, old.wait()


def test_rerun_waits_until_the_stale_trainer_has_exited(tmp_path):
  done, old_status = _rerun_beside_a_stale_trainer(tmp_path, ignore_sigterm=False)
  assert done.returncode == 0, done.stderr
  assert old_status == 75  # It got SIGTERM and finished its save ...
  assert '{"old_saved": true}' in done.stdout  # ... before the new trainer started.
  assert f'{common.EXIT_MARKER}0' in done.stdout and common.SUCCESS_MARKER in done.stdout


def test_stale_trainer_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path):
  done, old_status = _rerun_beside_a_stale_trainer(tmp_path, ignore_sigterm=True, stale_trainer_timeout=1)
  assert done.returncode == 0, done.stderr
  assert old_status == -9
  assert 'killing it' in done.stdout and '{"old_saved": false}' in done.stdout


# Quoting: a config value survives gcloud's argv and the remote shell.


def test_override_value_survives_two_rounds_of_shell_parsing(tmp_path):
  value = NASTY.format(pwned=tmp_path / 'pwned')
  runner = dry_run_tpu(f'--override=model.name={value}', f'--env=TAG={value}',
                       num_slices=2, accelerator_type='v4-16')
  run_lines = [line for line in printed_lines(runner) if 'mae_jax.main' in line]
  assert len(run_lines) == 2
  for line in run_lines:
    remote_words = shlex.split(remote_command(shlex.split(line)))
    assert f'--config.model.name={value}' in remote_words
    assert f'TAG={value}' in remote_words


def _fake_python(tmp_path, exit_status=0):
  """An executable that prints its arguments as JSON, standing in for python."""
  path = tmp_path / 'fake_python'
  path.write_text(f'#!{sys.executable}\nimport json, os, sys\n'
                  'print(json.dumps({"argv": sys.argv[1:], "tag": os.environ.get("TAG")}))\n'
                  f'sys.exit({exit_status})\n')
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(path)


@pytest.mark.parametrize('exit_status', [0, 3])
def test_remote_run_script_executes_under_bash(tmp_path, exit_status):
  value = NASTY.format(pwned=tmp_path / 'pwned')
  job = tpu.TpuJob(tpu_name='mae-test', zone=ZONE, accelerator_type='v4-8',
                   config='configs/default.py', workdir='/tmp/mae', python=_fake_python(
                       tmp_path, exit_status), overrides=[f'model.name={value}'],
                   env=[f'TAG={value}'], extra_args=['--jax_debug_nans'])
  (tmp_path / 'mae-jax').mkdir()
  done = subprocess.run(['bash', '-c', worker_scripts.run_script(job)], cwd=tmp_path,
                        capture_output=True, text=True, timeout=30, check=False)
  assert done.returncode == exit_status, done.stderr
  printed = json.loads(done.stdout.splitlines()[0])
  assert printed['argv'] == ['-m', 'mae_jax.main', '--config=configs/default.py',
                             '--workdir=/tmp/mae', f'--config.model.name={value}',
                             '--jax_debug_nans']
  assert printed['tag'] == value
  assert (common.SUCCESS_MARKER in done.stdout) == (exit_status == 0)
  assert not (tmp_path / 'pwned').exists()
  assert not (tmp_path / '.mae_jax_job_mae-jax.pid').exists()


def _talking_trainer(tmp_path):
  """Stands in for python: prints a line every 0.05 s for 2 s (SIGTERM: 'saves' and exits 75), then writes done."""
  path = tmp_path / 'talking_python'
  path.write_text(f'#!{sys.executable}\nimport signal, sys, time\n'
                  'def stop(*_):\n'
                  f'  time.sleep(0.5); open({str(tmp_path / "saved")!r}, "w").close(); sys.exit(75)\n'
                  'signal.signal(signal.SIGTERM, stop)\n'
                  f'open({str(tmp_path / "started")!r}, "w").close()\n'
                  'for i in range(40):\n'
                  '  print("step", i, flush=True); time.sleep(0.05)\n'
                  f'open({str(tmp_path / "done")!r}, "w").close()\n')
  path.chmod(0o755)
  job = tpu.TpuJob(tpu_name='mae-test', zone=ZONE, accelerator_type='v4-8', config='c.py', workdir='/tmp/w',
                   python=str(path))
  (tmp_path / 'mae-jax').mkdir()
  return worker_scripts.run_script(job)


def test_a_dropped_ssh_connection_leaves_the_trainer_running(tmp_path):
  """The session's pipe closes early (as when ssh drops): the trainer writes to its file and finishes."""
  script = _talking_trainer(tmp_path)
  done = subprocess.run(['bash', '-c', f'({script}) | head -c 10'], cwd=tmp_path, capture_output=True, text=True,
                        timeout=60, check=False)
  assert done.stdout == 'step 0\nste'
  deadline = time.time() + 30
  while not (tmp_path / 'done').exists():
    assert time.time() < deadline, 'the trainer died with the pipe'
    time.sleep(0.1)
  assert (tmp_path / '.mae_jax_job_mae-jax.out').read_text().count('step') == 40


def test_sigterm_to_the_worker_script_reports_the_trainers_save(tmp_path):
  """A maintenance event stops every process: the script outlives its SIGTERM and reports the trainer's 75."""
  script = _talking_trainer(tmp_path)
  proc = subprocess.Popen(['bash', '-c', script], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not (tmp_path / 'started').exists():
    assert time.time() < deadline
    time.sleep(0.05)
  time.sleep(0.3)
  pid = int((tmp_path / '.mae_jax_job_mae-jax.pid').read_text())
  proc.send_signal(signal.SIGTERM)
  os.kill(pid, signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 75, out
  assert f'{common.EXIT_MARKER}75' in out and (tmp_path / 'saved').exists() and not (tmp_path / 'done').exists()


# Bad inputs: the error names the flag.


@pytest.mark.parametrize('flags, extra, named', [
    ({'accelerator_type': 'v4_8'}, (), '--accelerator_type'),
    ({'accelerator_type': 'tpu-v4-8'}, (), '--accelerator_type'),
    ({'accelerator_type': 'v4-12'}, (), '--accelerator_type'),
    ({'accelerator_type': 'v4:2x2x2'}, (), '--accelerator_type'),
    ({'num_slices': 0}, (), '--num_slices'),
    ({'num_slices': 2}, ('--preemptible',), '--preemptible'),
    ({'tpu_name': 'My_TPU'}, (), '--tpu_name'),
    ({'zone': 'central'}, (), '--zone'),
    ({'workdir': 'runs/x'}, (), '--workdir'),
    ({'config': ''}, (), '--config'),
    ({'max_retries': -1}, (), '--max_retries'),
    ({'retry_backoff_seconds': -1}, (), '--retry_backoff_seconds'),
    ({'stale_trainer_timeout': -5}, (), '--stale_trainer_timeout'),
    ({'remote_dir': '/opt/code'}, (), '--remote_dir'),
    ({'steps': 'create,boot'}, (), '--steps'),
    ({}, ('--override=bad key=1',), '--override'),
    ({}, ('--env=1X=2',), '--env'),
])
def test_tpu_bad_inputs_name_the_flag(capsys, flags, extra, named):
  runner = common.Runner(dry_run=True, out=io.StringIO())
  with pytest.raises(SystemExit) as e:
    tpu.main(tpu_argv(*extra, **flags), runner=runner)
  assert e.value.code == 2
  assert named in capsys.readouterr().err
  assert not runner.commands  # Nothing was started.


def test_tpu_python_api_raises_value_error():
  with pytest.raises(ValueError, match='--accelerator_type'):
    tpu.TpuJob(tpu_name='x', zone=ZONE, accelerator_type='v9-8')


# SLURM.


def slurm_argv(*extra, **flags):
  defaults = {'job_name': 'mae-l16', 'nodes': 2, 'gpus_per_node': 8, 'cpus_per_task': 12,
              'partition': 'gpu', 'account': 'my-acct', 'time': '24:00:00',
              'config': 'configs/mae_pretrain.py:variant=L/16', 'workdir': '/shared/mae/l16'}
  defaults.update(flags)
  return [f'--{k}={v}' for k, v in defaults.items()] + list(extra)


def dry_run_slurm(*extra, **flags):
  runner = common.Runner(dry_run=True, out=io.StringIO())
  assert slurm.main(slurm_argv('--dry_run', *extra, **flags), runner=runner) == 0
  return runner


def test_slurm_script_for_2_nodes_of_8_gpus(tmp_path):
  runner = dry_run_slurm('--setup=source ~/mae-jax/.venv/bin/activate',
                         output='/logs/%x-%j.out')
  text = runner.out.getvalue()
  assert runner.commands == [('sbatch', 'workdirs/slurm/mae-l16.sbatch')]
  assert text.splitlines()[-1] == 'sbatch workdirs/slurm/mae-l16.sbatch'
  for directive in ['--job-name=mae-l16', '--nodes=2', '--ntasks-per-node=8',
                    '--gpus-per-node=8', '--cpus-per-task=12', '--partition=gpu',
                    '--account=my-acct', '--time=24:00:00', '--output=/logs/%x-%j.out',
                    '--open-mode=append', '--requeue', '--signal=B:USR1@120']:
    assert f'#SBATCH {directive}\n' in text
  assert 'source ~/mae-jax/.venv/bin/activate\n' in text
  assert 'scontrol requeue "${SLURM_JOB_ID}"' in text
  assert 'trap requeue_before_time_limit USR1' in text
  assert 'JAX_LOCAL_DEVICE_IDS' not in text
  srun = text[text.index('srun --kill-on-bad-exit=1'):]
  assert shlex.split(srun)[:3] == ['srun', '--kill-on-bad-exit=1', '--cpus-per-task=12']
  assert 'python -m mae_jax.main --config=configs/mae_pretrain.py:variant=L/16' in srun
  script = tmp_path / 'job.sbatch'
  script.write_text(slurm.sbatch_script(slurm.job_from_args(
      slurm.build_parser().parse_args(slurm_argv()))))
  check = subprocess.run(['bash', '-n', str(script)], capture_output=True, text=True,
                         check=False)
  assert check.returncode == 0, check.stderr


def test_slurm_one_process_per_node_keeps_all_gpus():
  text = dry_run_slurm('--process_mode=per_node', gpus_per_node=4).out.getvalue()
  assert '#SBATCH --ntasks-per-node=1\n' in text
  assert '#SBATCH --gpus-per-node=4\n' in text
  assert 'export JAX_LOCAL_DEVICE_IDS=0,1,2,3\n' in text


def test_slurm_without_requeue_sends_sigterm_to_the_trainer():
  text = dry_run_slurm('--no-requeue', signal_seconds=300).out.getvalue()
  assert '#SBATCH --requeue' not in text
  assert '#SBATCH --no-requeue\n' in text  # Not the cluster's default (JobRequeue=1 requeues on preemption).
  assert '#SBATCH --signal=TERM@300\n' in text
  assert 'scontrol requeue' not in text


def test_slurm_script_runs_and_passes_values_through(tmp_path):
  """Runs the generated script with stand-ins for srun and python."""
  value = NASTY.format(pwned=tmp_path / 'pwned')
  fake_srun = tmp_path / 'bin' / 'srun'
  fake_srun.parent.mkdir()
  fake_srun.write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
  fake_srun.chmod(0o755)
  code_dir = tmp_path / 'code dir'
  code_dir.mkdir()
  job = slurm.SlurmJob(config='configs/default.py', workdir='/shared/w', chdir=str(code_dir),
                       python=_fake_python(tmp_path), overrides=[f'model.name={value}'],
                       env=[f'TAG={value}'], extra_args=['--', 'x y'], script=str(
                           tmp_path / 'out' / 'job.sbatch'))
  runner = ScriptedRunner()
  slurm.submit(job, runner)
  assert runner.commands == [('sbatch', job.script)]  # Recorded, not run.
  assert os.stat(job.script).st_mode & 0o777 == 0o700  # --env values (API keys) are in it.
  env = dict(os.environ, PATH=f'{fake_srun.parent}:{os.environ["PATH"]}', SLURM_JOB_ID='42')
  done = subprocess.run(['bash', job.script], capture_output=True, text=True, env=env,
                        timeout=30, check=False, cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  printed = json.loads(done.stdout.splitlines()[-1])
  assert printed['argv'][4:] == [f'--config.model.name={value}', '--', 'x y']
  assert printed['tag'] == value
  assert not (tmp_path / 'pwned').exists()


def test_slurm_sbatch_flags_the_launcher_does_not_set_pass():
  text = dry_run_slurm(sbatch_flag='--gres=gpu:a100:8').out.getvalue()  # A GPU type, or a non-GPU gres.
  assert '#SBATCH --gres=gpu:a100:8\n' in text


def test_slurm_without_cpus_per_task_says_what_it_means(capsys):
  dry_run_slurm(cpus_per_task=0)
  assert 'note: --cpus_per_task is not set' in capsys.readouterr().err
  dry_run_slurm()
  assert 'cpus_per_task' not in capsys.readouterr().err


def test_slurm_time_zero_is_no_limit():
  assert '#SBATCH --time=0\n' in dry_run_slurm(time='0').out.getvalue()  # Slurm's "no limit": no early signal due.


def _slurm_stand_ins(tmp_path, trainer_seconds, trainer_status, term_status, scancel_seconds=0):
  """srun (a trainer: sleeps, exits with trainer_status, or term_status on SIGTERM), squeue, scontrol, scancel."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  calls = tmp_path / 'calls'
  scripts = {
      'srun': (f'echo srun >> {calls}\ntrap \'echo saving >> {calls}; exit {term_status}\' TERM\n'
               f'sleep {trainer_seconds} >/dev/null 2>&1 & wait $!\nexit {trainer_status}\n'),  # Pipes closed.
      'squeue': 'echo RUNNING\n',
      'scontrol': f'echo "scontrol $*" >> {calls}\n',
      'scancel': f'echo "scancel $*" >> {calls}\nsleep {scancel_seconds}\n',
  }
  for name, body in scripts.items():
    (bin_dir / name).write_text('#!/bin/bash\n' + body)
    (bin_dir / name).chmod(0o755)
  return bin_dir, calls


@pytest.mark.parametrize('case', ['finished_during_the_signal', 'nonfinite_after_the_signal', 'preempted',
                                  'preempted_reported_as_killed'])
def test_slurm_script_statuses_around_the_time_limit_signal(tmp_path, case):
  """USR1 near the time limit: a trainer that ends meanwhile keeps its status; 65 is final, 75 is requeued."""
  trainer_seconds, trainer_status, term_status, scancel_seconds, want_status, requeued = {
      'finished_during_the_signal': (1, 0, 75, 3, 0, False),  # srun ends while the handler still runs.
      'nonfinite_after_the_signal': (30, 0, 65, 0, 65, False),
      'preempted': (30, 0, 75, 0, 75, True),
      # srun's status when --kill-on-bad-exit killed tasks still exiting after the first 75: still requeued.
      'preempted_reported_as_killed': (30, 0, 137, 0, 137, True),
  }[case]
  bin_dir, calls = _slurm_stand_ins(tmp_path, trainer_seconds, trainer_status, term_status, scancel_seconds)
  job = slurm.SlurmJob(config='configs/test.py', workdir='/w', script=str(tmp_path / 'job.sbatch'))
  pathlib.Path(job.script).write_text(slurm.sbatch_script(job))
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='42')
  shell = subprocess.Popen(['bash', job.script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  time.sleep(0.5)
  shell.send_signal(signal.SIGUSR1)
  if case != 'finished_during_the_signal':  # The stand-in for scancel --signal=TERM: the trainer saves.
    while 'srun' not in (calls.read_text() if calls.exists() else ''):
      time.sleep(0.1)
    subprocess.run(['pkill', '-TERM', '-f', f'{bin_dir}/srun'], check=False)
  _, err = shell.communicate(timeout=60)
  assert shell.returncode == want_status, err
  assert f'trainer exited with status {want_status}' in err
  assert ('scontrol requeue 42' in calls.read_text()) == requeued, calls.read_text()


@pytest.mark.parametrize('flags, named', [
    ({'nodes': 0}, '--nodes'),
    ({'gpus_per_node': 0}, '--gpus_per_node'),
    ({'cpus_per_task': -1}, '--cpus_per_task'),
    ({'time': 'tomorrow'}, '--time'),
    ({'partition': 'gpu a100'}, '--partition'),
    ({'job_name': 'my job'}, '--job_name'),
    ({'signal_seconds': 99999}, '--signal_seconds'),
    ({'workdir': ''}, '--workdir'),
    ({'process_mode': 'per_core'}, '--process_mode'),
    ({'sbatch_flag': '--ntasks-per-node=4'}, 'the launcher sets --ntasks-per-node itself (--gpus_per_node'),
    ({'sbatch_flag': '--export=NONE'}, 'the launcher sets --export itself'),
    ({'override': 'optim.bse_lr=1'}, "unknown config key 'optim.bse_lr'; close matches: optim.base_lr"),
])
def test_slurm_bad_inputs_name_the_flag(capsys, flags, named):
  runner = common.Runner(dry_run=True, out=io.StringIO())
  with pytest.raises(SystemExit) as e:
    slurm.main(slurm_argv('--dry_run', **flags), runner=runner)
  assert e.value.code == 2
  assert named in capsys.readouterr().err
  assert not runner.commands


# Entry points: `python -m launch.X` and `python launch/X.py` both work.


@pytest.mark.parametrize('entry', [['-m', 'launch.tpu'], ['launch/tpu.py']])
def test_tpu_cli_entry_points(entry):
  done = subprocess.run([sys.executable, *entry, *tpu_argv('--dry-run')], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith('gcloud compute tpus tpu-vm create mae-test ')


@pytest.mark.parametrize('entry', [['-m', 'launch.slurm'], ['launch/slurm.py']])
def test_slurm_cli_entry_points(entry):
  done = subprocess.run([sys.executable, *entry, *slurm_argv('--dry-run')], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines()[-1] == 'sbatch workdirs/slurm/mae-l16.sbatch'


def test_worker_setup_keeps_the_venv_while_it_replaces_the_code(tmp_path):
  """A rerun's setup replaces --remote_dir but keeps its .venv (the installed packages), then runs .ci/setup."""
  source = tmp_path / 'source'
  (source / '.ci').mkdir(parents=True)
  (source / '.ci' / 'setup').write_text(
      'echo "extras=$1 demo_data=$SETUP_DEMO_DATA kept=$(cat .venv/made 2>/dev/null)"\n'
      'mkdir -p .venv && echo "$(date +%N)" > .venv/made\n')
  home = tmp_path / 'home'
  home.mkdir()
  job = tpu.TpuJob(tpu_name='mae-test', zone=ZONE, accelerator_type='v4-8', config='c.py', workdir='/tmp/w')
  outputs = []
  for _ in range(2):
    subprocess.run(['tar', '-czf', str(home / worker_scripts.TARBALL), '-C', str(source), '.'], check=True)
    done = subprocess.run(['bash', '-c', worker_scripts.setup_script(job)], cwd=home, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    outputs.append(done.stdout.strip())
  assert outputs[0] == 'extras=tpu demo_data=0 kept='
  assert outputs[1].startswith('extras=tpu demo_data=0 kept=') and outputs[1] != outputs[0]  # The first .venv.
  assert sorted(os.listdir(home)) == ['mae-jax']  # The tarball and the kept .venv are not left beside it.


def test_a_tpu_being_repaired_is_waited_for_and_a_failed_run_rerun_after_the_backoff():
  """A run fails while the TPU is REPAIRING: the launcher waits until it is READY (no retry used up at once),
  then reruns after --retry_backoff_seconds; the rerun finishes."""
  runner = ScriptedRunner(states=['REPAIRING', 'REPAIRING', 'READY'], job_results=[
      [common.StreamResult(255, 0)], [common.StreamResult(0, 1, (0,))]])
  assert tpu.main(tpu_argv(max_retries=1, retry_backoff_seconds=7, poll_seconds=3), runner=runner) == 0
  assert runner.sleeps == [3.0, 3.0, 7.0]
  assert kinds(runner) == ([('tpu-vm', 'create')] + SETUP + [('tpu-vm', 'ssh')] + [('tpu-vm', 'describe')] * 3
                           + [('tpu-vm', 'ssh'), ('tpu-vm', 'delete')])
  assert 'is up again' in runner.out.getvalue() and 'retry 1/1' in runner.out.getvalue()


def test_a_tpu_stuck_in_repair_is_created_again():
  runner = ScriptedRunner(states=['REPAIRING'] * 3, job_results=[
      [common.StreamResult(255, 0)], [common.StreamResult(0, 1, (0,))]])
  assert tpu.main(tpu_argv(max_retries=1, poll_seconds=900), runner=runner) == 0
  assert runner.sleeps == [900.0, 900.0]  # 30 minutes, then delete and create.
  assert kinds(runner) == ([('tpu-vm', 'create')] + SETUP + [('tpu-vm', 'ssh')] + [('tpu-vm', 'describe')] * 3
                           + [('tpu-vm', 'delete'), ('tpu-vm', 'create')] + SETUP
                           + [('tpu-vm', 'ssh'), ('tpu-vm', 'delete')])
