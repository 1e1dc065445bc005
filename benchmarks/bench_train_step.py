r"""Train-step throughput of MAE ViT-Ti/B/L/H on the current backend, compile excluded.

  python benchmarks/bench_train_step.py --models=tiny,B,L,H [--batch=8] [--steps=5] [--json_out=rows.json]

Builds the step exactly as the trainer does (mae_jax.pretrain_step.build_train_step,
what mae_jax.aot compiles: mesh over all devices, partition rules, donated
state), on synthetic 224x224x3 images. Needs no TensorFlow (the GPU suite runs
it on images without it). Prints images/s, images/s per device, achieved analytic TFLOP/s per
device and MFU when the device's peak is known (not on CPU). A benchmark: it
prints figures and never fails on time.
"""

import contextlib
import json
import statistics
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

from configs import default
from mae_jax import fileio, flops, parallel, pretrain_step
from mae_jax.models import from_config

MODELS = {
    'tiny': 'mae_vit_tiny_patch16',
    'B': 'mae_vit_base_patch16',
    'L': 'mae_vit_large_patch16',
    'H': 'mae_vit_huge_patch14',
}
# Per-device batches: small on CPU so every model runs in minutes; pod-like elsewhere.
CPU_BATCH = {'tiny': 16, 'B': 4, 'L': 2, 'H': 1}
ACCELERATOR_BATCH = {'tiny': 256, 'B': 128, 'L': 64, 'H': 32}

FLAGS = flags.FLAGS


def define_flags():
  """Flags of this script (defined only when it is the program: the other benchmarks import it)."""
  flags.DEFINE_list('models', ['tiny', 'B', 'L', 'H'], f'Which of {list(MODELS)} (or full model names).')
  flags.DEFINE_integer('batch', None, 'Per-device batch for every model (default: by model and backend).')
  flags.DEFINE_integer('steps', 5, 'Timed steps per model (after one compile + warm-up step).')
  flags.DEFINE_string('dtype', None, 'Compute dtype (default float32 on CPU, bfloat16 elsewhere).')
  flags.DEFINE_string('remat', 'none', 'model.remat_policy: none | full | dots | dots_no_batch.')
  flags.DEFINE_bool('scan', False, 'model.scan_layers.')
  flags.DEFINE_float('mask_ratio', 0.75, 'Mask ratio.')
  flags.DEFINE_bool('encoder_mask_tokens', False, 'The ablation with mask tokens in the encoder.')
  flags.DEFINE_string('attention_impl', 'xla', 'model.attention_impl: xla | cudnn (GPU) | tpu_flash (TPU) | naive.')
  flags.DEFINE_string('json_out', '', 'Also write the rows as JSON to this file (local or gs://).')

def build_config(model: str, global_batch: int, *, dtype: str = 'float32', remat: str = 'none',
                 scan: bool = False, mask_ratio: float = 0.75, encoder_mask_tokens: bool = False,
                 decoder_depth: int | None = None, attention_impl: str = 'xla') -> ml_collections.ConfigDict:
  """The default config on synthetic ImageNet-shaped data with one model and batch."""
  config = default.get_config()
  config.model.name = MODELS.get(model, model)
  config.model.dtype = dtype
  config.model.remat_policy = remat
  config.model.scan_layers = scan
  config.model.encoder_mask_tokens = encoder_mask_tokens
  config.model.attention_impl = attention_impl
  if decoder_depth is not None:
    config.model.decoder_depth = decoder_depth
  config.dataset.name = 'synthetic'
  config.dataset.image_size = 224
  config.dataset.channels = 3
  config.batch_size = global_batch
  config.mask_ratio = mask_ratio
  config.mesh.data = -1
  config.mesh.fsdp = 1
  return config


class StepRunner:
  """A compiled train step with its state and one batch, ready to be timed.

  With keep_state=False only the executable is kept; `loaded()` initialises the
  state and batch for a `with` block and frees them after it, so several large
  models can be compiled up front and timed in turn within the host's memory.
  """

  def __init__(self, config: ml_collections.ConfigDict, devices=None, keep_state: bool = True):
    self.config = config
    mesh = parallel.create_mesh(config.mesh, devices)
    self.step = pretrain_step.build_train_step(config, mesh, pretrain_step.NOMINAL_TRAIN_EXAMPLES)
    self.num_devices = mesh.devices.size
    start = time.perf_counter()
    self.compiled = self.step.jitted.lower(self.step.abstract_state, self.step.abstract_batch).compile()
    self.compile_seconds = time.perf_counter() - start
    self.flops_per_image = pretrain_step.train_flops_per_image(from_config.build_mae(config), config.mask_ratio)
    self.state = self.batch = None
    if keep_state:
      self.load()

  def load(self):
    """Initialises the state and a synthetic batch, then runs one untimed warm-up step."""
    self.state = self.step.init_state()
    shape = self.step.abstract_batch['image'].shape
    images = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    host = {'image': images, 'corrupt': np.zeros(shape[:1], bool)}  # the trainer's batch keys
    self.batch = {key: jax.device_put(host[key], self.step.batch_shardings[key])
                  for key in self.step.abstract_batch}
    self.run(1)

  def unload(self):
    self.state = self.batch = None

  @contextlib.contextmanager
  def loaded(self):
    self.load()
    try:
      yield self
    finally:
      self.unload()

  def run(self, steps: int) -> list[float]:
    """Seconds of each of `steps` steps (each waits for its result)."""
    times = []
    for _ in range(steps):
      start = time.perf_counter()
      self.state, metrics = self.compiled(self.state, self.batch)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    return times

  def memory_gib(self) -> float:
    memory = self.compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes)
    return total / flops.GiB


