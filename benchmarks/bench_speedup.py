r"""MAE vs mask tokens in the encoder: train-step time of ViT-L, decoder depth 8 and 1.

  python benchmarks/bench_speedup.py [--batch=2] [--rounds=3] [--model=L] [--scan] [--json_out=speedup.json]

The paper's wall-clock table (800 epochs on 128 TPU-v3 cores) puts ViT-L MAE at
2.8x (decoder depth 8) and 3.7x (depth 1) the speed of the baseline: the same
encoder fed every token, mask tokens included, with a depth-8 decoder. This
measures the same two ratios for one train step on the current backend, next to
the analytic FLOP ratios (3.23x and 4.15x for ViT-L). The three steps are
compiled first, then timed in interleaved rounds (state initialised per
round, one model in memory at a time) so that a change in the machine's load
touches all of them alike; the median step of each is reported. A benchmark:
prints figures, never fails on time.
"""

import json
import statistics

import bench_train_step as common
import jax
from absl import app, flags

from mae_jax import fileio, flops, models

BASELINE_DECODER_DEPTH = 8
PAPER_SPEEDUP = {('L', 8): 2.8, ('L', 1): 3.7, ('H', 8): 3.5, ('H', 1): 4.1}

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'L', 'L or H (the paper reports both).')
flags.DEFINE_integer('batch', None, 'Per-device batch (default 2 on CPU, 64 elsewhere).')
flags.DEFINE_integer('rounds', 3, 'Interleaved timing rounds (one step of each variant per round).')
flags.DEFINE_integer('steps_per_round', 1, 'Timed steps of each variant per round (after a warm-up step).')
flags.DEFINE_list('decoder_depths', ['8', '1'], 'Decoder depths to compare.')
flags.DEFINE_string('dtype', None, 'Compute dtype (default float32 on CPU, bfloat16 elsewhere).')
flags.DEFINE_string('attention_impl', 'xla', 'model.attention_impl: xla | cudnn (GPU) | tpu_flash (TPU) | naive.')
flags.DEFINE_bool('scan', False, 'model.scan_layers (faster compiles of deep models).')
flags.DEFINE_string('remat', 'none', 'model.remat_policy: none | full | dots | dots_no_batch.')
flags.DEFINE_string('json_out', '', 'Also write the figures as JSON to this file (local or gs://).')


def forward_flops(model: str, decoder_depth: int, mask_tokens: bool) -> float:
  kwargs = models.model_kwargs(common.MODELS[model], decoder_depth=decoder_depth)
  return flops.mae_forward_flops(kwargs, 0.75, mask_tokens)


def main(argv):
  del argv
  backend = jax.default_backend()
  dtype = FLAGS.dtype or ('float32' if backend == 'cpu' else 'bfloat16')
  per_device = FLAGS.batch or (2 if backend == 'cpu' else 64)
  global_batch = per_device * jax.device_count()
  depths = [int(d) for d in FLAGS.decoder_depths]
  print(f'# {common.describe_machine()}; {common.MODELS[FLAGS.model]}, batch {per_device}/device, {dtype}, '
        f'attention {FLAGS.attention_impl}, scan_layers {FLAGS.scan}, remat {FLAGS.remat}')

  # The paper's baseline for every row: mask tokens in the encoder, decoder depth 8.
  baseline = (True, BASELINE_DECODER_DEPTH)
  variants = [baseline] + [(False, depth) for depth in depths]
  runners = {}
  for mask_tokens, depth in variants:
    config = common.build_config(FLAGS.model, global_batch, dtype=dtype, decoder_depth=depth,
                                 encoder_mask_tokens=mask_tokens, attention_impl=FLAGS.attention_impl,
                                 scan=FLAGS.scan, remat=FLAGS.remat)
    runners[mask_tokens, depth] = common.StepRunner(config, keep_state=False)
    print(f'compiled: mask tokens in encoder {mask_tokens}, decoder depth {depth} '
          f'({runners[mask_tokens, depth].compile_seconds:.0f} s)', flush=True)

  times = {key: [] for key in runners}
  for _ in range(FLAGS.rounds):
    for key, runner in runners.items():
      with runner.loaded():  # one model's state in memory at a time
        times[key] += runner.run(FLAGS.steps_per_round)
  step = {key: statistics.median(value) for key, value in times.items()}

  print(f'baseline (mask tokens in the encoder, decoder depth {BASELINE_DECODER_DEPTH}): '
        f'{1e3 * step[baseline]:.0f} ms per step')
  print('| MAE decoder depth | MAE step ms | measured speedup | analytic FLOP ratio | paper (wall-clock, TPU-v3) |')
  print('|---|---|---|---|---|')
  base_flops = forward_flops(FLAGS.model, BASELINE_DECODER_DEPTH, True)
  rows = []
  for depth in depths:
    paper = PAPER_SPEEDUP.get((FLAGS.model, depth))
    ratio = base_flops / forward_flops(FLAGS.model, depth, False)
    speedup = step[baseline] / step[False, depth]
    rows.append(dict(decoder_depth=depth, mae_step_ms=1e3 * step[False, depth], speedup=speedup,
                     flop_ratio=ratio, paper=paper))
    print(f'| {depth} | {1e3 * step[False, depth]:.0f} | {speedup:.2f}x '
          f'| {ratio:.2f}x | {f"{paper}x" if paper else "n/a"} |')
  if FLAGS.json_out:
    fileio.write_text(FLAGS.json_out, json.dumps(
        {'benchmark': 'speedup', 'machine': common.describe_machine(), 'model': common.MODELS[FLAGS.model],
         'batch_per_device': per_device, 'dtype': dtype, 'attention_impl': FLAGS.attention_impl,
         'scan_layers': FLAGS.scan, 'rounds': FLAGS.rounds, 'baseline_step_ms': 1e3 * step[baseline],
         'compile_s': {f'mask_tokens={k[0]},decoder_depth={k[1]}': r.compile_seconds for k, r in runners.items()},
         'rows': rows}, indent=1))


if __name__ == '__main__':
  app.run(main)
