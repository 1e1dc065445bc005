"""Weights & Biases as one more clu metric writer (optional: pip install 'mae_jax[wandb]').

`maybe_create(config, workdir)` reads `config.wandb` (configs/default.py
declares enabled, project, entity, name, group, tags, mode) and returns a
`WandbWriter` on process 0 when enabled, None otherwise. Scalars are logged by
step, images (the reconstruction grid) as `wandb.Image`s, and the flattened
config is the run's config from the start (later `write_hparams` add to it).

The run id is kept in WORKDIR/wandb_run_id.txt, so a job that resumes from its
checkpoint (a preempted TPU VM) continues the same W&B run; W&B ignores values
logged again for steps it already has. Local run files go to WANDB_DIR, else
into the workdir (when it is local), else to W&B's default (./wandb).
"""

import os
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from clu import metric_writers
from flax import traverse_util

from mae_jax import config_tools, fileio

INSTALL_HINT = "pip install 'mae_jax[wandb]'  (or: pip install wandb)"
MODES = ('', 'online', 'offline', 'disabled')  # '' = W&B's default (WANDB_MODE, else online).
RUN_ID_FILE = 'wandb_run_id.txt'


def _import_wandb():
  try:
    import wandb  # pylint: disable=g-import-not-at-top  # An optional dependency.
  except ImportError as e:
    raise ImportError(f'config.wandb.enabled=True needs the wandb package: {INSTALL_HINT}; '
                      'or set --config.wandb.enabled=False') from e
  return wandb


def flat_config(config) -> dict[str, Any]:
  """A ConfigDict or mapping as {'a.b': value}, tuples as lists (what W&B's config shows)."""
  tree = config.to_dict() if hasattr(config, 'to_dict') else dict(config)

  def plain(value):
    if isinstance(value, (tuple, list)):
      return [plain(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
      return value.tolist()
    return value

  flat = traverse_util.flatten_dict(tree, sep='.') if tree else {}
  return {k: plain(v) for k, v in flat.items()}


def settings(config) -> dict | None:
  """The checked `config.wandb` as wandb.init arguments (without id, dir, config), or None when disabled."""
  section = config.wandb
  if not section.enabled:
    return None
  mode = section.mode or ''
  if mode not in MODES:
    raise ValueError(f'config.wandb.mode={mode!r}: must be one of {MODES} ("" = W&B\'s default)')
  project = section.project
  if not project:
    raise ValueError('config.wandb.project is empty: set it to the W&B project to log to, e.g. mae-jax')
  tags = section.tags or ()
  if isinstance(tags, str):
    tags = [t for t in tags.split(',') if t]
  if not all(isinstance(t, str) for t in tags):
    raise ValueError(f'config.wandb.tags={tags!r}: must be strings')
  return {'project': project, 'entity': section.entity or None, 'name': section.name or None,
          'group': section.group or None, 'tags': list(tags) or None, 'mode': mode or None}


@config_tools.settings_check
def check(config) -> None:
  """Raises before training starts if W&B is enabled but misconfigured or not installed (every process)."""
  if settings(config) is not None:
    _import_wandb()


class WandbWriter(metric_writers.MetricWriter):
  """Logs to one W&B run: scalars, images, texts, histograms, hparams. Videos and audio are not logged."""

  def __init__(self, run, wandb_module):
    self._run = run
    self._wandb = wandb_module

  @property
  def run(self):
    return self._run

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._run.log({k: float(np.asarray(v)) for k, v in scalars.items()}, step=int(step))

  def write_images(self, step: int, images: Mapping[str, Any]):
    logged = {}
    for key, batch in images.items():
      batch = np.asarray(batch)
      if batch.dtype != np.uint8:  # clu's convention: floats in [0, 1].
        batch = np.round(np.clip(batch.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
      if batch.shape[-1] == 1:
        batch = batch[..., 0]
      logged[key] = [self._wandb.Image(image) for image in batch]
    self._run.log(logged, step=int(step))

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._run.log({k: str(v) for k, v in texts.items()}, step=int(step))

  def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None):
    num_buckets = num_buckets or {}
    self._run.log({k: self._wandb.Histogram(np.asarray(v).ravel(), num_bins=min(512, num_buckets.get(k, 64)))
                   for k, v in arrays.items()}, step=int(step))

  def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
    scalars = {k: v for k, v in values.items() if np.asarray(v).size == 1}
    if scalars:
      self.write_scalars(step, scalars)

  def write_videos(self, step: int, videos):
    pass  # wandb.Video needs moviepy; nothing here writes videos.

  def write_audios(self, step: int, audios, *, sample_rate: int):
    pass

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._run.config.update(flat_config(hparams), allow_val_change=True)

  def flush(self):
    pass  # W&B streams records as they are logged.

  def close(self):
    self._run.finish()


def _run_id(workdir: str) -> str:
  """The workdir's W&B run id (written on first use), so a resumed job continues its run."""
  path = fileio.join(workdir, RUN_ID_FILE)
  if fileio.exists(path):
    return fileio.read_text(path).strip()
  run_id = os.environ.get('WANDB_RUN_ID') or uuid.uuid4().hex[:8]
  fileio.write_text(path, run_id + '\n')
  return run_id


def maybe_create(config, workdir: str) -> metric_writers.MetricWriter | None:
  """A WandbWriter for this run on process 0 when config.wandb.enabled; None otherwise.

  Every process checks the settings and that wandb is installed (so all fail
  together, before training); only process 0 starts a run.
  """
  kwargs = settings(config)
  if kwargs is None:
    return None
  wandb = _import_wandb()
  if jax.process_index() > 0:
    return None
  kwargs['name'] = kwargs['name'] or os.path.basename(os.fspath(workdir).rstrip('/')) or None
  local_dir = None
  if not os.environ.get('WANDB_DIR') and not fileio.is_remote(workdir):
    local_dir = os.path.abspath(workdir)
    os.makedirs(local_dir, exist_ok=True)
  run = wandb.init(**kwargs, id=_run_id(workdir), resume='allow', dir=local_dir, config=flat_config(config))
  logging.info('Weights & Biases run %s (%s, project %s)', run.id, run.name, kwargs['project'])
  return WandbWriter(run, wandb)
