"""Starting jax.distributed: whether and how, decided from the command line and the environment.

`initialize(mode, ...)` runs before anything touches the devices. With
`mode='auto'` it starts jax.distributed when the job has more than one process:

  explicit flags  --coordinator_address, --num_processes, --process_id (e.g. two
                  processes on loopback): passed on as they are.
  SLURM           SLURM_STEP_NUM_TASKS (or SLURM_NTASKS) > 1 in a task of an srun step.
  GKE TPU         more than one host in TPU_WORKER_HOSTNAMES (or TPU_PROCESS_ADDRESSES).
  multi-slice     MEGASCALE_COORDINATOR_ADDRESS set, or MEGASCALE_NUM_SLICES > 1.
  GCE TPU VM pod  a Cloud TPU VM (`gcloud compute tpus tpu-vm create`) whose slice
                  has more than one worker. The worker list is in the VM metadata,
                  not in the environment; JAX's own cluster detection
                  (`GceTpuCluster` in jax._src.clusters) reads it.

Everything but the explicit flags calls `jax.distributed.initialize()` without
arguments: JAX then finds the coordinator, process count and id through the
same cluster detection. `mode='on'` always initialises (and fails naming the
flags when JAX finds no cluster); `mode='off'` never does.
"""

import dataclasses
import os
from collections.abc import Mapping

import jax
from absl import logging
from jax._src import clusters as jax_clusters

MODES = ('auto', 'on', 'off')


@dataclasses.dataclass(frozen=True)
class Decision:
  """Whether to call jax.distributed.initialize, with which arguments, and why."""
  initialize: bool
  reason: str
  # Keyword arguments of jax.distributed.initialize; empty: JAX detects them from the cluster.
  kwargs: dict = dataclasses.field(default_factory=dict)


def gce_tpu_process_count() -> int:
  """Processes of this Cloud TPU VM job (workers x slices, from the VM metadata); 0 off a Cloud TPU VM.

  Uses JAX's GceTpuCluster, the detection `jax.distributed.initialize()` itself
  runs: off a TPU VM it answers without touching the network.
  """
  cluster = jax_clusters.GceTpuCluster
  try:
    if not cluster.is_env_present():
      return 0
    return cluster.get_process_count()
  except Exception as e:  # noqa: BLE001  No metadata server (a container without it, ...).
    logging.warning('Cloud TPU VM found, but its worker list could not be read from the VM metadata (%r); '
                    'starting as one process. On a pod, pass --distributed=on or --coordinator_address, '
                    '--num_processes and --process_id.', e)
    return 0


def _explicit_flags(coordinator_address, num_processes, process_id) -> dict:
  given = {'coordinator_address': coordinator_address, 'num_processes': num_processes, 'process_id': process_id}
  if all(v is None or v == '' for v in given.values()):
    return {}
  missing = [f'--{k}' for k, v in given.items() if v is None or v == '']
  if missing:
    raise ValueError(f'explicit multi-process flags: {", ".join(missing)} missing; give all three of '
                     '--coordinator_address=HOST:PORT, --num_processes=N and --process_id=I, or none '
                     '(SLURM and TPU pods are detected)')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'--process_id={process_id}: must be in [0, --num_processes={num_processes})')
  return given


# What JAX's SLURM cluster detection reads: set in each task of an srun step.
SLURM_STEP_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_PROCID', 'SLURM_LOCALID')


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
  """Names the multi-process environment this process runs in ('SLURM (...)', ...); None for one process."""
  environ = os.environ if environ is None else environ
  step_tasks = environ.get('SLURM_STEP_NUM_TASKS')  # This srun step's tasks (an allocation may hold more).
  name, tasks = (('SLURM_STEP_NUM_TASKS', step_tasks) if step_tasks else
                 ('SLURM_NTASKS', environ.get('SLURM_NTASKS', '1')))
  if tasks.isdigit() and int(tasks) > 1:
    missing = [v for v in SLURM_STEP_VARIABLES if v not in environ]
    if not missing:
      return f'SLURM ({name}={tasks})'
    # An salloc shell, or python started without srun: JAX could not find its processes.
    logging.warning('%s=%s, but %s not set: not a task of an srun step, so this runs as one process (start it '
                    'with srun for %s processes)', name, tasks, ', '.join(missing), tasks)
  gke = [name for name in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES') if name in environ]
  for name in gke:
    hosts = [h for h in environ[name].split(',') if h.strip()]
    if len(hosts) > 1:
      return f'GKE TPU ({len(hosts)} hosts in {name})'
  if environ.get('MEGASCALE_COORDINATOR_ADDRESS'):
    return 'multi-slice (MEGASCALE_COORDINATOR_ADDRESS)'
  slices = environ.get('MEGASCALE_NUM_SLICES', '1')
  if slices.isdigit() and int(slices) > 1:
    return f'multi-slice (MEGASCALE_NUM_SLICES={slices})'
  if gke:
    return None  # A single-host GKE TPU: no VM metadata to ask.
  # Last: on a Cloud TPU VM this asks the metadata server.
  processes = gce_tpu_process_count()
  if processes > 1:
    return f'GCE TPU VM pod ({processes} processes in the VM metadata)'
  return None


def decide(mode: str = 'auto', coordinator_address: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, environ: Mapping[str, str] | None = None) -> Decision:
  """What `initialize` will do for this --distributed mode, these flags and this environment."""
  if mode not in MODES:
    raise ValueError(f'--distributed={mode!r}: must be one of {", ".join(MODES)}')
  explicit = _explicit_flags(coordinator_address, num_processes, process_id)
  if mode == 'off':
    if explicit:
      raise ValueError('--distributed=off with --coordinator_address/--num_processes/--process_id: '
                       'drop the flags, or use --distributed=auto')
    return Decision(False, '--distributed=off')
  if explicit:
    return Decision(True, f'explicit flags (process {process_id} of {num_processes})', explicit)
  if mode == 'on':
    return Decision(True, '--distributed=on')
  cluster = detect_cluster(environ)
  if cluster is None:
    return Decision(False, 'one process (no multi-process cluster found)')
  return Decision(True, cluster)


def initialize(mode: str = 'auto', coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> Decision:
  """Starts jax.distributed when `decide` says so; call it before anything touches the devices."""
  decision = decide(mode, coordinator_address, num_processes, process_id)
  logging.info('jax.distributed: %s (%s)', 'starting' if decision.initialize else 'not started', decision.reason)
  if not decision.initialize:
    return decision
  # Cross-process collectives of CPU devices (e.g. loopback tests); no effect on TPU or GPU, and
  # safe before initialize: it does not touch the backend.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**decision.kwargs)
  except (RuntimeError, ValueError) as e:
    if decision.kwargs:
      raise
    raise RuntimeError(
        f'jax.distributed.initialize() failed ({decision.reason}): {e}. JAX finds the processes under SLURM '
        '(srun), on Cloud TPU VMs and GKE TPU pods; elsewhere pass --coordinator_address=HOST:PORT, '
        '--num_processes=N and --process_id=I, or --distributed=off for a single process.') from e
  _STARTED.append(decision)
  return decision


_STARTED = []  # The decision of the initialize() that started jax.distributed in this process.


def is_initialized() -> bool:
  """Whether `initialize` started jax.distributed in this process (a multi-process job)."""
  return bool(_STARTED)
