r"""The GPU benchmark suite's driver: runs each benchmark under a timeout and writes one markdown table.

  python benchmarks/gpu_suite.py [--out=benchmarks/gpu_results.md] [--budget_s=480] [--only=train,speedup]
  python benchmarks/gpu_suite.py --dry_run        # prints the commands, runs nothing
  python benchmarks/gpu_suite.py --cpu_smoke      # the whole suite on the CPU with the tiny model

`benchmarks/gpu_suite.sh` sets up the environment and calls this. Every row is
its own process with its own timeout (never past the suite's time budget); a
row that fails, times out or finds no time left is marked so in the table and
the suite goes on. Each benchmark writes its figures as JSON (`--json_out`),
from which the table is made; the logs stay in --workdir.

Importing this module needs only the standard library, so arguments are checked
(and --dry_run answered) before the environment is set up.
"""

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, 'benchmarks')
GROUPS = ('train', 'speedup', 'vs_pytorch')
MIN_ROW_SECONDS = 20  # A row is not started with less of the budget left.
TABLE_HEADER = ('| benchmark | configuration | step ms | images/s | TFLOP/s/device | MFU | details | status |\n'
                '|---|---|---|---|---|---|---|---|')


@dataclasses.dataclass
class Row:
  """One benchmark process: what it runs, how long it may take, where it writes its figures."""
  name: str  # file-safe id, e.g. train_B
  group: str  # one of GROUPS
  label: str  # the table's first column
  argv: list
  timeout_s: int
  json_path: str = ''
  env: dict = dataclasses.field(default_factory=dict)


