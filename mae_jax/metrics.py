"""Metric writers for local and gs:// workdirs: metrics part files, TensorBoard event parts, logs.

Object stores have no append, so nothing here appends: every file is written
whole through `mae_jax.fileio`.

- `workdir/metrics/part-{writer}-{first}-{seq}.jsonl`: one JSON object per
  logged step ({"step": N, "train/loss": ...}). A writer (named by its start
  time) of a run that starts after step `start_step` (-1 for a job that logs
  step 0, 0 for a new run, or the step a resumed run restored; when not given,
  the one before its first record) rewrites its current part whole at each
  write and starts a new part every `LINES_PER_PART` lines. Its parts are
  named by `first` = start_step + 1. `read_metrics(workdir)` reads the
  writers' parts in the order they were started; a later writer's parts
  replace every record from its `first` step on, so after a resume no step
  appears twice.
- `workdir/events.out.tfevents.*`: TensorBoard scalars, images and hparams,
  as write-once event files (one per flush), which TensorBoard reads as one run.

`python -m mae_jax.metrics WORKDIR` prints a run's last training record and
the last value of each evaluation (`--jsonl`: every record, one JSON line each).
"""

import argparse
import io
import json
import os
import re
import socket
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

from mae_jax import console  # Before clu imports TensorFlow: console sends its native lines to the log file.

# isort: split
from clu import metric_writers
from PIL import Image
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.record_writer import RecordWriter

from mae_jax import fileio, wandb_writer

METRICS_DIR = 'metrics'
LEGACY_FILE = 'metrics.jsonl'  # Workdirs written before the part files.
LINES_PER_PART = 500
_PART = re.compile(r'part-(\d+)-(\d+)-(\d+)\.jsonl$')  # writer (start time, ns), first step, seq


class _Storage:
  """Writes of one writer that a storage error does not end: the run trains on, the next write tries again.

  Metrics, TensorBoard events and pictures are written by process 0 alone: an
  error there (a gs:// hiccup, a full disk) must not stop one process of a
  multi-process job while the others wait for it. What was not written stays
  in memory and goes out with the next write that works.
  """

  def __init__(self):
    self.failing = False

  def write(self, write_fn, path: str, data) -> bool:
    try:
      write_fn(path, data)
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except  # Any storage client's error.
      if not self.failing:
        logging.warning('Could not write %s (%s: %s); training goes on, the next write tries again', path,
                        type(e).__name__, e)
      self.failing = True
      return False
    if self.failing:
      logging.warning('Writing %s works again', path)
    self.failing = False
    return True


class _NoOpWriter(metric_writers.MetricWriter):
  """The MetricWriter methods our writers do not use."""

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

  def write_scalars(self, step, scalars):
    pass

  def flush(self):
    pass

  def close(self):
    pass


class JsonlWriter(_NoOpWriter):
  """metrics/part-*.jsonl files of one writer start, each rewritten whole (see the module doc).

  Only prefixed metrics ('train/...', 'perf/...', 'eval/...') are kept, so clu's
  progress scalars (steps_per_sec, uptime) do not split a step into two lines.
  """

  def __init__(self, workdir: str, start_step: int | None = None):
    self._dir = fileio.join(workdir, METRICS_DIR)
    self._first = None if start_step is None else int(start_step) + 1
    self._writer_id = time.time_ns()  # Later writers supersede earlier ones.
    self._seq, self._lines = 0, []
    self._storage = _Storage()
    self._unwritten = []  # Full parts whose last write failed: (path, text), oldest first.

  def _part_path(self) -> str:
    return fileio.join(self._dir, f'part-{self._writer_id}-{self._first:010d}-{self._seq:05d}.jsonl')

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {'step': int(step)}
    record.update({k: float(np.asarray(v)) for k, v in scalars.items() if '/' in k})
    if len(record) == 1:
      return
    if self._first is None:
      self._first = record['step']
    if len(self._lines) >= LINES_PER_PART:
      if self._storage.failing:  # The full part's last write failed: keep it for the next write.
        self._unwritten.append((self._part_path(), '\n'.join(self._lines) + '\n'))
      self._seq, self._lines = self._seq + 1, []
    self._lines.append(json.dumps(record))
    while self._unwritten and self._storage.write(fileio.write_text, *self._unwritten[0]):
      self._unwritten.pop(0)
    self._storage.write(fileio.write_text, self._part_path(), '\n'.join(self._lines) + '\n')


def _parse(text: str, source: str) -> list[dict]:
  records = []
  for number, line in enumerate(text.splitlines(), 1):
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f'{source} line {number} is not JSON ({e}); was it written by another tool?') from e
  return records


def read_metrics(workdir: str) -> list[dict]:
  """Every logged record of a run's workdir, in step order, each step once (the latest run's record).

  Reads metrics/part-*.jsonl (and a metrics.jsonl of older workdirs first).
  """
  records = []
  legacy = fileio.join(workdir, LEGACY_FILE)
  if fileio.exists(legacy):
    records = _parse(fileio.read_text(legacy), legacy)
  groups = {}
  for path in fileio.glob(fileio.join(workdir, METRICS_DIR), 'part-*.jsonl'):
    match = _PART.search(path)
    if match:
      writer, first, seq = (int(g) for g in match.groups())
      groups.setdefault((writer, first), []).append((seq, path))
  for (_, first), parts in sorted(groups.items()):
    records = [r for r in records if r['step'] < first]  # A later writer replaces what it logs again.
    for _, path in sorted(parts):
      records.extend(_parse(fileio.read_text(path), path))
  return records


