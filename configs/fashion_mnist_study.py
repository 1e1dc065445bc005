r"""Fashion-MNIST study: the stages' configs (pretraining, fine-tuning, and by-hand probes).

benchmarks/fashion_mnist_study.py runs every stage and prints the table; one
stage by hand:

  python -m mae_jax.main --config=configs/fashion_mnist_study.py:stage=pretrain \
    --workdir=workdirs/fm_study/pretrain
  python -m mae_jax.downstream \
    --config=configs/fashion_mnist_study.py:stage=finetune,pretrained_workdir=workdirs/fm_study/pretrain \
    --workdir=workdirs/fm_study/finetune_mae

Arguments (all optional):
  stage=pretrain|linprobe|knn|finetune: what the config trains (default pretrain).
  pretrained_workdir=DIR: the encoder of the downstream stages; empty = random
    weights (linprobe / knn) or training from scratch (finetune).
  data_dir=DIR: the prepared Fashion-MNIST (mae_jax.data.prepare).
  model=NAME: the model (default: configs/demo.py's mae_vit_mini_patch4).
  pretrain_epochs, finetune_epochs, probe_epochs: schedule lengths.
  Pretraining recipe (the study's ablation varies these): norm_pix, decoder_depth, lr (base lr
    at batch 256), crop_min, mask_ratio; knn_every_epochs: the kNN monitor's period (<= 0: at
    the end only).
  train_examples=N: labelled examples of the downstream stages (the first N of
    'train'; <= 0: all 60,000). Pretraining always reads all of 'train' (no
    labels used).
  seed=N.

Data: 'train' for pretraining, the first train_examples of 'train' downstream
(the study uses all of them), the 10,000-image 'test' split for every
evaluation, with no eval-time resize (eval_resize=224 keeps 28x28 as is).

Fine-tuning (the study's): AdamW (0.9, 0.999), batch 256, base lr 1e-3, wd
0.05, layer decay 0.75 (1.0 from scratch: nothing to preserve), warmup 0.25
epoch then cosine, global pool + fc_norm, and a light recipe for 28x28
greyscale garments over a few hundred steps: random resized crop 0.5-1 and
flips, no RandAugment / mixup / cutmix / erasing, label smoothing 0.1, drop
path 0.1.

The linprobe / knn stages run the library's downstream jobs by hand (the
study itself scores frozen features with benchmarks/study_eval.py): cls token
after the encoder's norm, BatchNorm (no affine) + Linear, LARS (momentum 0.9,
trust 0.001), 10 warmup epochs, wd 0, on features encoded once
(probe_cached_features), which also gives kNN (k=20, T=0.07) of the same
features. The probe's base lr is larger than the reference's 0.1 because the
data set is 128x smaller than ImageNet: LARS moves each tensor by about lr x
0.001 of its norm per step, so an epoch of 10,000 examples at base lr 0.1
moves it 128x less than an ImageNet epoch does.
"""


from configs import common, demo, finetune, linprobe

STAGES = ('pretrain', 'linprobe', 'knn', 'finetune')


def demo_model() -> str:
  """The model of configs/demo.py: pretraining and every downstream stage use it."""
  return demo.get_config().model.name


def _set_data(config, data_dir: str, train_examples: int):
  """Fashion-MNIST as configs/demo.py prepares it; eval images are not resized."""
  dataset = config.dataset
  dataset.name = 'fashion_mnist'
  dataset.data_dir = data_dir
  dataset.train_split = f'train[:{train_examples}]' if train_examples > 0 else 'train'
  dataset.eval_split = 'test'
  dataset.image_size = 28
  dataset.channels = 1
  dataset.mean = (0.2860,)
  dataset.std = (0.3530,)
  dataset.crop_scale = (0.35, 1.0)  # 28x28 images: avoid near-empty crops (as demo.py).
  dataset.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  dataset.eval_resize = 224  # Shorter side to 28 * 224 / 224: no zoom at eval.
  dataset.cache = True
  dataset.shuffle_buffer = 60_000


def _set_small_model(config, model: str = ''):
  config.model.name = model or demo_model()
  config.model.dtype = 'float32'
  config.model.scan_layers = False
  config.model.remat_policy = 'none'
  config.model.attention_impl = 'xla'
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1


def _set_epochs(config, epochs: float):
  """num_epochs as a float (the recipes hold an int there)."""
  with config.unlocked():  # The recipes lock their keys; this one changes type.
    del config['num_epochs']
    config.num_epochs = float(epochs)


