r"""Fashion-MNIST study: what the MAE encoder learns, on one protocol for every row.

  python benchmarks/fashion_mnist_study.py                 # about 85 minutes on 2 CPU cores
  python benchmarks/fashion_mnist_study.py --scale=large   # a lent GPU: a bigger model, more epochs
  python benchmarks/fashion_mnist_study.py --mode=ablation # the pretraining recipe's ablation

Rows, every one on the same 60,000 labelled training images and scored on the
10,000 test images:

* raw pixels, the encoder with random weights (the pretraining's initial
  weights) and the MAE encoder: kNN (cosine, k=20, T=0.07) and a linear probe
  (logistic regression) on frozen features (benchmarks/study_eval.py: feature
  kind and L2 penalty chosen on held-out training images, never on the test set);
* fine-tuning from the MAE encoder and from scratch, same recipe and budget
  (configs/fashion_mnist_study.py), over --seeds: mean and spread.

Every stage has its own workdir under --workdir and is skipped when its
results exist, so an interrupted study resumes where it stopped. Writes
--json_out (the committed benchmarks/fashion_mnist_study.json: rows.ROW.METRIC
top-1 in %, with details, settings, seeds, times and machine), --plot (kNN
accuracy over pretraining and the loss curve) and, with --readme, the README's
table between its study markers (the table is generated from the JSON).

--mode=ablation pretrains one variant of the recipe per row of ABLATIONS for
--ablation_epochs each and scores each encoder with the same frozen protocol;
it prints a markdown table (BENCHMARKS.md records it) and writes ablation.json.
"""

import datetime
import json
import os
import platform
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import study_report  # noqa: E402  # pylint: disable=g-import-not-at-top

from mae_jax import console, pretrain_step  # noqa: E402  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'workdirs/fm_study', 'Study directory (one workdir per stage inside).')
flags.DEFINE_enum('scale', 'small', ['small', 'large'], 'small: 2 CPU cores; large: a GPU (see SCALES).')
flags.DEFINE_enum('mode', 'study', ['study', 'ablation'], 'The study, or the pretraining recipe ablation.')
flags.DEFINE_string('data_dir', '.data/tensorflow_datasets', 'Prepared Fashion-MNIST (prepared if missing).')
flags.DEFINE_string('source_dir', None, 'Fashion-MNIST IDX files (default: Debian dataset-fashion-mnist).')
flags.DEFINE_list('seeds', None, 'Fine-tuning seeds (default: the scale\'s).')
flags.DEFINE_float('pretrain_epochs', None, 'Override the scale\'s pretraining epochs.')
flags.DEFINE_float('finetune_epochs', None, 'Override the scale\'s fine-tuning epochs.')
flags.DEFINE_float('ablation_epochs', 2.0, 'Pretraining epochs of each ablation row.')
flags.DEFINE_string('json_out', 'benchmarks/fashion_mnist_study.json', 'The study\'s JSON ("" = none).')
flags.DEFINE_string('plot', 'benchmarks/fashion_mnist_study.png', 'The study\'s plot ("" = none).')
flags.DEFINE_string('readme', '', 'A README whose study table to rewrite from the JSON (e.g. README.md).')
console.define_flags()  # --verbose, --progress.

# Per scale: the pretraining recipe (configs/fashion_mnist_study.py's defaults with these changes, chosen
# by the ablation in BENCHMARKS.md: normalised pixel targets gave the best held-out linear probe) and the
# budgets.
SCALES = {
    'small': dict(model='mae_vit_mini_patch4', pretrain_epochs=20.0, knn_every_epochs=2.0,
                  finetune_epochs=1.0, seeds=(0, 1), recipe={'norm_pix': True}),
    'large': dict(model='mae_vit_tiny_patch4', pretrain_epochs=40.0, knn_every_epochs=4.0,
                  finetune_epochs=3.0, seeds=(0, 1, 2), recipe={'norm_pix': True}),
}
# The ablation: one change from the small recipe per row ('' = the recipe itself).
ABLATIONS = (
    ('recipe (plain pixels, decoder depth 2, lr 1.5e-3, crop 0.35-1)', ''),
    ('normalised pixel targets (norm_pix_loss)', 'norm_pix=True'),
    ('decoder depth 4', 'decoder_depth=4'),
    ('lr 3e-3', 'lr=3e-3'),
    ('lr 7.5e-4', 'lr=7.5e-4'),
    ('crop 0.2-1 (the reference\'s)', 'crop_min=0.2'),
)


