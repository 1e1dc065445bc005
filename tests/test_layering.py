"""The steps need no input pipeline: the pretraining step builds and runs without TensorFlow or clu.

The GPU benchmarks (benchmarks/gpu_suite.sh) run on machine images that have JAX, flax and optax but no
TensorFlow; they build the trainer's own step (mae_jax.pretrain_step). A fresh interpreter here refuses
those packages and must still build, run and benchmark it.
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WITHOUT_TENSORFLOW = r'''
import importlib.abc
import sys

REFUSED = ('tensorflow', 'tensorflow_datasets', 'clu')


class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split('.')[0] in REFUSED:
      raise ModuleNotFoundError(f'No module named {name!r} (refused by the test)')


sys.meta_path.insert(0, Refuse())
sys.path.insert(0, 'benchmarks')

import jax
import numpy as np

import bench_train_step  # noqa: F401  (bench_speedup's and bench_vs_pytorch's common part)
import bench_vs_pytorch  # noqa: F401
from configs import test as test_config
from mae_jax import parallel, pretrain_step

config = test_config.get_config('steps=1')
mesh = parallel.create_mesh(config.mesh)
step = pretrain_step.build_train_step(config, mesh, 64)
state = step.init_state()
batch = {key: jax.device_put(np.ones(spec.shape, spec.dtype) if key == 'image' else np.zeros(spec.shape, spec.dtype),
                             step.batch_shardings[key])
         for key, spec in step.abstract_batch.items()}
state, metrics = step.jitted(state, batch)
assert int(state.step) == 1 and np.isfinite(float(metrics['train/loss'])), metrics
loaded = sorted({m.split('.')[0] for m in sys.modules} & set(REFUSED))
assert not loaded, loaded
print('built and ran without', REFUSED)
'''


def test_the_pretraining_step_and_the_gpu_benchmarks_need_no_tensorflow():
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': REPO}
  env.pop('XLA_FLAGS', None)  # one CPU device
  result = subprocess.run([sys.executable, '-c', WITHOUT_TENSORFLOW], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "built and ran without ('tensorflow', 'tensorflow_datasets', 'clu')" in result.stdout
