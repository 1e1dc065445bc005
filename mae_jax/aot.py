"""Compile the real train step for a TPU slice on a CPU host: memory, FLOPs, step time.

`python -m mae_jax.aot --config=configs/FILE.py[:ARGS] --topology=v5e-256
[--num_slices=N] [--config.KEY=VAL] [--find_batch]`

With libtpu installed (`pip install "jax[tpu]"`), `get_topology_desc` gives
compile-only devices of any slice shape. The train step is the one the
trainer runs: for pretraining `pretrain_step.build_train_step` (as `train.train_and_evaluate`),
for a fine-tuning config (config.downstream='finetune', configs/finetune.py)
`finetune.build_train_step` (as `finetune.finetune`; mixup / cutmix, drop path,
layer decay; config.num_classes sets the head): mesh and partition rules from
config.mesh, dtype, remat, scan, gradient accumulation, donated state. It is
compiled with `.lower(...).compile()`: XLA's TPU compiler then reports per-chip
memory and a cost model, and refuses a program that does not fit in HBM with
RESOURCE_EXHAUSTED. Exits non-zero when the step does not fit.

Topology names: v4-N and v5p-N count TensorCores (2 per chip, one megacore
device per chip): v4-128 is 64 chips, "v4:4x4x4". v5e-N and v6e-N count chips:
v5e-256 is "v5e:16x16". A libtpu name such as "v5e:4x8" or "v4:4x4x12" is
accepted as it is. mae_jax.accelerators reads these names and holds the chip table.
"""

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from mae_jax import config_tools, console, finetune, parallel, pretrain_step, supervised, train_state
from mae_jax import flops as flops_lib
from mae_jax.accelerators import (  # noqa: F401  pylint: disable=unused-import
  GENERATION_ALIASES,
  TopologySpec,
  TpuUnavailableError,
  parse_topology,
  topology_devices,
  tpu_available,
)
from mae_jax.models import from_config

# Topologies live in accelerators; aot.parse_topology and the rest above stay importable from here.


class DoesNotFitError(RuntimeError):
  """The compiled step needs more HBM per chip than the chip has."""


# ----------------------------------------------------------------------------
# The train step, as train_and_evaluate builds it.

def _downstream(config: ml_collections.ConfigDict) -> str | None:
  """config.downstream (None for pretraining); only fine-tuning has a train step to compile."""
  kind = supervised.kind(config) if 'downstream' in config else None
  if kind not in (None, 'finetune'):
    raise ValueError(f'downstream={kind!r}: mae_jax.aot compiles pretraining configs and fine-tuning '
                     "configs (downstream='finetune', configs/finetune.py); linear probing and kNN are not "
                     'compiled here')
  return kind


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> pretrain_step.TrainStep:
  """The train step exactly as the trainer builds and runs it, for `mesh`.

  Pretraining: `pretrain_step.build_train_step`, as `train.train_and_evaluate` calls
  it; fine-tuning (config.downstream='finetune'): `finetune.build_train_step`,
  as `finetune.finetune` calls it (with config.num_classes). The same function,
  shardings and batch structure; only the schedule's length assumes ImageNet-1k.
  """
  if _downstream(config) == 'finetune':
    return finetune.build_train_step(config, mesh, pretrain_step.NOMINAL_TRAIN_EXAMPLES)
  return pretrain_step.build_train_step(config, mesh, pretrain_step.NOMINAL_TRAIN_EXAMPLES)


def train_flops_per_image(config: ml_collections.ConfigDict) -> float:
  """Analytic training FLOPs per image of the configured model (3 x forward, no remat recompute).

  Pretraining: flops.mae_train_flops; fine-tuning: flops.classifier_train_flops
  (patch embedding, the blocks over all 1 + L tokens, the head).
  """
  if _downstream(config) == 'finetune':
    return finetune.train_flops_per_image(config, finetune.config_num_classes(config))
  return pretrain_step.train_flops_per_image(from_config.build_mae(config), config.mask_ratio)


# ----------------------------------------------------------------------------
# Compile and report.

