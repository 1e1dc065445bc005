"""Metric writers: clu's default writer (TensorBoard + logs) plus workdir/metrics.jsonl."""

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per logged step: {"step": N, "train/loss": ...}.

  Only prefixed metrics ('train/...', 'perf/...', 'eval/...') are kept, so clu's
  progress scalars (steps_per_sec, uptime) do not split a step into two lines.
  """

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items() if '/' in k})
    if len(record) == 1:
      return
    with open(self._path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + log lines + metrics.jsonl on process 0; log lines only elsewhere."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  default = metric_writers.create_default_writer(workdir, asynchronous=False)
  return metric_writers.MultiWriter([default, JsonlWriter(os.path.join(workdir, 'metrics.jsonl'))])


def read_jsonl(path: str) -> list[dict]:
  """Reads a metrics.jsonl file."""
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
