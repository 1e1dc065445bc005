r"""The MAE pretraining step in mae_jax and in PyTorch, timed side by side in one run.

  python benchmarks/bench_vs_pytorch.py [--model=b16] [--batch=8] [--rounds=5] [--skip_compile] \
      [--json_out=vs_pytorch.json]

mae_jax: the step exactly as the trainer runs it (`pretrain_step.build_train_step`,
what `mae_jax.aot` compiles: the config's optimizer and schedule, the non-finite
guard, the step's metrics, donated state), on one device.

PyTorch: Hugging Face `transformers.ViTMAEForPreTraining` with the same sizes
(read from `mae_jax.models.MODELS`), SDPA attention, mask ratio, norm_pix_loss
and `torch.optim.AdamW(lr, betas=(0.9, 0.95), weight_decay=0.05)` (no decay on
biases and 1-D tensors, as the reference), run eagerly and under
`torch.compile` (a compile failure is reported, not fatal). Both use float32
parameters; with --dtype=bfloat16 mae_jax computes in bfloat16
(model.dtype) and PyTorch under `torch.autocast`.

Both sides see the same images. Each implementation runs in its own worker
process (--isolate, the default), as each is run for real: PyTorch's OpenMP
threads, which spin after each parallel region, and its allocator then share
no process with XLA's threads. On a CPU host the workers, PyTorch's and
mae_jax's alike, get the glibc settings README recommends for CPU runs
(--malloc_env; a variable already set is kept). Each side is compiled and
warmed up first (the warm-up steps after the compile are printed, not counted
in the medians); then every round times `--steps_per_round` steps of each
implementation in turn, the order rotated from round to round, so that a
change in the machine's load touches all of them alike. Prints each
implementation's median step time and spread, and the ratio: the faster
PyTorch median over mae_jax's (above 1 means mae_jax is faster). A benchmark:
it prints figures and never fails on time.
"""

import os

# JAX must not take most of the GPU's memory up front: PyTorch shares the device (its workers, or this
# process with --noisolate), and every process of the run starts a JAX client.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import bench_train_step as common  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from mae_jax import fileio, models  # noqa: E402

MODELS = {
    'tiny': 'mae_vit_tiny_patch16',
    'b16': 'mae_vit_base_patch16',
    'l16': 'mae_vit_large_patch16',
    'h14': 'mae_vit_huge_patch14',
}
IMPLS = ('mae_jax', 'torch_eager', 'torch_compile')

FLAGS = flags.FLAGS
flags.DEFINE_enum('model', 'b16', list(MODELS), 'Model size (tiny for a quick check).')
flags.DEFINE_integer('batch', 8, 'Batch size (both sides, one device).')
flags.DEFINE_integer('rounds', 5, 'Interleaved timing rounds.')
flags.DEFINE_integer('steps_per_round', 1, 'Timed steps of each implementation per round.')
flags.DEFINE_integer('warmup', 3, 'Steps of each implementation after its compile, printed, not in the medians.')
flags.DEFINE_string('dtype', None, 'float32 or bfloat16 (default float32 on CPU, bfloat16 on a GPU).')
flags.DEFINE_string('attention_impl', None,
                    'mae_jax model.attention_impl (default cudnn on a GPU in bfloat16, else xla).')
flags.DEFINE_float('mask_ratio', 0.75, 'Mask ratio (both sides).')
flags.DEFINE_bool('skip_compile', False, 'Do not run torch.compile.')
flags.DEFINE_bool('skip_eager', False, 'Do not time eager PyTorch.')
flags.DEFINE_integer('threads', None, 'PyTorch intra-op threads (default: the CPU cores this process may use).')
flags.DEFINE_string('json_out', '', 'Also write the figures as JSON to this file (local or gs://).')
flags.DEFINE_bool('isolate', True, 'Run each implementation in its own worker process (--noisolate: all in this one).')
flags.DEFINE_bool('malloc_env', True, 'On a CPU host, give the worker processes MALLOC_ENV (README, CPU runs); '
                  'no effect with --noisolate (glibc reads them when a process starts).')
flags.DEFINE_string('worker', '', 'Internal: serve one implementation to the benchmark that started this process.')

# glibc: one arena, no mmap for large blocks, no trimming: a step's temporaries stay mapped from one
# step to the next instead of being faulted in afresh (README, BENCHMARKS.md).
MALLOC_ENV = {'MALLOC_ARENA_MAX': '1', 'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': '68719476736'}