def _png(image: np.ndarray) -> tuple[bytes, int, int, int]:
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  channels = 1 if image.ndim == 2 else image.shape[-1]
  return buffer.getvalue(), image.shape[0], image.shape[1], channels


class TensorBoardWriter(_NoOpWriter):
  """TensorBoard event files written through fileio: one write-once file per flush.

  Events are buffered and written at `flush()`, `close()`, after images, or
  when the buffer is older than `flush_every_secs`.
  """

  def __init__(self, logdir: str, start_step: int | None = None, flush_every_secs: float = 60.0):
    self._logdir = logdir
    self._start = start_step
    # Named by start time (ns): TensorBoard reads a logdir's event files in name order, so a resumed
    # run's events come after the first run's and replace its steps from the resume on.
    self._prefix = f'events.out.tfevents.{time.time_ns()}.{socket.gethostname()}.{os.getpid()}'
    self._flush_every = flush_every_secs
    self._seq, self._buffer, self._since = 0, io.BytesIO(), None
    self._storage = _Storage()

  def _add(self, step: int | None, summary: summary_pb2.Summary) -> None:
    event = event_pb2.Event(wall_time=time.time(), summary=summary)
    if step is not None:
      event.step = int(step)
    if self._since is None:
      self._since = time.time()
      version = event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2')
      RecordWriter(self._buffer).write(version.SerializeToString())
      if self._start is not None:  # TensorBoard drops the earlier run's events after the restart step.
        restart = event_pb2.Event(wall_time=time.time(), step=self._start + 1,
                                  session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))
        RecordWriter(self._buffer).write(restart.SerializeToString())
        self._start = None
    RecordWriter(self._buffer).write(event.SerializeToString())

  def write_scalars(self, step, scalars):
    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(np.asarray(v))) for k, v in scalars.items()]
    self._add(step, summary_pb2.Summary(value=values))
    if time.time() - self._since >= self._flush_every:
      self.flush()

  def write_images(self, step, images):
    values = []
    for key, batch in images.items():
      for i, image in enumerate(np.asarray(batch)):
        png, height, width, channels = _png(image)
        tag = key if len(batch) == 1 else f'{key}/{i}'
        values.append(summary_pb2.Summary.Value(tag=tag, image=summary_pb2.Summary.Image(
            encoded_image_string=png, height=height, width=width, colorspace=channels)))
    self._add(step, summary_pb2.Summary(value=values))
    self.flush()

  def write_hparams(self, hparams):
    hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    self._add(0, hparams_summary.hparams_pb(hparams))

  def flush(self):
    if self._since is None:
      return
    path = fileio.join(self._logdir, f'{self._prefix}.{self._seq:05d}.v2')
    if self._storage.write(fileio.write_bytes, path, self._buffer.getvalue()):
      self._seq, self._buffer, self._since = self._seq + 1, io.BytesIO(), None
    # Else the events stay buffered (the file starts with its version record) and the next flush writes them.

  def close(self):
    self.flush()


def create_writer(workdir: str, start_step: int | None = None, config=None) -> metric_writers.MetricWriter:
  """Log lines everywhere; on process 0 also TensorBoard, metrics part files and W&B (config.wandb).

  `start_step` is the step the run starts from (a resumed run's restored step);
  None takes the step before the first record written.
  """
  tracker = None if config is None else wandb_writer.maybe_create(config, workdir)  # On every process.
  logging_writer = metric_writers.LoggingWriter()
  if jax.process_index() > 0:
    return logging_writer
  writers = [logging_writer, TensorBoardWriter(workdir, start_step), JsonlWriter(workdir, start_step)]
  return metric_writers.MultiWriter(writers + ([tracker] if tracker is not None else []))


def summary_lines(records: list[dict]) -> list[str]:
  """The last record with training metrics, and each evaluation metric's last value with its step."""
  lines = []
  train = [r for r in records if any(k.startswith(('train/', 'perf/')) for k in r)]
  if train:
    last = train[-1]
    lines.append(f'step {last["step"]}: ' + ', '.join(f'{k} {console.format_metric(k, float(v))}'
                                                      for k, v in sorted(last.items()) if k != 'step'))
  evals = {}
  for record in records:
    for key, value in record.items():
      if key.startswith('eval/'):
        evals[key] = (record['step'], value)
  by_step = {}
  for key, (step, value) in sorted(evals.items()):
    by_step.setdefault(step, []).append(f'{key} {console.format_metric(key, float(value))}')
  lines += [f'step {step}: ' + ', '.join(items) for step, items in sorted(by_step.items())]
  return lines


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m mae_jax.metrics',
                                   description="Prints a run's last training record and its last evaluations.")
  parser.add_argument('workdir', help='The run (local or gs://).')
  parser.add_argument('--jsonl', action='store_true', help='Every record instead, one JSON object per line.')
  args = parser.parse_args(argv)
  records = read_metrics(args.workdir)
  if not records:
    raise SystemExit(f'{args.workdir}: no metrics logged ({METRICS_DIR}/part-*.jsonl)')
  if args.jsonl:
    print('\n'.join(json.dumps(r, sort_keys=True) for r in records))
    return
  print(f'{args.workdir}: {len(records)} records, steps {records[0]["step"]}-{records[-1]["step"]}')
  print('\n'.join(summary_lines(records)))


if __name__ == '__main__':
  main()