ABLATION_L2 = (1e-4,)


def _log(text: str) -> None:
  print(text, flush=True)


def _stage(name: str, workdir: str, fn) -> dict:
  """Runs fn(workdir) unless workdir/results.json exists; returns its results with the wall time."""
  from mae_jax import fileio  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'results.json')
  if fileio.exists(path):
    _log(f'[{name}] done earlier: {path}')
    return json.loads(fileio.read_text(path))
  _log(f'[{name}] starting in {workdir}')
  start = time.time()
  results = dict(fn(workdir))
  if results.get('status', 'done') != 'done':
    raise SystemExit(f'[{name}] stopped with status {results.get("status")}; run the study again to resume')
  results['wall_seconds'] = time.time() - start
  fileio.write_text(path, json.dumps(results, indent=2, sort_keys=True, default=float))
  _log(f'[{name}] done in {results["wall_seconds"]:.0f} s')
  return results


def _flat(result: dict) -> dict:
  return {k: v for k, v in result.items() if not isinstance(v, (list, dict))}


class Study:
  """The stages, sharing the data, the configs and the settings."""

  def __init__(self, root: str, scale: dict, data_dir: str, source_dir: str | None):
    import study_eval  # pylint: disable=g-import-not-at-top

    from configs import fashion_mnist_study  # pylint: disable=g-import-not-at-top
    from mae_jax.data import prepare, sources  # pylint: disable=g-import-not-at-top
    self.root, self.scale, self.data_dir = root, scale, data_dir
    source_dir = source_dir or sources.DEFAULT_FASHION_MNIST_DIR
    prepare.prepare_fashion_mnist(data_dir, source_dir=source_dir, progress=False)
    self.data = study_eval.load_fashion_mnist(source_dir)
    self.eval, self.configs = study_eval, fashion_mnist_study

  def config(self, stage: str, **args):
    args = {'stage': stage, 'data_dir': self.data_dir, 'model': self.scale['model'], **args}
    return self.configs.get_config(','.join(f'{k}={v}' for k, v in args.items()))

  def pretrain_config(self, epochs: float, knn_every: float, extra: str = ''):
    recipe = dict(self.scale['recipe'])
    if extra:  # One ablation change, e.g. 'decoder_depth=4'.
      key, value = extra.split('=')
      recipe[key] = value
    return self.config('pretrain', pretrain_epochs=epochs, knn_every_epochs=knn_every, **recipe)

  def pretrain(self, name: str, config) -> tuple[str, dict]:
    from mae_jax import train  # pylint: disable=g-import-not-at-top
    workdir = os.path.join(self.root, name)
    result = _stage(name, workdir, lambda w: _flat(train.train_and_evaluate(config, w)))
    return workdir, result

  def frozen_row(self, name: str, features_fn, **kwargs) -> dict:
    """kNN and linear probe of one row, cached in ROOT/frozen_NAME/results.json (kwargs: evaluate_row's)."""
    def run(workdir):
      del workdir
      return self.eval.evaluate_row(features_fn(), self.data, log=_log, **kwargs)
    return _stage(f'frozen features: {name}', os.path.join(self.root, f'frozen_{name}'), run)

  def encoder_features(self, pretrain_dir: str, config, pretrained: bool):
    """Features of the pretraining run's encoder: its last checkpoint, or the weights it started from."""
    import jax  # pylint: disable=g-import-not-at-top
    import optax  # pylint: disable=g-import-not-at-top

    from mae_jax import features  # pylint: disable=g-import-not-at-top
    from mae_jax.models import from_config  # pylint: disable=g-import-not-at-top
    kwargs, params, _ = features.load_encoder(workdir=pretrain_dir)
    if not pretrained:  # The same seed and initialisers as pretrain_step.build_train_step: its step-0 weights.
      init_rng, _ = jax.random.split(jax.random.key(config.seed))
      state = pretrain_step.init_state(from_config.build_mae(config), optax.identity(), config, init_rng)
      params = jax.device_get(state.params['encoder'])
    mean, std = config.dataset.mean[0], config.dataset.std[0]
    return lambda: self.eval.encoder_rows(kwargs, params, self.data, mean, std)

  def finetune(self, name: str, pretrained: str, seed: int, epochs: float) -> dict:
    from mae_jax import downstream  # pylint: disable=g-import-not-at-top
    config = self.config('finetune', pretrained_workdir=pretrained, seed=seed, finetune_epochs=epochs,
                         train_examples=0)
    return _stage(name, os.path.join(self.root, name), lambda w: _flat(downstream.train_and_evaluate(config, w)))