def available_host_gib() -> float | None:
  """MemAvailable of this host (Linux), to skip a model whose step would not fit in RAM."""
  try:
    with open('/proc/meminfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024 / flops.GiB
  except OSError:
    pass
  return None


def describe_machine() -> str:
  device = jax.devices()[0]
  return f'{jax.device_count()} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}'


def main(argv):
  del argv
  backend = jax.default_backend()
  dtype = FLAGS.dtype or ('float32' if backend == 'cpu' else 'bfloat16')
  per_device_default = CPU_BATCH if backend == 'cpu' else ACCELERATOR_BATCH
  peak = flops.peak_flops_per_device()
  print(f'# {describe_machine()}; dtype {dtype}, remat {FLAGS.remat}, scan_layers {FLAGS.scan}, '
        f'attention {FLAGS.attention_impl}, mask ratio {FLAGS.mask_ratio}, '
        f'encoder mask tokens {FLAGS.encoder_mask_tokens}')
  print('| model | batch/device | devices | compile s | step ms (median) | images/s | images/s/device '
        '| TFLOP/s/device | MFU | memory GiB/device |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  rows = []
  settings = dict(dtype=dtype, remat=FLAGS.remat, scan_layers=FLAGS.scan, attention_impl=FLAGS.attention_impl,
                  mask_ratio=FLAGS.mask_ratio, encoder_mask_tokens=FLAGS.encoder_mask_tokens)
  for model in FLAGS.models:
    per_device = FLAGS.batch or per_device_default.get(model, 8)
    config = build_config(model, per_device * jax.device_count(), dtype=dtype, remat=FLAGS.remat,
                          scan=FLAGS.scan, mask_ratio=FLAGS.mask_ratio,
                          encoder_mask_tokens=FLAGS.encoder_mask_tokens, attention_impl=FLAGS.attention_impl)
    runner = StepRunner(config, keep_state=False)
    row = dict(model=config.model.name, batch_per_device=per_device, devices=runner.num_devices,
               compile_s=runner.compile_seconds, memory_gib_per_device=runner.memory_gib(), **settings)
    available = available_host_gib() if backend == 'cpu' else None
    if available is not None and runner.memory_gib() + 1.0 > available:
      row['skipped'] = (f'the step needs {runner.memory_gib():.1f} GiB, {available:.1f} GiB of host memory '
                        'available')
      print(f'| {config.model.name} | {per_device} | skipped: {row["skipped"]} | | | | | | | |', flush=True)
      rows.append(row)
      continue
    runner.load()
    times = runner.run(FLAGS.steps)
    seconds = statistics.median(times)
    images_per_sec = config.batch_size / seconds
    tflops = images_per_sec * runner.flops_per_image / runner.num_devices / 1e12
    mfu = tflops * 1e12 / peak if peak else None
    row.update(step_ms=1e3 * seconds, step_ms_all=[1e3 * t for t in times], images_per_s=images_per_sec,
               images_per_s_per_device=images_per_sec / runner.num_devices, tflops_per_device=tflops, mfu=mfu)
    rows.append(row)
    print(f'| {config.model.name} | {per_device} | {runner.num_devices} | {runner.compile_seconds:.1f} '
          f'| {1e3 * seconds:.0f} | {images_per_sec:.2f} | {images_per_sec / runner.num_devices:.2f} '
          f'| {tflops:.3f} | {f"{100 * mfu:.1f}%" if mfu else "n/a"} | {runner.memory_gib():.2f} |', flush=True)
    del runner
  if FLAGS.json_out:
    fileio.write_text(FLAGS.json_out, json.dumps(
        {'benchmark': 'train_step', 'machine': describe_machine(), 'backend': backend,
         'device_kind': jax.devices()[0].device_kind, 'peak_flops_per_device': peak, 'rows': rows}, indent=1))


if __name__ == '__main__':
  define_flags()
  app.run(main)
