"""Demo: a tiny MAE on Fashion-MNIST (prepared from Debian's dataset-fashion-mnist).

A few minutes on a laptop CPU:
  python -m mae_jax.demo
or by hand:
  python -m mae_jax.data.prepare --source=fashion_mnist --data_dir=.data/tensorflow_datasets
  python -m mae_jax.main --config=configs/demo.py --workdir=workdirs/demo
Arguments: `steps=N` (default 600), `data_dir=PATH`.

Plain pixel targets (norm_pix_loss=False): on 4x4 greyscale patches, per-patch
normalised targets turn flat patches into zeros and near-flat ones into noise,
and the reconstructions are not recognisable; plain targets keep the
silhouette. The kNN monitor (mean-pooled patch tokens) runs 4 times a run.
"""

from configs import common, default


def get_config(arg=None):
  """A mini ViT (28x28, 4x4 patches, width 128, depth 4) on Fashion-MNIST; `steps=N,data_dir=DIR`."""
  args = common.parse_arg(arg, steps=600, data_dir='.data/tensorflow_datasets', runlocal=False)
  if args.steps < 1:
    raise ValueError(f'config argument steps={args.steps}: must be >= 1')
  config = default.get_config()
  config.dataset.name = 'fashion_mnist'
  config.dataset.data_dir = args.data_dir
  config.dataset.image_size = 28
  config.dataset.channels = 1
  config.dataset.mean = (0.2860,)
  config.dataset.std = (0.3530,)
  config.dataset.crop_scale = (0.35, 1.0)  # 28x28 images: avoid near-empty crops
  config.dataset.cache = True
  config.model.name = 'mae_vit_mini_patch4'
  config.mask_ratio = 0.75
  config.norm_pix_loss = False  # Plain pixels: recognisable reconstructions (see the module doc).
  config.batch_size = 256
  config.num_train_steps = args.steps
  config.log_every_steps = min(50, max(1, config.num_train_steps))
  config.checkpoint_every_steps = 200
  # kNN monitor: eval/knn_top1 4 times a run (the last at the final step: a period rounded up).
  config.eval_every_steps = max(1, -(-config.num_train_steps // 4))
  config.knn.pool = 'mean'  # Mean-pooled patch tokens: the MAE loss reaches them, not the cls token.
  config.knn.train_examples = 10_000  # Bank: the first 10,000 training images.
  config.knn.eval_examples = 5_000  # Queries: the first 5,000 test images (about 30 s an evaluation on 2 cores).
  config.optim.base_lr = 1.5e-4 * 10  # short schedule: a higher lr than the 800-epoch recipe
  config.optim.warmup_steps = min(50, max(1, config.num_train_steps // 12))  # 50 of the default 600
  if args.runlocal:
    common.apply_runlocal(config)
  return config