def plan(workdir: str, cpu_smoke: bool = False, python: str = sys.executable) -> list[Row]:
  """The suite's rows: train-step throughput of B/16, L/16, H/14, the MAE speedup, mae_jax vs PyTorch."""
  script = lambda name: os.path.join(BENCH, name)
  rows = []
  if cpu_smoke:  # The plumbing on a CPU in about a minute: the tiny model, float32, XLA attention.
    common = ['--dtype=float32', '--attention_impl=xla']
    train = [('tiny', 'ViT-Ti/16', 2)]
    speedup = ['--model=tiny', '--batch=2', '--rounds=1', '--decoder_depths=1']
    vs_pytorch = ['--model=tiny', '--batch=2', '--rounds=1', '--warmup=1', '--skip_compile']
    timeouts = dict(train=120, speedup=180, vs_pytorch=180)
  else:  # bfloat16, cuDNN attention, per-GPU batches of a pod run.
    common = ['--dtype=bfloat16', '--attention_impl=cudnn']
    train = [('B', 'ViT-B/16', 256), ('L', 'ViT-L/16', 128), ('H', 'ViT-H/14', 64)]
    # Scanned blocks: three ViT-L programs compile in a fraction of the unrolled time; the ratio is what counts.
    speedup = ['--model=L', '--batch=64', '--rounds=3', '--decoder_depths=8,1', '--scan']
    vs_pytorch = ['--model=b16', '--batch=64', '--rounds=5']
    timeouts = dict(train_B=100, train_L=130, train_H=180, speedup=200, vs_pytorch=240)
  for model, label, batch in train:
    name = f'train_{model}'
    rows.append(Row(name, 'train', f'train step {label}', [
        python, script('bench_train_step.py'), f'--models={model}', f'--batch={batch}',
        f'--steps={2 if cpu_smoke else 10}', *common], timeouts.get(name, timeouts.get('train'))))
  rows.append(Row('speedup', 'speedup', 'MAE vs mask tokens in the encoder',
                  [python, script('bench_speedup.py'), *speedup, *common], timeouts['speedup']))
  rows.append(Row('vs_pytorch', 'vs_pytorch', 'mae_jax vs PyTorch',
                  [python, script('bench_vs_pytorch.py'), *vs_pytorch, *common], timeouts['vs_pytorch'],
                  env={'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}))
  # The largest model (the longest compile) runs last, so that a slow compile leaves the other rows their time.
  rows.sort(key=lambda row: row.name == 'train_H')
  for row in rows:
    row.json_path = os.path.join(workdir, f'{row.name}.json')
    row.argv.append(f'--json_out={row.json_path}')
    row.env.setdefault('PYTHONUNBUFFERED', '1')
    # This checkout's mae_jax and configs, also where they are not installed (an image's own Python).
    row.env['PYTHONPATH'] = os.pathsep.join([REPO, *filter(None, [os.environ.get('PYTHONPATH')])])
    if cpu_smoke:
      row.env['JAX_PLATFORMS'] = 'cpu'
  return rows


# cuDNN's fused attention, forward and backward, at the suite's shapes (tokens, heads, head dim: the encoders'
# and decoders' of B/16, L/16 and H/14), in bfloat16: a cuDNN that refuses them (a new CUDA or driver) would
# fail every row, so the rows then run XLA's attention and the table says so.
CUDNN_PREFLIGHT = '''
import jax, jax.numpy as jnp
for tokens, heads, dim in [(50, 12, 64), (50, 16, 64), (65, 16, 80), (197, 16, 32), (257, 16, 32)]:
  x = jnp.ones((2, tokens, heads, dim), jnp.bfloat16)
  loss = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='cudnn').astype(jnp.float32).sum()
  jax.block_until_ready(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, x, x))
'''


def cudnn_preflight(python: str, timeout_s: float = 180) -> str:
  """'' when cuDNN attention runs at the suite's shapes in `python`'s JAX, else why not (one line)."""
  try:
    result = subprocess.run([python, '-c', CUDNN_PREFLIGHT], capture_output=True, text=True, timeout=timeout_s,
                            cwd=REPO)
  except subprocess.TimeoutExpired:
    return f'timed out after {timeout_s:.0f} s'
  except OSError as e:
    return f'could not start: {e}'
  return '' if result.returncode == 0 else last_error_line(result.stdout + result.stderr)


def use_xla_attention(rows: list[Row]) -> None:
  """The rows run XLA's attention instead of cuDNN's."""
  for row in rows:
    row.argv = ['--attention_impl=xla' if arg == '--attention_impl=cudnn' else arg for arg in row.argv]


def command_line(row: Row) -> str:
  env = ' '.join(f'{k}={shlex.quote(v)}' for k, v in sorted(row.env.items()))
  return f'timeout {row.timeout_s}s env {env} {shlex.join(row.argv)}'


# ----------------------------------------------------------------------------
# Running.

def last_error_line(log: str) -> str:
  """The most telling line of a failed benchmark's output: its last exception or error line, else the last line."""
  lines = [line.strip() for line in log.splitlines() if line.strip()]
  for line in reversed(lines):
    if any(word in line for word in ('Error', 'error:', 'Exception', 'failed', 'Killed')):
      return line[:240]
  return lines[-1][:240] if lines else 'no output'


def run_row(row: Row, timeout_s: float, log_path: str) -> dict:
  """Runs one row in its own process group; returns {'status', 'reason', 'data', 'seconds'}."""
  start = time.monotonic()
  env = {**os.environ, **row.env}
  with open(log_path, 'w', encoding='utf-8') as log:
    log.write(f'$ {command_line(row)}\n')
    log.flush()
    try:
      proc = subprocess.Popen(row.argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                              start_new_session=True)
    except OSError as e:
      return dict(status='failed', reason=f'could not start: {e}', data=None, seconds=0.0)
    try:
      rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      rc = None
  seconds = time.monotonic() - start
  with open(log_path, encoding='utf-8', errors='replace') as f:
    output = f.read()
  if rc is None:
    return dict(status='failed', reason=f'timed out after {timeout_s:.0f} s', data=None, seconds=seconds)
  data = None
  if os.path.exists(row.json_path):
    with open(row.json_path, encoding='utf-8') as f:
      data = json.load(f)
  if rc != 0:
    return dict(status='failed', reason=f'exit code {rc}: {last_error_line(output)}', data=data, seconds=seconds)
  if data is None:
    return dict(status='failed', reason='exited 0 but wrote no figures', data=None, seconds=seconds)
  return dict(status='ok', reason='', data=data, seconds=seconds)


def run_suite(rows: list[Row], workdir: str, budget_s: float, echo=print,
              min_row_s: float = MIN_ROW_SECONDS) -> list[dict]:
  """Runs the rows in order within budget_s seconds overall; every row gets a result."""
  deadline = time.monotonic() + budget_s
  results = []
  for row in rows:
    left = deadline - time.monotonic()
    result = dict(name=row.name, group=row.group, label=row.label, command=command_line(row))
    if left < min_row_s:
      result.update(status='skipped', reason=f'the suite\'s {budget_s:.0f} s budget was spent', data=None,
                    seconds=0.0)
    else:
      timeout = min(row.timeout_s, left)
      echo(f'[{row.name}] {command_line(row)}  (timeout {timeout:.0f} s)', flush=True)
      result.update(run_row(row, timeout, os.path.join(workdir, f'{row.name}.log')))
    echo(f'[{row.name}] {result["status"]} in {result["seconds"]:.0f} s {result["reason"]}', flush=True)
    results.append(result)
  return results


# ----------------------------------------------------------------------------
# The table.

def _fmt(value, spec: str, suffix: str = '') -> str:
  return '' if value is None else f'{value:{spec}}{suffix}'


def _config(data: dict, *keys) -> str:
  names = dict(batch_per_device='batch/device', batch='batch', dtype='', attention_impl='attention',
               scan_layers='scan', remat='remat')
  parts = []
  for key in keys:
    if key in data and data[key] not in (None, False, 'none'):
      parts.append(f'{names.get(key, key)} {data[key]}'.strip() if data[key] is not True else names.get(key, key))
  return ', '.join(parts)


def table_rows(result: dict) -> list[str]:
  """The markdown rows of one benchmark's result; a failed or skipped one is one row that says why."""
  data, status = result.get('data'), result['status']
  mark = 'ok' if status == 'ok' else f'**{status}**: {result.get("reason", "")}'.replace('|', '/')
  if status != 'ok' or not data:
    return [f'| {result["label"]} | | | | | | | {mark} |']
  out = []
  if data['benchmark'] == 'train_step':
    for r in data['rows']:
      conf = _config(r, 'batch_per_device', 'dtype', 'attention_impl', 'remat', 'scan_layers')
      if 'skipped' in r:
        out.append(f'| {result["label"]} | {conf} | | | | | | **skipped**: {r["skipped"]} |')
        continue
      details = f'compile {r["compile_s"]:.0f} s, {r["memory_gib_per_device"]:.1f} GiB/device'
      out.append(f'| {result["label"]} ({r["model"]}) | {conf} | {r["step_ms"]:.1f} | {r["images_per_s"]:.1f} '
                 f'| {r["tflops_per_device"]:.3g} | {_fmt(r.get("mfu") and 100 * r["mfu"], ".1f", "%")} '
                 f'| {details} | {mark} |')
  elif data['benchmark'] == 'speedup':
    conf = _config(data, 'batch_per_device', 'dtype', 'attention_impl', 'scan_layers')
    for r in data['rows']:
      paper = f', paper {r["paper"]}x' if r.get('paper') else ''
      out.append(f'| {result["label"]} ({data["model"]}, decoder depth {r["decoder_depth"]}) | {conf} '
                 f'| {r["mae_step_ms"]:.1f} | | | | speedup {r["speedup"]:.2f}x over {data["baseline_step_ms"]:.1f} ms '
                 f'(FLOP ratio {r["flop_ratio"]:.2f}x{paper}) | {mark} |')
  elif data['benchmark'] == 'vs_pytorch':
    conf = _config(data, 'batch', 'dtype', 'attention_impl')
    stats = data['stats']
    torch = [f'{name} {stats[name]["median_ms"]:.1f} ms' for name in ('torch_eager', 'torch_compile') if name in stats]
    torch += [f'{name} failed ({error})'.replace('|', '/') for name, error in data.get('errors', {}).items()]
    ratio = (f'; {data["faster_torch"]} / mae_jax = {data["ratio"]:.2f}x' if data.get('ratio') else '')
    jax_ms = stats.get('mae_jax', {}).get('median_ms')
    images = _fmt(jax_ms and 1e3 * data['batch'] / jax_ms, '.1f')
    out.append(f'| {result["label"]} ({data["model"]}) | {conf} | {_fmt(jax_ms, ".1f")} | {images} | | '
               f'| {", ".join(torch)}{ratio} | {mark} |')
  else:
    out.append(f'| {result["label"]} | | | | | | unknown benchmark {data["benchmark"]!r} | {mark} |')
  return out


def render(meta: dict, results: list[dict]) -> str:
  """The results file: title, machine and date, then one table with a row per figure (failed rows marked)."""
  lines = [f'# GPU benchmark suite, {meta["date"]}', '',
           f'- machine: {meta["machine"]}',
           f'- software: {meta["software"]}',
           f'- code: {meta["commit"]}',
           f'- command: `{meta["command"]}`',
           *([f'- note: {meta["note"]}'] if meta.get('note') else []), '',
           TABLE_HEADER]
  for result in sorted(results, key=lambda r: GROUPS.index(r['group']) if r['group'] in GROUPS else len(GROUPS)):
    lines += table_rows(result)
  failed = [r['name'] for r in results if r['status'] != 'ok']
  lines += ['', f'{len(results) - len(failed)} of {len(results)} benchmarks ok'
            + (f'; not ok: {", ".join(failed)} (logs in {meta["workdir"]})' if failed else '') + '.', '']
  return '\n'.join(lines)


# ----------------------------------------------------------------------------
# The machine.

def _output(argv: list[str]) -> str:
  try:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def machine_meta(python: str, workdir: str, command: str) -> dict:
  gpus = _output(['nvidia-smi', '--query-gpu=name,memory.total,driver_version', '--format=csv,noheader'])
  gpu_text = '; '.join(gpus.splitlines()) if gpus else 'no nvidia-smi'
  versions = _output([python, '-c', 'import jax, sys; import importlib.metadata as m\n'
                      'def v(p):\n  try: return m.version(p)\n  except Exception: return "-"\n'
                      'print(f"python {sys.version.split()[0]}, jax {jax.__version__}, jaxlib {v(\'jaxlib\')}, '
                      'torch {v(\'torch\')}, transformers {v(\'transformers\')}, backend {jax.default_backend()}, '
                      '{jax.device_count()} x {jax.devices()[0].device_kind}")'])
  commit = _output(['git', '-C', REPO, 'rev-parse', '--short', 'HEAD'])
  dirty = _output(['git', '-C', REPO, 'status', '--porcelain', '--untracked-files=no'])
  return dict(date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
              machine=f'{gpu_text}; {os.cpu_count()} CPU cores',
              software=versions or f'{python}: jax not importable',
              commit=(commit or 'unknown') + (' (with uncommitted changes)' if dirty else ''),
              command=command, workdir=workdir)


def write_text(path: str, text: str) -> None:
  # mae_jax (and so jax) is imported only here: argument checks and --dry_run run before the setup.
  # This checkout's, as the rows import it, also where it is not installed.
  if REPO not in sys.path:
    sys.path.insert(0, REPO)
  from mae_jax import fileio  # pylint: disable=g-import-not-at-top
  fileio.write_text(path, text)


# ----------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='gpu_suite', description='GPU benchmark suite of mae_jax: train-step throughput and MFU (B/16, '
      'L/16, H/14, bfloat16, cuDNN attention), the MAE speedup, mae_jax vs PyTorch; one markdown table.')
  parser.add_argument('--out', default=os.path.join('benchmarks', 'gpu_results.md'),
                      help='Markdown file to write (local or gs://); default benchmarks/gpu_results.md.')
  parser.add_argument('--workdir', default='', help='Logs and JSON figures (default: a new folder under /tmp).')
  parser.add_argument('--budget_s', type=float, default=480.0,
                      help='Seconds for all benchmarks together (setup excluded); default 480.')
  parser.add_argument('--only', default=','.join(GROUPS), help=f'Comma-separated subset of {",".join(GROUPS)}.')
  parser.add_argument('--python', default=sys.executable,
                      help='Interpreter that runs the benchmarks (default: this one).')
  parser.add_argument('--dry_run', action='store_true', help='Print the commands and exit.')
  parser.add_argument('--cpu_smoke', action='store_true',
                      help='Run the whole suite on the CPU with the tiny model (checks the plumbing).')
  parser.add_argument('--check_args', action='store_true', help=argparse.SUPPRESS)  # gpu_suite.sh's first call
  args = parser.parse_args(argv)
  only = [g.strip() for g in args.only.split(',') if g.strip()]
  unknown = sorted(set(only) - set(GROUPS))
  if unknown or not only:
    parser.error(f'--only={args.only}: must be a comma-separated subset of {",".join(GROUPS)}')
  if args.budget_s <= 0:
    parser.error(f'--budget_s={args.budget_s}: must be positive')
  args.only = only
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.check_args:
    return 0
  workdir = args.workdir or (os.path.join(tempfile.gettempdir(), 'mae_jax_gpu_suite_'
                                          + datetime.datetime.now().strftime('%Y%m%d_%H%M%S')))
  rows = [row for row in plan(workdir, args.cpu_smoke, args.python) if row.group in args.only]
  if args.dry_run:
    if any('--attention_impl=cudnn' in row.argv for row in rows):
      print(f'# first: a cuDNN attention preflight ({args.python} -c ...); if it fails, the rows run '
            '--attention_impl=xla')
    for row in rows:
      print(command_line(row))
    print(f'# then: the table to {args.out}; logs and JSON in {workdir}')
    return 0
  os.makedirs(workdir, exist_ok=True)
  command = 'bash benchmarks/gpu_suite.sh ' + shlex.join(argv if argv is not None else sys.argv[1:])
  meta = machine_meta(args.python, workdir, command.strip())
  print(f'# {meta["machine"]}\n# {meta["software"]}\n# logs and JSON in {workdir}', flush=True)
  budget_s = args.budget_s
  if any('--attention_impl=cudnn' in row.argv for row in rows):
    start = time.monotonic()
    print('[preflight] cuDNN attention, forward and backward, at the suite\'s shapes', flush=True)
    error = cudnn_preflight(args.python, timeout_s=min(180.0, budget_s))
    budget_s -= time.monotonic() - start
    if error:
      use_xla_attention(rows)
      meta['note'] = f'cuDNN attention failed a preflight ({error}); every row ran XLA\'s attention instead'
    print(f'[preflight] {meta.get("note") or "ok"} ({time.monotonic() - start:.0f} s)', flush=True)
  results = run_suite(rows, workdir, budget_s)
  text = render(meta, results)
  write_text(os.path.join(workdir, 'results.json'), json.dumps({'meta': meta, 'results': results}, indent=1))
  write_text(args.out, text)
  print(text)
  print(f'written: {args.out}')
  return 0 if all(r['status'] == 'ok' for r in results) else 1


if __name__ == '__main__':
  sys.exit(main())
