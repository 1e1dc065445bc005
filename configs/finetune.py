r"""End-to-end fine-tuning of a pretrained MAE encoder on ImageNet-1k (reference recipe).

  python -m mae_jax.main --config=configs/finetune.py:variant=B/16 \
    --config.pretrained_workdir=gs://BUCKET/mae/b16_1600ep --workdir=gs://BUCKET/mae/b16_ft
  python -m mae_jax.main --config=configs/finetune.py:variant=H/14@448 \
    --config.pretrained_path=mae_pretrain_vit_huge.pth --workdir=gs://BUCKET/mae/h14_448_ft

Arguments: variant=B/16|L/16|H/14 (default L/16), optionally @SIZE for another
resolution (H/14@448: the paper's 87.8), runlocal=True.

Per variant (epochs, base lr, layer decay, drop path): B/16 100, 5e-4, 0.65,
0.1; L/16 50, 1e-3, 0.75, 0.2; H/14 50, 1e-3, 0.75, 0.3. Shared: batch 1024,
AdamW (0.9, 0.999), weight decay 0.05 (not on biases, norms, cls and position
tables), 5 warmup epochs then cosine to 1e-6, RandAugment m9 mstd0.5, label
smoothing 0.1, mixup 0.8, cutmix 1.0 (switch prob 0.5), random erasing 0.25,
global average pool + fc_norm, head init std 2e-5, a learned position table
initialised from the checkpoint's (timm's ViT; interpolated bicubically when
the resolution differs); eval resizes the shorter side to 256 (bicubic) and
takes the center 224 crop (above 224: no zoom, the center crop of the image
resized to SIZE).
"""

from configs import common, default
from mae_jax import optim as optim_lib
from mae_jax.models import mae as mae_models

# variant: (epochs, base_lr, layer_decay, drop_path_rate). The reference's FINETUNE.md
# (facebookresearch/mae; the paper's Table 9 has drop path 0.1 B/L, 0.2 H for its
# unnormalised-pixel checkpoints).
RECIPES = {
    'B/16': (100, 5e-4, 0.65, 0.1),
    'L/16': (50, 1e-3, 0.75, 0.2),
    'H/14': (50, 1e-3, 0.75, 0.3),
}
# VARIANT@SIZE: the variant's recipe at another resolution (the paper fine-tunes ViT-H at 448
# with its ViT-H settings: batch 1024, blr 1e-3, layer decay 0.75, 50 epochs; 87.8 top-1), and
# what changes in the pod layout. 448/14 = 32x32 = 1024 patches, 5.2x the tokens of 224: remat
# `dots_no_batch` keeps the weight matmuls' outputs but not the [16, 1025, 1025] attention
# logits of each block ('dots' would keep them). Compiled for v4-128 (64 chips, 16 images per
# chip) in BENCHMARKS.md.
HIGH_RES_LAYOUTS = {
    'H/14@448': {'remat_policy': 'dots_no_batch'},
}


def split_variant(variant: str) -> tuple[str, int | None]:
  """'H/14@448' -> ('H/14', 448); 'L/16' -> ('L/16', None)."""
  base, sep, size = variant.partition('@')
  if not sep:
    return base, None
  try:
    return base, int(size)
  except ValueError:
    raise ValueError(f'variant={variant!r}: expected VARIANT@SIZE with an integer size, e.g. H/14@448') from None


def get_config(arg=None):
  """The fine-tuning recipe of `variant`."""
  arg = common.parse_arg(arg, variant='L/16', runlocal=False)
  base, image_size = split_variant(arg.variant)
  common.variant_settings(base)  # Names close matches for a typo.
  epochs, base_lr, layer_decay, drop_path_rate = RECIPES[base]
  config = common.downstream_base('finetune', base, default.get_config())

  config.batch_size = 1024  # Effective batch; lr = base_lr * batch_size / 256.
  config.num_epochs = epochs
  config.log_every_steps = 100
  config.checkpoint_every_steps = 1250  # About one epoch.
  config.keep_checkpoints = 2

  config.drop_path_rate = drop_path_rate
  config.global_pool = True  # Mean of the patch tokens, then fc_norm.
  config.head_init_std = 2e-5
  # timm's learned table, initialised from the checkpoint's (fixed sin-cos for a MAE checkpoint) and
  # bicubically interpolated to dataset.image_size, as the reference's interpolate_pos_embed.
  config.pos_embed = 'learned'

  config.label_smoothing = 0.1
  config.mixup = 0.8
  config.cutmix = 1.0
  config.mixup_prob = 1.0
  config.mixup_switch_prob = 0.5
  config.randaug.num_layers = 2  # rand-m9-mstd0.5-inc1.
  config.randaug.magnitude = 9
  config.randaug.magnitude_std = 0.5
  config.reprob = 0.25

  config.optim.name = 'adamw'
  config.optim.base_lr = base_lr
  config.optim.min_lr = 1e-6
  config.optim.warmup_epochs = 5.0
  config.optim.warmup_steps = -1  # Use warmup_epochs.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.weight_decay = 0.05
  config.optim.grad_clip_norm = 0.0  # The reference does not clip.
  config.optim.layer_decay = layer_decay  # lr scale decay ** (depth + 1 - layer id).
  # timm's no_weight_decay() list: cls token and position tables are not decayed.
  config.optim.no_decay_names = optim_lib.NO_DECAY_NAMES

  if image_size is not None:
    set_resolution(config, arg.variant, image_size)
  if arg.runlocal:
    common.apply_runlocal(config)
  config.lock()  # Every key is declared above: a config file that sets an undeclared one (a typo) fails.
  return config


def set_resolution(config, variant: str, image_size: int) -> None:
  """Fine-tunes at image_size: the input, the eval resize and the variant's high-resolution layout."""
  base, _ = split_variant(variant)
  patch_size = mae_models.MODELS[config.model.name]['patch_size']
  if image_size <= 0 or image_size % patch_size:
    raise ValueError(f'variant={variant!r}: the size must be a positive multiple of the patch size {patch_size}')
  config.dataset.image_size = image_size
  # The reference's eval resize: crop_pct 224/256 up to 224, 1.0 above (data.augment.eval_resize_size);
  # eval_resize=224 gives exactly that above 224 with either rule of the input pipeline.
  if image_size > 224:
    config.dataset.eval_resize = 224
  config.model.update(HIGH_RES_LAYOUTS.get(f'{base}@{image_size}', {}))
