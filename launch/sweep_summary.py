"""The summary of a sweep: one row per run (its overrides, status, step, final metrics), and ROOT/sweep.json.

Written as markdown and CSV under the sweep's root by `launch.sweep`.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from mae_jax import fileio

LEADING_METRICS = ('train/loss',)  # Shown first, when present.
DONE_MARKER = 'DONE'  # ROOT/NAME/DONE: the run finished; what it ran (json).

_join, _write_text = fileio.join, fileio.write_text


def done_record(run) -> dict | None:
  """What ROOT/NAME/DONE records (the step, the time, the settings), or None when the run is not done."""
  path = _join(run.workdir, DONE_MARKER)
  if not fileio.exists(path):
    return None
  try:
    record = json.loads(fileio.read_text(path) or '{}')
  except ValueError:
    record = {}
  return record if isinstance(record, dict) else {}


def is_done(run) -> bool:
  return done_record(run) is not None


def read_metrics(run) -> dict:
  """The last value of every metric the run logged ({} when there is none)."""
  from mae_jax import metrics  # pylint: disable=g-import-not-at-top
  final = {}
  for record in metrics.read_metrics(run.workdir):
    final.update(record)
  return final


def summary_rows(sweep, statuses: dict[str, str] | None = None, metrics: Sequence[str] = (),
                 read: bool = True) -> tuple[list[str], list[list[Any]]]:
  """(columns, rows): run, its overrides, status, step and the final metrics.

  Status: 'done' (DONE marker), this invocation's 'failed' / 'interrupted' / 'preempted',
  'incomplete' (metrics but no marker) or 'pending'; 'unknown' with
  read=False, which reads nothing from the workdirs. `metrics` picks metric
  columns; empty means all, train/loss first.
  """
  statuses = statuses or {}
  finals = {run.name: read_metrics(run) if read else {} for run in sweep.runs}
  if metrics:
    metric_keys = list(metrics)
  else:
    found = sorted({k for final in finals.values() for k in final if k != 'step'})
    metric_keys = [k for k in LEADING_METRICS if k in found] + [k for k in found if k not in LEADING_METRICS]
  override_keys = sweep.override_keys()
  columns = ['run', *override_keys, 'status', 'step', *metric_keys]
  rows = []
  for run in sweep.runs:
    final = finals[run.name]
    if not read:
      status = 'unknown'
    elif is_done(run):
      status = 'done'
    elif run.name in statuses:
      status = statuses[run.name]
    else:
      status = 'incomplete' if final else 'pending'
    rows.append([run.name, *(run.overrides.get(k) for k in override_keys), status, final.get('step'),
                 *(final.get(k) for k in metric_keys)])
  return columns, rows


def _cell(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4g}'
  return str(value)


def format_markdown(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table."""
  lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(_cell(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines) + '\n'


def format_csv(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(columns)
  writer.writerows([['' if v is None else v for v in row] for row in rows])
  return buffer.getvalue()


def write_summary(sweep, columns, rows) -> str:
  """Writes ROOT/summary.md and ROOT/summary.csv; returns the markdown."""
  markdown = format_markdown(columns, rows)
  _write_text(_join(sweep.root, 'summary.md'), f'# Sweep {sweep.spec}\n\nBase: `{sweep.base}`\n\n' + markdown)
  _write_text(_join(sweep.root, 'summary.csv'), format_csv(columns, rows))
  return markdown


def write_manifest(sweep) -> None:
  """ROOT/sweep.json: the spec, base config and every run's name, overrides and workdir."""
  record = {'sweep': sweep.spec, 'base': sweep.base,
            'runs': [{'name': r.name, 'overrides': r.overrides, 'workdir': r.workdir} for r in sweep.runs]}
  _write_text(_join(sweep.root, 'sweep.json'), json.dumps(record, indent=2, default=str) + '\n')


