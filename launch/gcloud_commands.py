"""The gcloud (and git) commands of the TPU launcher, built from a launch.tpu.TpuJob: argv lists, nothing run.

Every value is one argv element; the remote `--command=` strings come from
launch/worker_scripts.py.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any  # job: a launch.tpu.TpuJob (which imports this module)

from launch import worker_scripts


def _location(job: Any) -> list[str]:
  flags = [f'--zone={job.zone}']
  if job.project:
    flags.append(f'--project={job.project}')
  return flags


_TPU_VM = ('gcloud', 'compute', 'tpus', 'tpu-vm')
_QUEUED = ('gcloud', 'compute', 'tpus', 'queued-resources')


def create_command(job: Any) -> list[str]:
  """The gcloud command that creates the TPU VM or queued resource."""
  if job.use_queued_resource:
    argv = [*_QUEUED, 'create', job.tpu_name, *_location(job),
            f'--accelerator-type={job.slice_type.name}',
            f'--runtime-version={job.resolved_runtime_version}']
    if job.num_slices == 1:
      argv.append(f'--node-id={job.tpu_name}')
    else:
      argv += [f'--node-count={job.num_slices}',
               f'--node-prefix={job.node_prefix or job.tpu_name}']
  else:
    argv = [*_TPU_VM, 'create', job.tpu_name, *_location(job),
            f'--accelerator-type={job.slice_type.name}',
            f'--version={job.resolved_runtime_version}']
  if job.spot:
    argv.append('--spot')
  if job.preemptible:
    argv.append('--preemptible')
  if job.reserved:
    argv.append('--reserved')
  return argv + list(job.create_flags)


def describe_command(job: Any) -> list[str]:
  """The gcloud command that prints the resource state (one word)."""
  if job.use_queued_resource:
    return [*_QUEUED, 'describe', job.tpu_name, *_location(job), '--format=value(state.state)']
  return [*_TPU_VM, 'describe', job.tpu_name, *_location(job), '--format=value(state)']


def accelerator_type_command(job: Any) -> list[str]:
  """The gcloud command that prints the accelerator type of the TPU of that name (e.g. v4-8)."""
  if job.use_queued_resource:
    return [*_QUEUED, 'describe', job.tpu_name, *_location(job),
            '--format=value(tpu.nodeSpec[0].node.acceleratorType)']
  return [*_TPU_VM, 'describe', job.tpu_name, *_location(job), '--format=value(acceleratorType)']


def delete_command(job: Any) -> list[str]:
  """The gcloud command that deletes the TPU VM or queued resource (and its nodes)."""
  if job.use_queued_resource:
    return [*_QUEUED, 'delete', job.tpu_name, *_location(job), '--force', '--quiet']
  return [*_TPU_VM, 'delete', job.tpu_name, *_location(job), '--quiet']


def ssh_command(job: Any, node: str, remote_command: str) -> list[str]:
  """Runs a shell command on every worker of one node."""
  return [*_TPU_VM, 'ssh', node, *_location(job), '--worker=all',
          f'--command={remote_command}']


def local_tarball(job: Any) -> str:
  return os.path.join(tempfile.gettempdir(), f'{job.tpu_name}-code.tar.gz')


def archive_command(job: Any) -> list[str]:
  """Packs the committed tree of --source_dir at --git_ref into a local tarball."""
  return ['git', '-C', job.source_dir, 'archive', '--format=tar.gz',
          f'--output={local_tarball(job)}', job.git_ref]


def scp_command(job: Any, node: str) -> list[str]:
  return [*_TPU_VM, 'scp', local_tarball(job), f'{node}:{worker_scripts.TARBALL}', *_location(job),
          '--worker=all']
