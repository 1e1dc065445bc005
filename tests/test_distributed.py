"""Tests for mae_jax/distributed.py: each cluster environment faked, jax.distributed.initialize recorded.

No real cluster: environment variables and JAX's Cloud TPU metadata detection
are monkeypatched, and so is jax.distributed.initialize, which records its
arguments instead of starting anything.
"""

import os
import subprocess
import sys

import jax
import pytest
from jax._src import clusters as jax_clusters
from jax._src.clusters import cloud_tpu_cluster

from mae_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER_VARIABLES = ('SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', *distributed.SLURM_STEP_VARIABLES, 'TPU_WORKER_HOSTNAMES',
                     'TPU_PROCESS_ADDRESSES', 'MEGASCALE_COORDINATOR_ADDRESS', 'MEGASCALE_NUM_SLICES')
SRUN_TASK = {'SLURM_JOB_ID': '7', 'SLURM_STEP_NODELIST': 'node1', 'SLURM_PROCID': '0', 'SLURM_LOCALID': '0'}


@pytest.fixture
def calls(monkeypatch):
  """A clean environment (no cluster, not a TPU VM); returns the record of what was called, in order."""
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  record = []
  monkeypatch.setattr(distributed, 'gce_tpu_process_count', lambda: 0)
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: record.append(('initialize', kwargs)))
  update = jax.config.update

  def recording_update(name, value):
    record.append(('config', name, value))
    update(name, value)

  monkeypatch.setattr(jax.config, 'update', recording_update)
  return record


GLOO = ('config', 'jax_cpu_collectives_implementation', 'gloo')


def test_distributed_init_explicit_flags_are_passed_with_gloo_first(calls):
  decision = distributed.initialize('auto', '127.0.0.1:1234', 2, 1)
  assert decision.initialize and 'explicit flags' in decision.reason
  assert calls == [GLOO, ('initialize', {'coordinator_address': '127.0.0.1:1234', 'num_processes': 2,
                                         'process_id': 1})]


def test_distributed_init_explicit_flags_win_over_the_environment(calls, monkeypatch):
  monkeypatch.setenv('SLURM_NTASKS', '8')
  distributed.initialize('on', 'host0:9999', 2, 0)
  assert calls[-1] == ('initialize', {'coordinator_address': 'host0:9999', 'num_processes': 2, 'process_id': 0})


def test_distributed_init_single_process_calls_nothing(calls, monkeypatch):
  monkeypatch.setenv('SLURM_NTASKS', '1')
  monkeypatch.setenv('MEGASCALE_NUM_SLICES', '1')
  decision = distributed.initialize('auto')
  assert not decision.initialize and calls == []
  # A single-host GKE TPU: not started, and no VM metadata asked for.
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'localhost')
  monkeypatch.setattr(distributed, 'gce_tpu_process_count', lambda: pytest.fail('metadata asked'))
  assert not distributed.initialize('auto').initialize and calls == []
  # ... unless its slice is one of several.
  monkeypatch.setenv('MEGASCALE_COORDINATOR_ADDRESS', 'slice-0-host-0')
  assert distributed.initialize('auto').initialize and calls == [GLOO, ('initialize', {})]


@pytest.mark.parametrize('name, value, named', [
    ('SLURM_NTASKS', '16', 'SLURM'),
    ('TPU_WORKER_HOSTNAMES', 'w-0,w-1,w-2,w-3', 'GKE TPU'),
    ('TPU_PROCESS_ADDRESSES', '10.0.0.1:8476,10.0.0.2:8476', 'GKE TPU'),
    ('MEGASCALE_COORDINATOR_ADDRESS', '10.0.0.1', 'multi-slice'),
    ('MEGASCALE_NUM_SLICES', '2', 'multi-slice'),
])
def test_distributed_init_cluster_environments_let_jax_detect_the_rest(calls, monkeypatch, name, value, named):
  monkeypatch.setenv(name, value)
  if name.startswith('SLURM'):
    for variable, task_value in SRUN_TASK.items():
      monkeypatch.setenv(variable, task_value)
  decision = distributed.initialize('auto')
  assert decision.initialize and named in decision.reason
  assert calls == [GLOO, ('initialize', {})]  # No arguments: JAX's cluster detection fills them in.


def _fake_cloud_tpu_vm(monkeypatch, processes):
  """A Cloud TPU VM as JAX's GceTpuCluster sees it, its metadata answering `processes` workers."""
  monkeypatch.setattr(jax_clusters.GceTpuCluster, 'is_env_present', classmethod(lambda cls: True))
  monkeypatch.setattr(jax_clusters.GceTpuCluster, 'get_process_count', classmethod(lambda cls: processes))


def test_distributed_init_gce_tpu_vm_pod_is_found_through_jax_cluster_detection(calls, monkeypatch):
  monkeypatch.undo()  # The real gce_tpu_process_count, over a faked JAX detection.
  for name in CLUSTER_VARIABLES:
    monkeypatch.delenv(name, raising=False)
  record = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kwargs: record.append(kwargs))
  _fake_cloud_tpu_vm(monkeypatch, 4)  # A v4-32: 4 workers, nothing in the environment.
  decision = distributed.initialize('auto')
  assert decision.initialize and decision.reason == 'GCE TPU VM pod (4 processes in the VM metadata)'
  assert record == [{}]
  _fake_cloud_tpu_vm(monkeypatch, 1)  # A single-host TPU VM: one process, nothing to start.
  assert not distributed.initialize('auto').initialize and record == [{}]


