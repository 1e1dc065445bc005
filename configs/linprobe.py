r"""Linear probing of a frozen pretrained MAE encoder on ImageNet-1k (reference recipe).

  python -m mae_jax.main --config=configs/linprobe.py:variant=L/16 \
    --config.pretrained_workdir=gs://BUCKET/mae/l16_800ep --workdir=gs://BUCKET/mae/l16_lin

Arguments: variant=B/16|L/16|H/14 (default L/16), runlocal=True.

Recipe: the cls token of the frozen encoder -> BatchNorm without affine
(eps 1e-6) -> Linear (trunc-normal std 0.01); LARS (momentum 0.9, trust
coefficient 0.001, no LARS scaling or decay for 1-D tensors), base lr 0.1
(lr = 0.1 * 16384 / 256 = 6.4), weight decay 0, batch 16384, 10 warmup epochs
then cosine to 0, 90 epochs; RandomResizedCrop(224, bicubic) + flip only;
eval resizes the shorter side to 256 and takes the center 224 crop.
"""

from configs import common, default


def get_config(arg=None):
  """The linear-probe recipe of `variant`."""
  arg = common.parse_arg(arg, variant='L/16', runlocal=False)
  config = common.downstream_base('linprobe', arg.variant, default.get_config())

  config.batch_size = 16384  # Effective batch; lr = base_lr * batch_size / 256.
  config.num_epochs = 90
  config.log_every_steps = 20
  config.checkpoint_every_steps = 500  # About 6 epochs.
  config.keep_checkpoints = 2

  config.freeze_encoder = True
  config.global_pool = False  # The cls token.
  config.head_batchnorm = True  # BatchNorm(affine=False, eps=1e-6) before the Linear.
  config.head_batchnorm_eps = 1e-6
  config.head_init_std = 0.01
  config.drop_path_rate = 0.0
  # The reference's linprobe loads the checkpoint's table and freezes it: for a MAE checkpoint at its own
  # resolution that is the fixed sin-cos table. ('learned' would load a trained table, frozen too.)
  config.pos_embed = 'sincos'

  config.optim.name = 'lars'
  config.optim.base_lr = 0.1
  config.optim.min_lr = 0.0
  config.optim.warmup_epochs = 10.0
  config.optim.warmup_steps = -1  # Use warmup_epochs.
  config.optim.momentum = 0.9
  config.optim.trust_coefficient = 0.001
  config.optim.weight_decay = 0.0
  config.optim.grad_clip_norm = 0.0
  config.optim.layer_decay = 1.0  # Off: only the head trains.
  del config.optim.b1  # Adam settings mean nothing to LARS.
  del config.optim.b2

  if arg.runlocal:
    common.apply_runlocal(config)
  config.lock()  # Every key is declared above: a config file that sets an undeclared one (a typo) fails.
  return config
