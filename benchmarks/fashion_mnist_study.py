r"""Fashion-MNIST study: MAE pretraining against random weights and training from scratch.

  python benchmarks/fashion_mnist_study.py --workdir=workdirs/fm_study

Pretrains the demo MAE (mae_vit_mini_patch4) on Fashion-MNIST 'train', then,
for the MAE encoder and for the same encoder with random weights, measures on
the 10,000-image 'test' split: kNN top-1, linear-probe top-1 and fine-tuning
top-1 (fine-tuning random weights is training from scratch, with the same
recipe and number of epochs). Every stage has its own workdir under --workdir
and is skipped when its results.json exists, so an interrupted study resumes
where it stopped. Prints a markdown table and writes it, with the raw numbers,
to --workdir/study.md and study.json. The settings are in
configs/fashion_mnist_study.py.
"""

import json
import os
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Study directory (one workdir per stage inside).')
flags.DEFINE_string('data_dir', '.data/tensorflow_datasets', 'Prepared Fashion-MNIST (prepared if missing).')
flags.DEFINE_float('pretrain_epochs', 2.0, 'MAE pretraining epochs over the 60,000 train images.')
flags.DEFINE_float('finetune_epochs', 7.0, 'Fine-tuning epochs (MAE and scratch alike).')
flags.DEFINE_float('probe_epochs', 100.0, 'Linear-probe epochs (on features encoded once).')
flags.DEFINE_integer('train_examples', 10_000, 'Labelled train examples downstream (<= 0: all 60,000).')
flags.DEFINE_integer('seed', 0, 'Seed of every stage.')
flags.mark_flag_as_required('workdir')


def _stage(name: str, workdir: str, fn, config) -> dict:
  """Runs one stage unless its results exist; returns its results with the wall time."""
  path = os.path.join(workdir, 'results.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      results = json.load(f)
    print(f'[{name}] done earlier: {path}', flush=True)
    return results
  print(f'[{name}] starting in {workdir}', flush=True)
  start = time.time()
  results = dict(fn(config, workdir))
  if results.get('status') != 'done':
    raise SystemExit(f'[{name}] stopped with status {results.get("status")}; run the study again to resume')
  results['wall_seconds'] = time.time() - start
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  print(f'[{name}] done in {results["wall_seconds"]:.0f} s: '
        + ', '.join(f'{k} {v:.4f}' for k, v in sorted(results.items())
                    if k.startswith('eval/') and isinstance(v, float)), flush=True)
  return results


def _pct(value) -> str:
  return '-' if value is None else f'{100 * value:.1f}'


def table(results: dict, settings: dict) -> str:
  """The study's markdown table."""
  def row(name, probe, tuned):
    cells = (results[probe].get('eval/knn_top1'), results[probe].get('eval/top1'),
             results[tuned].get('eval/top1'))
    return f'| {name} | ' + ' | '.join(_pct(c) for c in cells) + ' |'

  labelled = settings['train_examples'] if settings['train_examples'] > 0 else 60_000
  wall = ', '.join(f'{name} {results[name].get("wall_seconds", 0):.0f}' for name in results)
  lines = [
      '| encoder | kNN top-1 (k=20) | linear probe top-1 | fine-tune top-1 |',
      '|---|---|---|---|',
      row(f'MAE, {settings["pretrain_epochs"]:g} pretraining epochs', 'probe_mae', 'finetune_mae'),
      row('random weights (fine-tune = from scratch)', 'probe_random', 'finetune_scratch'),
      '',
      (f'Fashion-MNIST test split (10,000 images), top-1 in %. {settings["model"]} pretrained on all '
       f'60,000 train images; downstream stages use the first {labelled:,} labelled train images; '
       f'fine-tuning {settings["finetune_epochs"]:g} epochs, linear probe {settings["probe_epochs"]:g} '
       'epochs on frozen cls features, kNN on the same features (T=0.07).'),
      f'Wall clock (s): {wall}.',
  ]
  return '\n'.join(lines)


def main(argv):
  del argv
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  from configs import fashion_mnist_study  # pylint: disable=g-import-not-at-top
  from mae_jax import downstream, train  # pylint: disable=g-import-not-at-top
  from mae_jax.data import prepare  # pylint: disable=g-import-not-at-top

  start = time.time()
  root = os.path.abspath(FLAGS.workdir)
  data_dir = os.path.abspath(FLAGS.data_dir)
  prepare.prepare_fashion_mnist(data_dir, progress=False)
  settings = {'pretrain_epochs': FLAGS.pretrain_epochs, 'finetune_epochs': FLAGS.finetune_epochs,
              'probe_epochs': FLAGS.probe_epochs, 'train_examples': FLAGS.train_examples}

  def config(stage, pretrained=''):
    args = {**settings, 'stage': stage, 'data_dir': data_dir, 'pretrained_workdir': pretrained,
            'seed': FLAGS.seed}
    del args['model']
    arg = ','.join(f'{k}={v}' for k, v in args.items())
    return fashion_mnist_study.get_config(arg)

  settings['model'] = fashion_mnist_study.demo_model()

  pretrain_dir = os.path.join(root, 'pretrain')
  results = {}
  results['pretrain'] = _stage('pretrain', pretrain_dir, _pretrain(train), config('pretrain'))
  results['probe_mae'] = _stage('linear probe + kNN, MAE', os.path.join(root, 'probe_mae'),
                                downstream.train_and_evaluate, config('linprobe', pretrain_dir))
  results['probe_random'] = _stage('linear probe + kNN, random weights', os.path.join(root, 'probe_random'),
                                   downstream.train_and_evaluate, config('linprobe'))
  results['finetune_mae'] = _stage('fine-tune, MAE', os.path.join(root, 'finetune_mae'),
                                   downstream.train_and_evaluate, config('finetune', pretrain_dir))
  results['finetune_scratch'] = _stage('fine-tune, from scratch', os.path.join(root, 'finetune_scratch'),
                                       downstream.train_and_evaluate, config('finetune'))
  text = table(results, settings)
  text += f'\nTotal wall clock of this invocation: {time.time() - start:.0f} s.'
  with open(os.path.join(root, 'study.md'), 'w', encoding='utf-8') as f:
    f.write(text + '\n')
  with open(os.path.join(root, 'study.json'), 'w', encoding='utf-8') as f:
    json.dump({'settings': settings, 'results': results}, f, indent=2, sort_keys=True)
  logging.info('Study written to %s', root)
  print(text)


def _pretrain(train):
  def run(config, workdir):
    result = train.train_and_evaluate(config, workdir)
    return {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
  return run


if __name__ == '__main__':
  app.run(main)
