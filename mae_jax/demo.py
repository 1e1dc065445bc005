"""The demo: prepare Fashion-MNIST, pretrain a tiny MAE, show what it learned and where to look.

`python -m mae_jax.demo [--workdir=workdirs/demo] [--steps=600] [--verbose]`

The terminal shows a progress bar (steps/s, ETA, loss), the kNN accuracy of
the encoder's features as it trains, and at the end what was learned: kNN
accuracy against raw pixels on the same images, the reconstruction picture and
the TensorBoard command. Library logs go to WORKDIR/logs/ (--verbose: here too).
"""

import os
import shlex
import shutil
import sys

from absl import app, flags

from configs import demo  # The demo is an entry point: it may read the project's configs.
from mae_jax import checkpoint, console, fileio, knn, metrics, train, visualize
from mae_jax.data import prepare, sources

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'workdirs/demo', 'Run directory (resumes if it holds a checkpoint).')
flags.DEFINE_string('data_dir', '.data/tensorflow_datasets', 'Where the prepared data set goes.')
flags.DEFINE_string('source_dir', None, 'Fashion-MNIST IDX files (default: Debian dataset-fashion-mnist).')
flags.DEFINE_integer('steps', 600, 'Training steps.')
flags.DEFINE_bool('overwrite', False, 'Prepare the data set again even if it is already prepared.')
console.define_flags()  # --verbose, --progress.
flags.adopt_module_key_flags(console)  # Listed by --help.


def knn_history(workdir: str) -> list[tuple[int, float]]:
  """(step, eval/knn_top1) of every kNN evaluation the workdir logged."""
  return [(r['step'], r['eval/knn_top1']) for r in metrics.read_metrics(workdir) if 'eval/knn_top1' in r]


def summary(config, workdir: str, result: dict, history: list, pixels: float, picture: str) -> list[str]:
  """The closing lines: what was learned, in words, and where to look."""
  s = config.knn
  if result['status'] != 'done':
    lines = [f'Stopped at step {result["step"]} of {config.num_train_steps} ({result["status"]}): run the same '
             'command again to resume.']
  elif 'train/loss' not in result:  # Nothing was trained: the workdir held the finished run.
    lines = [f'The finished run ({result["step"]} steps of {config.batch_size} images) is shown again. For a new '
             'run: --workdir=ANOTHER_FOLDER; to train further: --steps=MORE.']
  else:
    lines = [f'Done: {result["step"]} steps of {config.batch_size} images.']
  if 'train/loss' in result:
    lines.append(f'Reconstruction error of the hidden patches, last training steps: {result["train/loss"]:.3f} (mean '
                 'squared, in units of the pixel variance: 1.0 is guessing the average pixel).')
  if history:
    (first_step, first), (last_step, last) = history[0], history[-1]
    verdict = 'above' if last > pixels else 'below'
    lines += [
        f'kNN accuracy (k={s.k}, cosine; bank: {s.train_examples:,} training images, queries: '
        + ('all test images' if s.eval_examples <= 0 else f'{s.eval_examples:,} test images') + '):',
        f'  MAE encoder features ({s.pool}-pooled): {100 * last:.1f}% at step {last_step}'
        + (f' (from {100 * first:.1f}% at step {first_step})' if first_step != last_step else ''),
        f'  raw pixels, same images:     {100 * pixels:.1f}%  -> the features are {verdict} raw pixels'
        + ('' if verdict == 'above' else
           ' after this short run (longer pretraining overtakes them: the Fashion-MNIST study in the README)'),
    ]
  logdir = os.fspath(fileio.path(workdir))
  lines += [f'Reconstructions (original | masked | reconstruction | + visible patches): {picture}',
            f'TensorBoard logs (loss, kNN, pictures): {logdir}',
            f'  open them with: {tensorboard_command()} --logdir {shlex.quote(logdir)}']
  return lines


def tensorboard_command() -> str:
  """`tensorboard` when the shell finds it, else the one installed beside this Python (a venv not activated)."""
  beside = os.path.join(os.path.dirname(sys.executable), 'tensorboard')
  if shutil.which('tensorboard') is not None or not os.access(beside, os.X_OK):
    return 'tensorboard'
  relative = os.path.relpath(beside)
  return shlex.quote(beside if relative.startswith('..') else relative)


def main(argv):
  del argv
  console.setup('demo', FLAGS.workdir)
  console.start_backends()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')

  source_dir = FLAGS.source_dir or sources.DEFAULT_FASHION_MNIST_DIR
  prepare.prepare_fashion_mnist(FLAGS.data_dir, source_dir=source_dir, overwrite=FLAGS.overwrite)
  config = demo.get_config(f'steps={FLAGS.steps},data_dir={FLAGS.data_dir}')
  held = checkpoint.latest_step(FLAGS.workdir)
  if held is None or held < config.num_train_steps:
    print(f'Pretraining a tiny MAE ({config.model.name}, plain pixel targets, {config.mask_ratio:.0%} of patches '
          f'hidden) for {config.num_train_steps} steps; kNN accuracy every {config.eval_every_steps} steps.',
          flush=True)
  result = train.train_and_evaluate(config, FLAGS.workdir)
  picture = visualize.visualize_checkpoint(FLAGS.workdir, fileio.join(FLAGS.workdir, 'reconstructions.png'))
  picture = os.fspath(fileio.path(picture))
  lines = summary(config, FLAGS.workdir, result, knn_history(FLAGS.workdir), knn.pixel_knn(config), picture)
  print('\n'.join(lines), flush=True)


def run():
  app.run(main)


if __name__ == '__main__':
  run()