def test_distributed_init_unreadable_tpu_metadata_starts_one_process(monkeypatch):
  def no_metadata_server(cls):
    raise ConnectionError('metadata.google.internal unreachable')

  monkeypatch.setattr(jax_clusters.GceTpuCluster, 'is_env_present', classmethod(no_metadata_server))
  assert distributed.gce_tpu_process_count() == 0


def test_distributed_init_off_a_cloud_tpu_vm_asks_no_metadata_server(monkeypatch):
  """JAX's own detection on this (non-TPU) host answers without the network."""
  def no_network(key):
    raise AssertionError(f'metadata query for {key!r}')

  monkeypatch.setattr(cloud_tpu_cluster, 'get_metadata', no_network)
  assert distributed.gce_tpu_process_count() == 0


def test_slurm_without_an_srun_step_runs_as_one_process(calls, monkeypatch, caplog):
  """An salloc shell holds SLURM_NTASKS but is no task of a step: JAX would fail to find its processes."""
  monkeypatch.setenv('SLURM_NTASKS', '8')
  assert not distributed.initialize('auto').initialize and calls == []
  assert 'SLURM_NTASKS=8, but SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID not set' in caplog.text
  # A one-task step inside a larger allocation (an interactive srun): the step's count wins.
  for variable, value in {**SRUN_TASK, 'SLURM_STEP_NUM_TASKS': '1'}.items():
    monkeypatch.setenv(variable, value)
  assert not distributed.initialize('auto').initialize and calls == []
  monkeypatch.setenv('SLURM_STEP_NUM_TASKS', '2')
  assert 'SLURM (SLURM_STEP_NUM_TASKS=2)' in distributed.initialize('auto').reason


def test_distributed_init_off_never_initializes_nor_detects(calls, monkeypatch):
  monkeypatch.setenv('SLURM_NTASKS', '4')
  monkeypatch.setattr(distributed, 'gce_tpu_process_count', lambda: pytest.fail('detection ran'))
  decision = distributed.initialize('off')
  assert not decision.initialize and calls == []


def test_distributed_init_on_always_initializes(calls):
  decision = distributed.initialize('on')
  assert decision.initialize and calls == [GLOO, ('initialize', {})]


def test_distributed_init_on_without_a_cluster_fails_naming_the_flags(calls, monkeypatch):
  def jax_finds_nothing(**kwargs):
    raise ValueError('coordinator_address should be defined.')

  monkeypatch.setattr(jax.distributed, 'initialize', jax_finds_nothing)
  with pytest.raises(RuntimeError, match=r'--distributed=on.*coordinator_address should be defined.*'
                                         r'--coordinator_address=HOST:PORT.*--distributed=off'):
    distributed.initialize('on')


@pytest.mark.parametrize('args, message', [
    (('sometimes',), "--distributed='sometimes': must be one of auto, on, off"),
    (('auto', 'h:1', 2, None), '--process_id missing'),
    (('auto', None, 2, 0), '--coordinator_address missing'),
    (('auto', 'h:1', 2, 2), r'--process_id=2: must be in \[0, --num_processes=2\)'),
    (('off', 'h:1', 2, 0), '--distributed=off with --coordinator_address'),
])
def test_distributed_init_bad_settings_name_the_flag(calls, args, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(*args)
  assert calls == []


def test_distributed_flag_is_checked_by_the_entry_point(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  base = [sys.executable, '-m', 'mae_jax.main', '--config=tests/configs/tiny_synthetic.py', f'--workdir={tmp_path}']
  bad = subprocess.run(base + ['--distributed=sometimes'], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert bad.returncode == 2 and '--distributed' in bad.stderr and 'auto' in bad.stderr, bad.stderr[-2000:]
  clash = subprocess.run(base + ['--distributed=off', '--coordinator_address=127.0.0.1:1', '--num_processes=2',
                                 '--process_id=0'], cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
  assert clash.returncode == 2 and clash.stderr.strip().splitlines()[-1].startswith(
      'error: --distributed=off with --coordinator_address'), clash.stderr[-2000:]
  assert os.listdir(tmp_path) in ([], ['logs'])  # Stopped before anything ran (the log file aside).


_SHARED_WORKDIR_CHECK = '''
import os, sys
from mae_jax import checkpoint, distributed
port, base, flag = sys.argv[1:]
pid = int(flag.split('=')[1])
distributed.initialize('on', f'127.0.0.1:{port}', 2, pid)
checkpoint.check_shared_workdir(base)  # One folder for both: passes, and the probe file is gone.
print('SHARED OK', sorted(os.listdir(base)))
try:  # Process 1's "same path" on a disk of its own, as a pod worker's /home.
  checkpoint.check_shared_workdir(base if pid == 0 else base + '_own_disk')
except checkpoint.WorkdirError as e:
  print('REFUSED', e)
open(base + '_a_file', 'w').close()
try:  # A path process 0 cannot write to: every process says so (none waits for it).
  checkpoint.check_shared_workdir(base + '_a_file/run')
except checkpoint.WorkdirError as e:
  print('UNWRITABLE', e)
'''


def test_a_workdir_the_processes_do_not_share_is_refused_on_every_process(tmp_path):
  from tests import two_processes  # pylint: disable=g-import-not-at-top
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  workdir = str(tmp_path / 'run')
  command = [sys.executable, '-c', _SHARED_WORKDIR_CHECK, str(two_processes.free_port()), workdir]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=repo)
  codes, outputs = two_processes.run(command, env, repo, tmp_path, timeout=120)
  assert codes == [0, 0], outputs
  for out in outputs:
    assert 'SHARED OK []' in out, out
    assert 'REFUSED --workdir=' in out and 'process(es) [1] of 2 do not see the file process 0 wrote' in out, out
    assert 'UNWRITABLE --workdir=' in out and 'process 0 cannot write there' in out, out