def cpu_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def hf_config(model_name: str, mask_ratio: float, norm_pix_loss: bool = True):
  """The transformers.ViTMAEConfig of a mae_jax model (same sizes, eps, GELU, qkv bias), SDPA attention."""
  import transformers  # pylint: disable=g-import-not-at-top
  kw = models.model_kwargs(model_name)
  size = kw.get('image_size', 224)
  config = transformers.ViTMAEConfig(
      hidden_size=kw['embed_dim'], num_hidden_layers=kw['depth'], num_attention_heads=kw['num_heads'],
      intermediate_size=int(kw['embed_dim'] * kw['mlp_ratio']), hidden_act='gelu', layer_norm_eps=1e-6,
      image_size=size, patch_size=kw['patch_size'], num_channels=kw.get('in_channels', 3), qkv_bias=True,
      decoder_hidden_size=kw['decoder_embed_dim'], decoder_num_hidden_layers=kw['decoder_depth'],
      decoder_num_attention_heads=kw['decoder_num_heads'],
      decoder_intermediate_size=int(kw['decoder_embed_dim'] * kw['mlp_ratio']), mask_ratio=mask_ratio,
      norm_pix_loss=norm_pix_loss, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  config._attn_implementation = 'sdpa'  # pylint: disable=protected-access
  return config


class JaxStep:
  """mae_jax's train step as the trainer builds it, on one device, with its state and the batch."""

  def __init__(self, model_name: str, batch: int, dtype: str, attention_impl: str, mask_ratio: float,
               images_nhwc: np.ndarray):
    self.config = common.build_config(model_name, batch, dtype=dtype, mask_ratio=mask_ratio,
                                      attention_impl=attention_impl)
    self.config.norm_pix_loss = True
    self.runner = common.StepRunner(self.config, devices=jax.devices()[:1], keep_state=False)
    self.compile_seconds = self.runner.compile_seconds
    step = self.runner.step
    self.runner.state = step.init_state()
    host = {'image': images_nhwc, 'corrupt': np.zeros((batch,), bool)}
    self.runner.batch = {key: jax.device_put(host[key], step.batch_shardings[key]) for key in step.abstract_batch}
    self.num_params = sum(x.size for x in jax.tree.leaves(self.runner.state.params))

  def __call__(self) -> None:
    self.runner.run(1)


class TorchStep:
  """transformers' ViTMAEForPreTraining + torch.optim.AdamW: zero_grad, forward, backward, step."""

  def __init__(self, model, optimizer, pixel_values, autocast_dtype, compiled: bool):
    import torch  # pylint: disable=g-import-not-at-top
    self.torch = torch
    self.model, self.optimizer, self.pixel_values = model, optimizer, pixel_values
    self.forward = torch.compile(model) if compiled else model
    self.device_type = pixel_values.device.type
    self.autocast_dtype = autocast_dtype

  def __call__(self) -> None:
    torch = self.torch
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(self.device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
      loss = self.forward(pixel_values=self.pixel_values).loss
    loss.backward()
    self.optimizer.step()
    if self.device_type == 'cuda':
      torch.cuda.synchronize()


def build_torch(model_name: str, mask_ratio: float, lr: float, images_nchw: np.ndarray, device: str):
  """The PyTorch model, its AdamW (param groups as the reference) and the batch on `device`."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = transformers.ViTMAEForPreTraining(hf_config(model_name, mask_ratio)).to(device)
  model.train()
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    if param.requires_grad:
      (no_decay if param.ndim <= 1 or name.endswith('.bias') else decay).append(param)
  optimizer = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.05}, {'params': no_decay, 'weight_decay': 0.0}],
                                lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
  num_params = sum(p.numel() for p in decay + no_decay)
  return model, optimizer, torch.from_numpy(images_nchw).to(device), num_params


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def time_steps(step, count: int) -> list[float]:
  return [timed(step) for _ in range(count)]


def summarize(times: list[float]) -> dict:
  median = statistics.median(times)
  return dict(median_ms=1e3 * median, min_ms=1e3 * min(times), max_ms=1e3 * max(times),
              spread=(max(times) - min(times)) / median, times_ms=[1e3 * t for t in times])


def settings() -> types.SimpleNamespace:
  """What both sides share, from the flags and the backend (raises SystemExit / UsageError on bad ones)."""
  backend = jax.default_backend()
  dtype = FLAGS.dtype or ('float32' if backend == 'cpu' else 'bfloat16')
  if dtype not in ('float32', 'bfloat16'):
    raise app.UsageError(f'--dtype={dtype!r}: must be float32 or bfloat16')
  attention = FLAGS.attention_impl or ('cudnn' if backend == 'gpu' and dtype == 'bfloat16' else 'xla')
  if backend == 'gpu':
    import torch  # pylint: disable=g-import-not-at-top
    if not torch.cuda.is_available():
      raise SystemExit(f'JAX runs on the GPU but this torch ({torch.__version__}) has no CUDA: install a CUDA '
                       'build of torch into this environment, or run with JAX_PLATFORMS=cpu')
    device = 'cuda'
  elif backend == 'cpu':
    device = 'cpu'
  else:
    raise SystemExit(f'backend {backend!r}: PyTorch has no counterpart here; run on a CPU or an NVIDIA GPU')
  model_name = MODELS[FLAGS.model]
  names = [name for name in IMPLS if not (name == 'torch_eager' and FLAGS.skip_eager)
           and not (name == 'torch_compile' and FLAGS.skip_compile)]
  return types.SimpleNamespace(backend=backend, dtype=dtype, attention=attention, device=device,
                               model_name=model_name, threads=FLAGS.threads or cpu_cores(), names=names,
                               size=models.model_kwargs(model_name).get('image_size', 224))


def build(name: str, s) -> tuple:
  """(step, trainable parameters) of one implementation, on the shared images."""
  images = np.random.default_rng(0).standard_normal((FLAGS.batch, s.size, s.size, 3), dtype=np.float32)
  if name == 'mae_jax':
    step = JaxStep(s.model_name, FLAGS.batch, s.dtype, s.attention, FLAGS.mask_ratio, images)
    return step, step.num_params
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(s.threads)
  if s.device == 'cuda':
    torch.backends.cuda.matmul.allow_tf32 = True  # XLA's default precision for float32 matmuls on GPUs
    torch.backends.cudnn.allow_tf32 = True
  config = common.build_config(s.model_name, FLAGS.batch, dtype=s.dtype, mask_ratio=FLAGS.mask_ratio)
  lr = float(config.optim.base_lr * FLAGS.batch / 256)  # the learning rate mae_jax's config gives
  model, optimizer, pixels, num_params = build_torch(s.model_name, FLAGS.mask_ratio, lr,
                                                     np.ascontiguousarray(images.transpose(0, 3, 1, 2)), s.device)
  autocast = torch.bfloat16 if s.dtype == 'bfloat16' else None
  return TorchStep(model, optimizer, pixels, autocast, compiled=name == 'torch_compile'), num_params


def prepare(name: str, s) -> dict:
  """Builds, compiles and warms up one implementation: {'step', 'params', 'compile_s', 'warmup_ms'} or {'error'}."""
  try:
    step, num_params = build(name, s)
    first = timed(step)
    warmup_ms = [1e3 * timed(step) for _ in range(FLAGS.warmup - 1)]
  except Exception as e:  # pylint: disable=broad-except  # torch.compile may fail on a platform; report it.
    return {'error': f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'[:300]}
  compile_s = step.compile_seconds if name == 'mae_jax' else first
  return {'step': step, 'params': num_params, 'compile_s': compile_s, 'warmup_ms': warmup_ms}


def serve(name: str) -> None:
  """Worker: prepares `name`, then answers 'run N' lines on stdin with N step times (JSON lines on stdout)."""
  replies = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # everything else this process prints goes to stderr
  prepared = prepare(name, settings())
  step = prepared.pop('step', None)
  prepared['pid'] = os.getpid()
  prepared['malloc_env'] = {key: os.environ[key] for key in MALLOC_ENV if key in os.environ}
  replies.write(json.dumps(prepared) + '\n')
  for line in sys.stdin:
    if step is None or not line.startswith('run '):
      break
    replies.write(json.dumps({'times': time_steps(step, int(line.split()[1]))}) + '\n')


class Worker:
  """One implementation in a process of its own (serve), driven over pipes."""

  def __init__(self, name: str, s, env: dict):
    args = [f'--model={FLAGS.model}', f'--batch={FLAGS.batch}', f'--warmup={FLAGS.warmup}', f'--dtype={s.dtype}',
            f'--attention_impl={s.attention}', f'--mask_ratio={FLAGS.mask_ratio}', f'--threads={s.threads}',
            f'--worker={name}']
    self.name = name
    self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)

  def reply(self) -> dict:
    line = self.process.stdout.readline()
    if not line:
      return {'error': f'worker process exited with status {self.process.wait()} (its stderr is above)'}
    return json.loads(line)

  def __call__(self, count: int) -> list[float]:
    try:
      self.process.stdin.write(f'run {count}\n')
      self.process.stdin.flush()
    except OSError:  # the worker is gone (e.g. killed for memory): its status is the reply
      pass
    reply = self.reply()
    if 'times' not in reply:
      raise SystemExit(f'{self.name}: {reply.get("error", reply)}')
    return reply['times']

  def close(self) -> None:
    if self.process.poll() is None:
      try:
        self.process.stdin.close()
      except OSError:
        pass
      self.process.wait()


def main(argv):
  del argv
  if FLAGS.worker:
    serve(FLAGS.worker)
    return
  import torch  # pylint: disable=g-import-not-at-top
  s = settings()
  env = dict(os.environ)
  worker_env = {}
  if FLAGS.isolate and FLAGS.malloc_env and s.backend == 'cpu':
    worker_env = {key: env.setdefault(key, value) for key, value in MALLOC_ENV.items()}
  machine = (f'{jax.devices()[0].device_kind} ({s.backend}), {cpu_cores()} CPU cores, {platform.machine()}; '
             f'jax {jax.__version__}, torch {torch.__version__}')
  print(f'# {machine}; {s.model_name}, batch {FLAGS.batch}, {s.dtype}, mask ratio {FLAGS.mask_ratio}, '
        f'norm_pix_loss, mae_jax attention {s.attention}, torch threads {s.threads}, '
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"{'one process per implementation' if FLAGS.isolate else 'one process'}"
        f"{''.join(f' {k}={v}' for k, v in worker_env.items())}", flush=True)

  runners, params, compile_s, warmup_ms, errors, pids, seen_env = {}, {}, {}, {}, {}, {}, {}
  workers = []
  try:
    for name in s.names:  # compile and warm up one at a time, untimed; mae_jax first
      if FLAGS.isolate:
        workers.append(Worker(name, s, env))
        ready = workers[-1].reply()
      else:
        ready = prepare(name, s)
      if 'error' in ready:
        errors[name] = ready['error']
        print(f'{name} failed, left out: {errors[name]}', flush=True)
        if name == 'mae_jax':
          raise SystemExit(f'mae_jax failed: {errors[name]}')
        continue
      runners[name] = workers[-1] if FLAGS.isolate else functools.partial(time_steps, ready['step'])
      params[name], compile_s[name], warmup_ms[name] = ready['params'], ready['compile_s'], ready['warmup_ms']
      pids[name] = ready.get('pid', os.getpid())
      seen_env[name] = ready.get('malloc_env', {})
      print(f'{name}: ready (compile / first step {compile_s[name]:.1f} s; then warm-up steps '
            f"{', '.join(f'{t:.0f}' for t in warmup_ms[name]) or 'none'} ms)", flush=True)
    torch_params = next((params[n] for n in runners if n != 'mae_jax'), None)
    print(f'trainable parameters: mae_jax {params["mae_jax"]:,}, PyTorch {torch_params or 0:,}', flush=True)

    times = {name: [] for name in runners}
    names = list(runners)
    for r in range(FLAGS.rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        times[name] += runners[name](FLAGS.steps_per_round)
  finally:
    for worker in workers:
      worker.close()
  stats = {name: summarize(t) for name, t in times.items()}

  print('| implementation | median step ms | min-max ms | spread | compile s | images/s |')
  print('|---|---|---|---|---|---|')
  for name, st in stats.items():
    print(f"| {name} | {st['median_ms']:.1f} | {st['min_ms']:.1f}-{st['max_ms']:.1f} | {100 * st['spread']:.0f}% "
          f"| {compile_s[name]:.1f} | {1e3 * FLAGS.batch / st['median_ms']:.2f} |")
  for name, error in errors.items():
    print(f'| {name} | failed: {error} | | | | |')
  torch_best = min((n for n in stats if n != 'mae_jax'), key=lambda n: stats[n]['median_ms'], default=None)
  ratio = stats[torch_best]['median_ms'] / stats['mae_jax']['median_ms'] if torch_best else None
  if ratio is not None:
    print(f'ratio: {torch_best} / mae_jax = {ratio:.2f}x ({"mae_jax" if ratio > 1 else torch_best} is faster)')
  if FLAGS.json_out:
    fileio.write_text(FLAGS.json_out, json.dumps(
        {'benchmark': 'vs_pytorch', 'machine': machine, 'backend': s.backend, 'model': s.model_name,
         'batch': FLAGS.batch, 'dtype': s.dtype, 'attention_impl': s.attention, 'mask_ratio': FLAGS.mask_ratio,
         'rounds': FLAGS.rounds, 'steps_per_round': FLAGS.steps_per_round, 'torch_threads': s.threads,
         'xla_flags': os.environ.get('XLA_FLAGS', ''), 'isolated': FLAGS.isolate, 'worker_env': worker_env,
         'pids': pids, 'workers_malloc_env': seen_env,
         'params': {'mae_jax': params['mae_jax'], 'torch': torch_params},
         'compile_s': compile_s, 'warmup_ms': warmup_ms, 'stats': stats, 'errors': errors, 'faster_torch': torch_best,
         'ratio': ratio}, indent=1))


if __name__ == '__main__':
  app.run(main)
