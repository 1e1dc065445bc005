r"""Compile time and per-device memory of the ViT-H train step, with and without scan and remat.

  python benchmarks/bench_compile.py [--model=H] [--batch=2] [--topology=v4-8] [--tpu_per_chip_batch=8]

For each of scan_layers in {False, True} x remat_policy in --remat_policies, the
train step (mae_jax.aot.make_train_step, as the trainer builds it) is lowered
and compiled for the host backend (CPU here) and, when libtpu is installed, for
the compile-only TPU slice --topology. Prints lower and compile seconds and the
compiled program's memory per device (arguments + temporaries + outputs not
aliased to donated arguments). A benchmark: prints figures, never fails on time.
"""

import time

import bench_train_step as common
import jax
from absl import app, flags

from mae_jax import aot, flops, parallel, train_state

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'H', 'Model: tiny, B, L, H or a full name.')
flags.DEFINE_integer('batch', 2, 'Per-device batch on the host backend.')
flags.DEFINE_list('remat_policies', ['none', 'full'], 'model.remat_policy values to compare.')
flags.DEFINE_string('topology', 'v4-8', "TPU slice for the AOT compiles ('' skips them).")
flags.DEFINE_integer('tpu_per_chip_batch', 8, 'Per-chip batch for the TPU compiles.')
flags.DEFINE_string('dtype', None, 'Compute dtype (default float32 on CPU, bfloat16 on TPU).')
flags.DEFINE_bool('host', True, 'Compile for the host backend too.')


def compile_once(config, devices):
  """(lower seconds, compile seconds, memory GiB per device, compiled) for the config on devices."""
  mesh = parallel.create_mesh(config.mesh, devices)
  step = aot.make_train_step(config, mesh)
  start = time.perf_counter()
  with train_state.mesh_context(mesh):
    lowered = step.jitted.lower(step.abstract_state, step.abstract_batch)
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
  done = time.perf_counter()
  memory = compiled.memory_analysis()
  total = (memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes)
  return lowered_at - start, done - lowered_at, total / flops.GiB, memory.temp_size_in_bytes / flops.GiB


def main(argv):
  del argv
  variants = [(scan, remat) for scan in (False, True) for remat in FLAGS.remat_policies]
  print(f'# {common.describe_machine()}; {common.MODELS.get(FLAGS.model, FLAGS.model)}')
  print('| target | per-device batch | dtype | scan_layers | remat | lower s | compile s '
        '| memory GiB/device | of which temporaries |')
  print('|---|---|---|---|---|---|---|---|---|')
  targets = []
  if FLAGS.host:
    targets.append((f'{jax.default_backend()} x {jax.device_count()}', jax.devices(), FLAGS.batch,
                    FLAGS.dtype or ('float32' if jax.default_backend() == 'cpu' else 'bfloat16')))
  if FLAGS.topology:
    ok, why = aot.tpu_available()
    if ok:
      spec = aot.parse_topology(FLAGS.topology)
      targets.append((f'{FLAGS.topology} (AOT)', aot.topology_devices(spec), FLAGS.tpu_per_chip_batch,
                      FLAGS.dtype or 'bfloat16'))
    else:
      print(f'# skipping {FLAGS.topology}: {why}')
  for name, devices, per_device, dtype in targets:
    for scan, remat in variants:
      config = common.build_config(FLAGS.model, per_device * len(devices), dtype=dtype, remat=remat, scan=scan)
      try:
        lower_s, compile_s, total, temp = compile_once(config, devices)
        memory = f'{total:.2f} | {temp:.2f}'
      except Exception as e:  # pylint: disable=broad-except
        if 'RESOURCE_EXHAUSTED' not in str(e):
          raise
        lower_s = compile_s = float('nan')
        memory = 'does not fit | ' + str(e).splitlines()[0][:80]
      print(f'| {name} | {per_device} | {dtype} | {scan} | {remat} | {lower_s:.1f} | {compile_s:.1f} '
            f'| {memory} |', flush=True)


if __name__ == '__main__':
  app.run(main)