@dataclasses.dataclass
class AotReport:
  """What one compile says; memory figures are bytes per chip (per device)."""
  topology: str
  topology_name: str
  num_slices: int
  num_devices: int
  device_kind: str
  mesh_shape: dict
  model: str
  global_batch: int
  per_chip_batch: float
  grad_accum_steps: int
  dtype: str
  remat_policy: str
  scan_layers: bool
  fits: bool
  hbm_capacity_bytes: int  # usable per chip (the compiler's limit)
  hbm_nominal_bytes: int
  compile_seconds: float
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  total_bytes: int = 0  # arguments + temporaries + outputs not aliased to (donated) arguments + code
  flops_per_step_analytic: float = 0.0  # whole step, all chips (3x forward, no remat recompute)
  flops_per_device_compiled: float | None = None  # cost_analysis of the partitioned program
  bytes_accessed_per_device: float | None = None  # cost_analysis 'bytes accessed'
  # while loops that hold matmuls (scan_layers, grad accumulation): cost_analysis counts a body once.
  has_loops: bool = False
  # while loops without a matmul (mixup's jax.random.beta samples by rejection: a few scalars per
  # draw): counted once too, but negligible, so they do not stop the roofline.
  minor_loops: int = 0
  cost_model_step_seconds: float | None = None  # cost_analysis 'optimal_seconds', when positive
  # max(FLOPs / peak, bytes accessed / HBM bandwidth) from XLA's per-chip cost analysis, for programs
  # without matmul loops (has_loops False); it models neither communication nor its overlap, so it is
  # an estimate, not a bound.
  roofline_step_seconds: float | None = None
  step_seconds: float | None = None  # the estimate used below
  step_time_source: str = ''  # 'cost model' or 'roofline'
  images_per_sec: float | None = None  # global_batch / step_seconds
  mfu: float | None = None  # analytic FLOPs / step_seconds / (chips x peak)
  peak_flops_per_chip: float | None = None
  hbm_bandwidth_per_chip: float | None = None  # bytes/s
  error: str = ''  # the compiler's message when it refused the program

  def message(self) -> str:
    """One line: fits or does not, with the figures and what to try."""
    if self.fits:
      return (f'fits: {_gib(self.total_bytes)} <= {_gib(self.hbm_capacity_bytes)} per chip '
              f'({self.topology}, per-chip batch {self.per_chip_batch:g})')
    return f'does not fit: {_gib(self.total_bytes)} > {_gib(self.hbm_capacity_bytes)} per chip'

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def _gib(num_bytes: float) -> str:
  if 0 < abs(num_bytes) < 0.1 * flops_lib.GiB:
    return f'{num_bytes / 2**20:.1f} MiB'
  return f'{num_bytes / flops_lib.GiB:.2f} GiB'


def _flop(count: float) -> str:
  return f'{count / 1e12:.3f} TFLOP' if count >= 1e11 else f'{count / 1e9:.3f} GFLOP'


_EXHAUSTED = re.compile(r'\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)')
_UNITS = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def _parse_exhausted(message: str) -> tuple[int | None, int | None]:
  """(needed, available) bytes from a RESOURCE_EXHAUSTED message, when it says them."""
  match = _EXHAUSTED.search(message)
  if not match:
    return None, None
  needed, unit, available, unit2 = match.groups()
  return int(float(needed) * _UNITS[unit]), int(float(available) * _UNITS[unit2])


