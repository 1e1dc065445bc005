"""Test setup: 8 host CPU devices for sharding tests, TensorFlow kept off accelerators."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')
# Tests run on host CPU devices even where libtpu (the `tpu` extra) is installed;
# TPU compile-only tests build their topology explicitly.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Many tests compile the same small programs (also in subprocesses): share them on disk.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.pytest_cache', 'jax_compilation_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

jax.config.update('jax_threefry_partitionable', True)

import pytest  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def jit_cache(tmp_path_factory):
  """Shares compilations between the runs of a module (and its command-line subprocesses)."""
  from launch import sweep  # pylint: disable=g-import-not-at-top
  with sweep.compilation_cache(str(tmp_path_factory.mktemp('jit_cache'))):
    yield


@pytest.fixture(scope='session')
def pretrained(tmp_path_factory):
  """A pretraining workdir of mae_vit_test (1 step on synthetic 32x32x3), shared by the downstream tests."""
  from configs import test as test_config  # pylint: disable=g-import-not-at-top
  from mae_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp('pretrain'))
  assert train.train_and_evaluate(test_config.get_config('steps=1'), workdir)['status'] == 'done'
  return workdir