def run_study(study: Study, scale: dict, scale_name: str, start: float) -> dict:
  """Every stage of the study; returns the JSON document."""
  from mae_jax import metrics  # pylint: disable=g-import-not-at-top
  settings = dict(scale, recipe=dict(scale['recipe']))
  settings['seeds'] = list(scale['seeds'])
  config = study.pretrain_config(scale['pretrain_epochs'], scale['knn_every_epochs'])
  pretrain_dir, pretrain = study.pretrain('pretrain', config)
  mean, std = config.dataset.mean[0], config.dataset.std[0]
  frozen = {
      'pixels': study.frozen_row('pixels', lambda: study.eval.pixel_features(study.data, mean, std)),
      'random': study.frozen_row('random', study.encoder_features(pretrain_dir, config, pretrained=False)),
      'mae': study.frozen_row('mae', study.encoder_features(pretrain_dir, config, pretrained=True)),
  }
  tuned = {'mae': {}, 'scratch': {}}
  for seed in scale['seeds']:
    tuned['mae'][seed] = study.finetune(f'finetune_mae_seed{seed}', pretrain_dir, seed, scale['finetune_epochs'])
    tuned['scratch'][seed] = study.finetune(f'finetune_scratch_seed{seed}', '', seed, scale['finetune_epochs'])
  history = metrics.read_metrics(pretrain_dir)
  pixel_monitor = study_report.pixel_monitor_knn(config)
  return study_report.document(
      config=config, settings=settings, scale=scale_name, frozen=frozen, tuned=tuned, pretrain=pretrain,
      history=history, pixel_monitor=pixel_monitor, invocation_seconds=time.time() - start,
      machine=f'{platform.machine()}, {os.cpu_count()} CPU cores, {study_report.backend()}',
      date=datetime.date.today().isoformat())


def run_ablation(study: Study, epochs: float) -> str:
  """The ablation rows: pretrain each variant, score its encoder; returns the markdown table."""
  rows = []
  for index, (label, extra) in enumerate(ABLATIONS):
    config = study.pretrain_config(epochs, 0.0, extra)
    name = f'ablation{index}_' + (extra.replace('=', '_') or 'recipe')
    pretrain_dir, pretrain = study.pretrain(name, config)
    # Held-out figures only, one L2 penalty: the recipe is chosen without the test set.
    frozen = study.frozen_row(name, study.encoder_features(pretrain_dir, config, pretrained=True),
                              l2_grid=ABLATION_L2, test=False)
    rows.append({'label': label, 'change': extra, 'pretrain': pretrain, 'frozen': frozen})
  from mae_jax import fileio  # pylint: disable=g-import-not-at-top
  fileio.write_text(os.path.join(study.root, 'ablation.json'), json.dumps(rows, indent=2, default=float))
  return study_report.ablation_table(rows, epochs)


def main(argv):
  del argv
  os.environ.setdefault('JAX_PLATFORMS', 'cpu' if FLAGS.scale == 'small' else '')
  if not os.environ['JAX_PLATFORMS']:
    del os.environ['JAX_PLATFORMS']
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')
  console.setup('study', FLAGS.workdir)  # Library INFO logs to WORKDIR/logs/; --verbose shows them.
  start = time.time()
  scale = dict(SCALES[FLAGS.scale])
  for key in ('pretrain_epochs', 'finetune_epochs'):
    if getattr(FLAGS, key) is not None:
      scale[key] = getattr(FLAGS, key)
  if FLAGS.seeds:
    scale['seeds'] = tuple(int(s) for s in FLAGS.seeds)
  study = Study(os.path.abspath(FLAGS.workdir), scale, os.path.abspath(FLAGS.data_dir), FLAGS.source_dir)
  if FLAGS.mode == 'ablation':
    _log(run_ablation(study, FLAGS.ablation_epochs))
    return
  doc = run_study(study, scale, FLAGS.scale, start)
  if FLAGS.json_out:
    study_report.write_json(FLAGS.json_out, doc)
  if FLAGS.plot:
    study_report.plot(doc, FLAGS.plot)
  if FLAGS.readme:
    study_report.update_readme(FLAGS.readme, doc)
  _log(study_report.table(doc))
  _log(f'Study written: {FLAGS.json_out or "-"}, {FLAGS.plot or "-"} ({time.time() - start:.0f} s).')


if __name__ == '__main__':
  app.run(main)
