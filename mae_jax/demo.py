"""The demo: prepare Fashion-MNIST, pretrain a tiny MAE, write a reconstruction picture.

`python -m mae_jax.demo [--workdir=workdirs/demo] [--steps=600]`
"""

import os

from absl import app, flags, logging

from configs import demo  # The demo is an entry point: it may read the project's configs.
from mae_jax import train, visualize
from mae_jax.data import prepare, sources

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'workdirs/demo', 'Run directory (resumes if it holds a checkpoint).')
flags.DEFINE_string('data_dir', '.data/tensorflow_datasets', 'Where the prepared data set goes.')
flags.DEFINE_string('source_dir', None, 'Fashion-MNIST IDX files (default: Debian dataset-fashion-mnist).')
flags.DEFINE_integer('steps', 600, 'Training steps.')


def main(argv):
  del argv
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')

  source_dir = FLAGS.source_dir or sources.DEFAULT_FASHION_MNIST_DIR
  prepare.prepare_fashion_mnist(FLAGS.data_dir, source_dir=source_dir)
  config = demo.get_config(f'steps={FLAGS.steps},data_dir={FLAGS.data_dir}')
  result = train.train_and_evaluate(config, FLAGS.workdir)
  logging.info('Training finished: %s', result)
  path = visualize.visualize_checkpoint(FLAGS.workdir, os.path.join(FLAGS.workdir, 'reconstructions.png'))
  print(f'Final train/loss {result.get("train/loss", float("nan")):.4f} after {result["step"]} steps.')
  print(f'Reconstruction picture: {os.path.abspath(path)}')


def run():
  app.run(main)


if __name__ == '__main__':
  run()