def _argument_bytes_per_device(step: pretrain_step.TrainStep) -> int:
  """Bytes of one device's shard of the state and the batch: a lower bound (TPU layouts pad to tiles)."""
  total = 0
  for tree, shardings in ((step.abstract_state, step.state_shardings),
                          (step.abstract_batch, step.batch_shardings)):
    for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
      total += math.prod(sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
  return total


_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$')
_CALLED = re.compile(r'\b(?:condition|body|calls|to_apply)=%?([\w.\-]+)')
_CALLED_LISTS = re.compile(r'\b(?:branch_computations|called_computations)=\{([^}]*)\}')
_WHILE = re.compile(r'\bwhile\(.*?\bbody=%?([\w.\-]+)')
_MATMUL = re.compile(r'\b(?:dot|convolution)\(')


def classify_loops(hlo_text: str) -> tuple[int, int]:
  """(while loops whose body reaches a matmul, while loops without one) in an HLO module's text.

  A body "reaches" what its instructions call (fusions, reductions,
  conditionals, nested loops). Matmul loops are scanned layers or accumulated
  micro-batches: XLA's cost analysis counts their body once, so the compiled
  FLOPs and bytes understate the step. Loops without a matmul (e.g. the
  rejection sampler of jax.random.beta) do a few scalars' work.
  """
  computations, current = {}, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = computations.setdefault(match.group(1), [])
    elif line.startswith('}'):
      current = None
    elif current is not None:
      current.append(line)
  calls = {name: set() for name in computations}
  direct = {}
  for name, lines in computations.items():
    text = '\n'.join(lines)
    calls[name].update(_CALLED.findall(text))
    for group in _CALLED_LISTS.findall(text):
      calls[name].update(part.strip().lstrip('%') for part in group.split(',') if part.strip())
    direct[name] = bool(_MATMUL.search(text))

  def has_matmul(name, seen):
    if name in seen or name not in computations:
      return False
    seen.add(name)
    return direct[name] or any(has_matmul(callee, seen) for callee in calls[name])

  heavy = light = 0
  for lines in computations.values():
    for body in _WHILE.findall('\n'.join(lines)):
      if has_matmul(body, set()):
        heavy += 1
      else:
        light += 1
  return heavy, light


def advice(config: ml_collections.ConfigDict, spec: TopologySpec | None = None) -> str:
  """What to change when a step does not fit, naming the config keys."""
  tips = []
  remat = config.model.remat_policy
  if remat == 'none':
    tips.append("--config.model.remat_policy=full (or 'dots')")
  elif remat != 'full':
    tips.append('--config.model.remat_policy=full')
  if str(config.model.dtype) == 'float32':
    tips.append('--config.model.dtype=bfloat16')
  fsdp = int(config.mesh.fsdp)
  if spec is not None and fsdp != -1 and fsdp < spec.chips_per_slice:
    tips.append(f'--config.mesh.fsdp={min(spec.chips_per_slice, max(2 * fsdp, 8))} (or -1 with mesh.data=1)')
  accum = int(config.grad_accum_steps)
  tips.append(f'--config.grad_accum_steps={2 * accum}')
  tips.append('a smaller batch (--find_batch finds the largest that fits)')
  return 'try ' + ', '.join(tips)


def compile_report(config: ml_collections.ConfigDict, spec: TopologySpec,
                   devices: Sequence[Any] | None = None, log=None, label: str | None = None) -> AotReport:
  """Compiles the train step of `config` for the slice; never raises for a program that is too big.

  log: called with one line ('Compiling LABEL for TOPOLOGY (per-chip batch N)...') once the
  settings are checked and the compile (minutes for a large model) starts; label: what the line
  names (default: the model).
  """
  devices = list(devices) if devices is not None else topology_devices(spec)
  mesh = parallel.create_mesh(config.mesh, devices)
  step = make_train_step(config, mesh)
  chip = flops_lib.tpu_chip(devices[0].device_kind) or spec.chip
  num_devices = len(devices)
  flops_step = train_flops_per_image(config) * config.batch_size
  report = AotReport(
      topology=spec.name, topology_name=spec.topology_name, num_slices=spec.num_slices,
      num_devices=num_devices, device_kind=devices[0].device_kind,
      mesh_shape={k: int(v) for k, v in mesh.shape.items()}, model=config.model.name,
      global_batch=config.batch_size, per_chip_batch=config.batch_size / num_devices,
      grad_accum_steps=int(config.grad_accum_steps), dtype=str(config.model.dtype),
      remat_policy=str(config.model.remat_policy),
      scan_layers=bool(config.model.scan_layers), fits=True,
      hbm_capacity_bytes=chip.hbm_usable_bytes, hbm_nominal_bytes=chip.hbm_bytes, compile_seconds=0.0,
      flops_per_step_analytic=flops_step, peak_flops_per_chip=chip.peak_flops,
      hbm_bandwidth_per_chip=chip.hbm_bandwidth)
  if log is not None:
    per_chip = config.batch_size / num_devices
    per_chip = int(per_chip) if per_chip == int(per_chip) else round(per_chip, 2)
    log(f'Compiling {label or config.model.name} for {spec.name} (per-chip batch {per_chip}, '
        f'global {config.batch_size})...')
  start = time.perf_counter()
  try:
    with train_state.mesh_context(mesh):
      compiled = step.jitted.lower(step.abstract_state, step.abstract_batch).compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if 'RESOURCE_EXHAUSTED' not in message and 'Ran out of memory' not in message:
      raise
    report.compile_seconds = time.perf_counter() - start
    needed, available = _parse_exhausted(message)
    report.fits = False
    report.error = message.splitlines()[0][:500]
    # The compiler names the temporaries only; the state and batch shards come on top.
    report.argument_bytes = _argument_bytes_per_device(step)
    report.temp_bytes = needed or 0
    report.total_bytes = report.argument_bytes + report.temp_bytes
    if available:
      report.hbm_capacity_bytes = available
    return report
  report.compile_seconds = time.perf_counter() - start

  memory = compiled.memory_analysis()
  report.argument_bytes = int(memory.argument_size_in_bytes)
  report.output_bytes = int(memory.output_size_in_bytes)
  report.alias_bytes = int(memory.alias_size_in_bytes)
  report.temp_bytes = int(memory.temp_size_in_bytes)
  report.code_bytes = int(memory.generated_code_size_in_bytes)
  report.total_bytes = (report.argument_bytes + report.temp_bytes + report.output_bytes
                        - report.alias_bytes + report.code_bytes)
  report.fits = report.total_bytes <= report.hbm_capacity_bytes

  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  cost = cost or {}
  heavy_loops, report.minor_loops = classify_loops(compiled.as_text() or '')
  report.has_loops = heavy_loops > 0
  if cost.get('flops'):
    report.flops_per_device_compiled = float(cost['flops'])
  if cost.get('bytes accessed'):
    report.bytes_accessed_per_device = float(cost['bytes accessed'])
  seconds = cost.get('optimal_seconds')
  if seconds is not None and seconds > 0:  # the TPU cost model gives a negative time for large programs
    report.cost_model_step_seconds = float(seconds)
    report.step_seconds, report.step_time_source = report.cost_model_step_seconds, 'cost model'
  if not report.has_loops and report.flops_per_device_compiled and report.bytes_accessed_per_device:
    report.roofline_step_seconds = max(report.flops_per_device_compiled / chip.peak_flops,
                                       report.bytes_accessed_per_device / chip.hbm_bandwidth)
    if report.step_seconds is None:
      report.step_seconds, report.step_time_source = report.roofline_step_seconds, 'roofline'
  if report.step_seconds:
    report.images_per_sec = config.batch_size / report.step_seconds
    report.mfu = flops_step / report.step_seconds / (num_devices * chip.peak_flops)
  return report


def format_report(report: AotReport) -> str:
  """A human-readable block: the slice, per-chip memory, FLOPs and cost-model speed."""
  def opt(value, fmt):
    return 'n/a' if value is None else fmt.format(value)
  lines = [
      (f'topology        {report.topology} = {report.topology_name} x {report.num_slices} slice(s): '
      f'{report.num_devices} x {report.device_kind}'),
      f'mesh            {report.mesh_shape}',
      (f'model           {report.model} dtype={report.dtype} remat={report.remat_policy} '
      f'scan_layers={report.scan_layers}'),
      (f'batch           global {report.global_batch} = {report.per_chip_batch:g} per chip, '
      f'grad_accum_steps={report.grad_accum_steps}'),
      f'compile         {report.compile_seconds:.1f} s',
  ]
  if report.error:
    lines.append(f'compiler        {report.error}')
  else:
    lines += [
        (f'HBM per chip    arguments {_gib(report.argument_bytes)}, temporaries {_gib(report.temp_bytes)}, '
         f'outputs {_gib(report.output_bytes)} (aliased to donated arguments {_gib(report.alias_bytes)}), '
         f'code {_gib(report.code_bytes)}'),
        (f'HBM total       {_gib(report.total_bytes)} of {_gib(report.hbm_capacity_bytes)} usable '
        f'({_gib(report.hbm_nominal_bytes)} nominal): {100 * report.total_bytes / report.hbm_capacity_bytes:.0f}%'),
        f'FLOPs per step  analytic {_flop(report.flops_per_step_analytic)} all chips = '
        f'{_flop(report.flops_per_step_analytic / report.num_devices)} per chip; compiled '
        f'{_flop(report.flops_per_device_compiled) if report.flops_per_device_compiled else "n/a"} '
        f'per chip' + (' (while-loop bodies counted once)' if report.has_loops else ''),
    ]
    if report.minor_loops:
      lines.append(f'loops           {report.minor_loops} while loop(s) without matmuls (e.g. mixup\'s '
                   'jax.random.beta sampler): counted once by the cost analysis, a few scalars of work, '
                   'neglected: a roofline is computed all the same')
    if report.bytes_accessed_per_device and report.flops_per_device_compiled:
      intensity = report.flops_per_device_compiled / report.bytes_accessed_per_device
      line = f'HBM traffic     {report.bytes_accessed_per_device / 1e9:.1f} GB accessed per chip per step'
      line += ' (while-loop bodies counted once)' if report.has_loops else ''
      line += f': {intensity:.0f} FLOP/byte'
      if report.peak_flops_per_chip and report.hbm_bandwidth_per_chip:
        line += f', compute-bound above {report.peak_flops_per_chip / report.hbm_bandwidth_per_chip:.0f}'
      lines.append(line)
    if report.step_seconds:
      bound = ('max(FLOPs / peak, bytes accessed / HBM bandwidth), communication not modelled'
               if report.step_time_source == 'roofline' else 'TPU cost model')
      lines.append(
          f'step time       {report.step_seconds * 1e3:.1f} ms ({report.step_time_source}: {bound}) -> '
          f'{report.images_per_sec:,.0f} images/s ({report.images_per_sec / report.num_devices:.1f} per chip), '
          f'MFU {100 * report.mfu:.1f}% of {report.peak_flops_per_chip / 1e12:.0f} TFLOP/s per chip')
    else:
      lines.append('step time       n/a: the TPU cost model gave no positive time and the program has while '
                   'loops (scan_layers / grad accumulation), so no roofline either; set '
                   '--config.model.scan_layers=False --config.grad_accum_steps=1 for a roofline bound')
  lines.append(report.message())
  return '\n'.join(lines)


def with_per_chip_batch(config: ml_collections.ConfigDict, per_chip: int, num_devices: int):
  """A copy of config with batch_size = per_chip x devices; grad_accum_steps must divide per_chip."""
  accum = int(config.grad_accum_steps)
  if per_chip % accum:
    raise ValueError(f'--per_chip_batch={per_chip} with grad_accum_steps={accum}: each micro-batch would hold '
                     f'{per_chip / accum:g} images per chip; give a multiple of {accum}, or set '
                     '--config.grad_accum_steps')
  config = ml_collections.ConfigDict(config.to_dict())
  config.batch_size = int(per_chip * num_devices)
  return config


def find_batch(config: ml_collections.ConfigDict, spec: TopologySpec, devices=None, *, start: int = 1,
               limit: int = 4096, log=print) -> tuple[int, AotReport | None]:
  """Largest per-chip batch up to `limit` whose step fits: doubling from `start`, then bisection.

  With grad_accum_steps=k only multiples of k are tried (each micro-batch
  holds a whole number of images per chip). Returns (per-chip batch, its
  report), or (0, None) when not even the first candidate fits.
  """
  devices = list(devices) if devices is not None else topology_devices(spec)
  n = len(devices)
  unit = max(1, int(config.grad_accum_steps))
  reports = {}

  def fits(k):  # k micro-batch images per chip.
    report = compile_report(with_per_chip_batch(config, k * unit, n), spec, devices)
    reports[k] = report
    log(f'per-chip batch {k * unit:5d}: {report.message()} (compile {report.compile_seconds:.0f} s)')
    return report.fits

  good, bad = 0, None
  candidate, top = max(1, -(-start // unit)), limit // unit
  while candidate <= top:
    if fits(candidate):
      good, candidate = candidate, candidate * 2
    else:
      bad = candidate
      break
  if good == 0:
    return 0, None
  bad = top + 1 if bad is None else bad  # All fitted up to the limit: the rest of it is still tried.
  while bad - good > 1:
    middle = (good + bad) // 2
    if fits(middle):
      good = middle
    else:
      bad = middle
  return good * unit, reports[good]


# ----------------------------------------------------------------------------
# Command line.

FLAGS = flags.FLAGS


def define_flags():
  """The command line of `python -m mae_jax.aot` (not defined on import: this module is a library too)."""
  console.define_flags()  # --verbose.
  flags.adopt_module_key_flags(console)  # Listed by --help.
  config_tools.define_config_flag('Experiment config file (configs/FILE.py[:ARGS]).', lock_config=False)
  flags.DEFINE_string('topology', None, 'TPU slice: v5e-256, v4-128, v5p-512, v6e-64 or v5e:16x16.')
  flags.DEFINE_integer('num_slices', 1, 'Slices joined over DCN (mesh.dcn_data follows).')
  flags.DEFINE_bool('find_batch', False, 'Search the largest per-chip batch that fits.')
  flags.DEFINE_integer('max_batch', 4096, 'Largest per-chip batch --find_batch tries.')
  flags.DEFINE_integer('per_chip_batch', None, 'Set batch_size = this x chips (overrides config.batch_size; a '
                       'multiple of config.grad_accum_steps).')
  flags.DEFINE_string('json_out', None, 'Also write the report(s) as JSON here.')
  flags.mark_flags_as_required(['config', 'topology'])  # A missing one: one line and exit 2 (parse_flags).


def _say(line: str) -> None:
  """A progress line on stderr (stdout holds the report)."""
  sys.stderr.write(line + '\n')
  sys.stderr.flush()


def main(argv):
  if len(argv) > 1:
    sys.stderr.write(f'error: unexpected arguments {argv[1:]} (flags are --name=value)\n')
    sys.exit(2)
  if FLAGS.config is None or FLAGS.topology is None:  # Flags set to None explicitly: as when missing.
    sys.stderr.write('error: --config and --topology are required\n')
    sys.exit(2)
  console.setup('aot')  # Library INFO logs to $TMPDIR/mae_jax_logs/ (no workdir); --verbose shows them here.
  if not os.environ.get('JAX_PLATFORMS'):
    # Compile-only TPU devices need no TPU backend: do not look for chips (nor take libtpu's lockfile).
    jax.config.update('jax_platforms', 'cpu')
  config = FLAGS.config
  try:
    spec = parse_topology(FLAGS.topology, FLAGS.num_slices)
    devices = topology_devices(spec)
  except (ValueError, TpuUnavailableError) as e:
    sys.exit(f'error: {e}')
  try:
    if FLAGS.per_chip_batch:
      config = with_per_chip_batch(config, FLAGS.per_chip_batch, len(devices))
    label = config_tools.config_flag_overrides(sys.argv)[0] or config.model.name
    if FLAGS.find_batch:
      _say(f'Searching the largest per-chip batch of {label} that fits on {spec.name} (one compile per try)...')
      best, report = find_batch(config, spec, devices, limit=FLAGS.max_batch)
      if report is None:
        sys.exit(f'error: not even a per-chip batch of {config.grad_accum_steps} fits on {spec.name}; '
                 f'{advice(config, spec)}')
      reached = best + config.grad_accum_steps > FLAGS.max_batch
      print(f'largest per-chip batch that fits on {spec.name}: {best} (global {best * len(devices)})'
            + (f'; --max_batch={FLAGS.max_batch} reached: a larger one may fit too' if reached else ''))
    else:
      report = compile_report(config, spec, devices, log=_say, label=label)
  except ValueError as e:
    hint = ''
    if str(e).startswith('batch_size=') and not FLAGS.find_batch:
      hint = (f'; for {len(devices)} chips set --per_chip_batch=N (batch_size = N x {len(devices)}) '
              f'or --config.batch_size to a multiple of the data-parallel size')
    sys.exit(f'error: {e}{hint}')
  print(format_report(report))
  if FLAGS.json_out:
    with open(FLAGS.json_out, 'w', encoding='utf-8') as f:
      json.dump(report.to_dict(), f, indent=2)
  if not report.fits:
    sys.exit(f'error: {report.message()} on {spec.name}; {advice(config, spec)}')


def run():
  define_flags()
  app.run(main, flags_parser=config_tools.parse_flags)


if __name__ == '__main__':
  run()
