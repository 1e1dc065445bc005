"""The summary of a sweep: one row per run (its overrides, status, step, final metrics), and ROOT/sweep.json.

Written as markdown and CSV under the sweep's root by `launch.sweep`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
from collections.abc import Sequence
from typing import Any

from mae_jax import fileio
from mae_jax.config_tools import unknown_key_message

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


def run_values(sweep, keys: Sequence[str]) -> dict[str, list[Any]]:
  """{run name: the value of each key the run trained with}: its override, else the base config's value.

  A run that does not override a swept key ran the base config's value, and
  the summary shows it (a blank cell would read as "not set").
  """
  from configs import common as config_common  # pylint: disable=g-import-not-at-top
  values = {}
  base = config_common.load_config(sweep.base)
  for run in sweep.runs:
    config = config_common.set_overrides(copy.deepcopy(base), run.overrides)  # References follow the overrides.
    values[run.name] = [config_common.value_at(config, key) for key in keys]
  return values


def unknown_metrics(finals: dict[str, dict], metrics: Sequence[str]) -> str | None:
  """A message naming each metric in `metrics` that no run logged (with close matches), or None.

  None too when no run logged anything yet: then nothing tells a typo from a
  metric still to come.
  """
  logged = sorted({k for final in finals.values() for k in final if k != 'step'})
  missing = [m for m in metrics if m not in logged]
  if not logged or not missing:
    return None
  return '--metrics: ' + '; '.join(unknown_key_message(m, logged, 'metric') for m in missing)


def check_metrics(sweep, metrics: Sequence[str], read: bool = True) -> None:
  """Raises ValueError when a metric in `metrics` is one that no run of the sweep logged (see unknown_metrics).

  Only once every run is done: a run still to run or to resume may log it yet (an evaluation at its end), and
  a rerun to resume must not be refused. Otherwise the summary at the end checks it.
  """
  finished = read and metrics and all(is_done(run) for run in sweep.runs)
  message = unknown_metrics({run.name: read_metrics(run) for run in sweep.runs} if finished else {}, metrics)
  if message:
    raise ValueError(message)


def summary_rows(sweep, statuses: dict[str, str] | None = None, metrics: Sequence[str] = (),
                 read: bool = True) -> tuple[list[str], list[list[Any]]]:
  """(columns, rows): run, the value of each swept key it ran, status, step and the final metrics.

  Status: 'done' (DONE marker), this invocation's 'failed' / 'interrupted' / 'preempted',
  'incomplete' (metrics but no marker) or 'pending'; 'unknown' with
  read=False, which reads nothing from the workdirs. `metrics` picks metric
  columns; empty means all, train/loss first. A metric no run logged is a
  ValueError (see unknown_metrics).
  """
  statuses = statuses or {}
  finals = {run.name: read_metrics(run) if read else {} for run in sweep.runs}
  message = unknown_metrics(finals, metrics)
  if message:
    raise ValueError(message)
  if metrics:
    metric_keys = list(metrics)
  else:
    found = sorted({k for final in finals.values() for k in final if k != 'step'})
    metric_keys = [k for k in LEADING_METRICS if k in found] + [k for k in found if k not in LEADING_METRICS]
  override_keys = sweep.override_keys()
  values = run_values(sweep, override_keys)
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
    rows.append([run.name, *values[run.name], status, final.get('step'),
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