def _knn(config):
  config.knn.k = 20
  config.knn.temperature = 0.07
  config.knn.train_examples = -1  # All of dataset.train_split.
  config.knn.eval_examples = -1
  config.knn.pool = 'cls'
  config.knn.batch_size = 500


def get_config(arg=None):
  """The config of one stage of the study (`runlocal=True`: a few CPU steps of it)."""
  parsed = common.parse_arg(arg, stage='pretrain', pretrained_workdir='', data_dir='.data/tensorflow_datasets',
                            pretrain_epochs=2.0, finetune_epochs=7.0, probe_epochs=100.0,
                            train_examples=10_000, seed=0, runlocal=False,
                            norm_pix=False, decoder_depth=2, lr=1.5e-3, crop_min=0.35, mask_ratio=0.75,
                            knn_every_epochs=0.0, model='')
  config = _stage_config(parsed)
  return common.apply_runlocal(config) if parsed.runlocal else config


def _stage_config(arg):
  """The full-size config of one stage."""
  if arg.stage not in STAGES:
    raise ValueError(f'stage={arg.stage!r}: must be one of {STAGES}')

  if arg.stage == 'pretrain':
    config = demo.get_config(f'data_dir={arg.data_dir}')
    config.seed = arg.seed
    if arg.model:
      config.model.name = arg.model
    config.num_train_steps = -1
    _set_epochs(config, arg.pretrain_epochs)
    # The recipe's knobs (the study's ablation varies them one at a time).
    config.norm_pix_loss = arg.norm_pix
    config.model.decoder_depth = arg.decoder_depth
    config.optim.base_lr = arg.lr
    config.mask_ratio = arg.mask_ratio
    config.dataset.crop_scale = (arg.crop_min, 1.0)
    config.optim.warmup_steps = -1
    config.optim.warmup_epochs = min(1.0, arg.pretrain_epochs / 8)
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    config.keep_checkpoints = 1
    # The kNN monitor (mean-pooled patch tokens, 10,000-image bank, 5,000 test queries as the demo):
    # every knn_every_epochs (<= 0: once, at the end).
    steps_per_epoch = 60_000 // config.batch_size
    total = round(arg.pretrain_epochs * steps_per_epoch)
    every = int(arg.knn_every_epochs * steps_per_epoch)
    config.eval_every_steps = every if every > 0 else total
    return config

  if arg.stage == 'finetune':
    config = finetune.get_config('variant=B/16')
  else:
    config = linprobe.get_config('variant=B/16')
    if arg.stage == 'knn':
      config.downstream = 'knn'
  _set_small_model(config, arg.model)
  _set_data(config, arg.data_dir, arg.train_examples)
  _knn(config)
  config.seed = arg.seed
  config.num_classes = 10
  config.pretrained_workdir = arg.pretrained_workdir
  config.pretrained_path = ''
  config.num_train_steps = -1
  config.grad_accum_steps = 1
  config.keep_checkpoints = 1
  config.log_every_steps = 20
  config.eval_batch_size = 500

  if arg.stage == 'finetune':
    config.batch_size = 256
    _set_epochs(config, arg.finetune_epochs)
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 10**9  # Evaluate once, at the end.
    # A recipe for 28x28 greyscale garments and a schedule of a few hundred steps: light
    # augmentation (a random resized crop of at least half the image, flips), no RandAugment (its
    # Invert / Solarize and grey fills change what a garment looks like), no mixup / cutmix, no
    # erasing; label smoothing 0.1 and drop path 0.1 as the only regularisers.
    config.dataset.crop_scale = (0.5, 1.0)
    config.randaug.num_layers = 0
    config.mixup = 0.0
    config.cutmix = 0.0
    config.mixup_prob = 0.0
    config.reprob = 0.0
    config.drop_path_rate = 0.1
    config.label_smoothing = 0.1
    config.optim.base_lr = 1e-3
    config.optim.warmup_epochs = min(0.25, arg.finetune_epochs / 4)
    # From scratch there is nothing to preserve in the lower layers.
    config.optim.layer_decay = 0.75 if arg.pretrained_workdir else 1.0
  else:
    config.batch_size = 256
    _set_epochs(config, arg.probe_epochs)
    config.checkpoint_every_steps = 1000
    config.eval_every_steps = 10**9
    config.probe_cached_features = True
    config.optim.base_lr = 2.0
    config.optim.warmup_epochs = min(10.0, arg.probe_epochs / 10)
  return config
