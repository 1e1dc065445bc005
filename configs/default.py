"""Base pretraining config: every key that the trainer reads, with its default.

Experiment configs import this file and override only what changes. A config
file's `get_config(arg)` takes a big_vision-style string such as
`variant=L/16,runlocal=True`; see `configs/common.py` for the parsing.
"""

import ml_collections
from ml_collections import config_dict

from configs import common


def get_config(arg=None):
  """The default MAE pretraining config (a tiny model on Fashion-MNIST); `runlocal=True` as in the recipes."""
  try:
    arg = common.parse_arg(arg, runlocal=False)
  except ValueError as e:
    raise ValueError(f'configs/default.py: {e}. It is the base config, a tiny MAE on Fashion-MNIST; the '
                     'ImageNet recipes take a variant, e.g. --config=configs/mae_pretrain.py:variant=L/16') from None
  config = ml_collections.ConfigDict()

  config.seed = 0  # Seeds init, masking and data order.
  config.batch_size = 256  # Global batch over all processes and devices.
  config.num_epochs = 10.0  # Used when num_train_steps <= 0 (may be fractional).
  config.num_train_steps = -1  # > 0 overrides num_epochs.
  config.grad_accum_steps = 1  # Micro-batches per optimizer step (batch_size is the effective batch).
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.keep_checkpoints = 3
  config.eval_every_steps = -1  # kNN monitor period (eval/knn_top1); <= 0 disables it.
  # kNN monitor: cosine similarity, temperature-weighted votes of the k nearest.
  config.knn = ml_collections.ConfigDict()
  config.knn.k = 20
  config.knn.temperature = 0.07
  config.knn.train_examples = 10_000  # Size of the feature bank (first examples of train_split).
  config.knn.eval_examples = -1  # Queries from eval_split; -1 = all.
  config.knn.pool = 'cls'  # cls | mean
  config.knn.batch_size = 256
  # Classes of the labelled data set the kNN monitor reads; 0 = the data set's (synthetic data: 10).
  config.num_classes = 0
  config.visualize_every_steps = -1  # Reconstruction grid period; <= 0 disables it.
  config.profile_steps = 0  # > 0: capture a profiler trace of this many steps after step 10.
  config.max_nonfinite_steps = 10  # Stop after this many non-finite steps in a row.
  # Multi-process runs agree on a SIGTERM every this many steps (one all-gather), then all save and stop.
  config.preemption_sync_every_steps = 10
  # Resuming refuses a changed seed, batch_size, data set or process count (the data order and the lr
  # schedule would silently change); True resumes anyway.
  config.resume_allow_changes = False
  config.mask_ratio = 0.75
  config.norm_pix_loss = True
  # Warm start: pretraining starts (step 0, fresh optimizer) from these weights: a reference .pth, a
  # safetensors file, a Hugging Face folder, a mae_jax export or a workdir. '' = random init. A
  # checkpoint in the run's own workdir always wins (resume).
  config.init_from = ''

  # Optional Weights & Biases tracking (pip install 'mae_jax[wandb]'); process 0 only.
  config.wandb = ml_collections.ConfigDict()
  config.wandb.enabled = False
  config.wandb.project = 'mae-jax'
  config.wandb.entity = ''  # '' = your default entity.
  config.wandb.name = ''  # '' = the workdir's name.
  config.wandb.group = ''
  config.wandb.tags = ()
  config.wandb.mode = ''  # '' = wandb's default (WANDB_MODE); online | offline | disabled.

  # Model: a name from mae_jax.models.MODELS plus overrides of its fields.
  config.model = ml_collections.ConfigDict()
  config.model.name = 'mae_vit_tiny_patch4'
  config.model.dtype = 'float32'  # Compute dtype: float32 or bfloat16.
  config.model.remat_policy = 'none'  # none | full | dots | dots_no_batch
  config.model.scan_layers = False  # nn.scan over blocks: fast compiles for deep models.
  config.model.attention_impl = 'xla'  # xla | cudnn (GPU) | tpu_flash (TPU) | naive
  config.model.encoder_mask_tokens = False  # Ablation: mask tokens in the encoder.
  # Sizes, when not the name's (None = the name's; recipes set the decoder's).
  config.model.patch_size = config_dict.placeholder(int)
  config.model.embed_dim = config_dict.placeholder(int)  # Encoder width.
  config.model.depth = config_dict.placeholder(int)  # Encoder blocks.
  config.model.num_heads = config_dict.placeholder(int)
  config.model.mlp_ratio = config_dict.placeholder(float)  # Hidden width / width, encoder and decoder.
  config.model.decoder_embed_dim = config_dict.placeholder(int)  # Decoder width.
  config.model.decoder_depth = config_dict.placeholder(int)  # Decoder blocks.
  config.model.decoder_num_heads = config_dict.placeholder(int)

  # Data.
  # Not type-locked: image_size takes a side (28) or (height, width) in config files.
  config.dataset = ml_collections.ConfigDict(type_safe=False)
  config.dataset.name = 'fashion_mnist'  # A tfds name, prepared with mae_jax.data.prepare if local.
  config.dataset.data_dir = ''  # '' = ~/tensorflow_datasets; local path or gs://.
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'test'
  config.dataset.image_size = 28  # Model input: a square side, or (height, width) e.g. (48, 32).
  config.dataset.channels = 1  # 1 grey, 3 RGB, or an array data set's channel count.
  # Per-channel normalisation: [0, 1] units for integer pixels (value / 255 or / 65535), stored units for
  # float pixels. () = the statistics mae_jax.data.prepare stored in the data set's metadata.
  config.dataset.mean = (0.2860,)
  config.dataset.std = (0.3530,)
  config.dataset.display_bands = ()  # Channels shown as RGB in reconstruction grids; () = first three.
  config.dataset.crop_scale = (0.2, 1.0)  # RandomResizedCrop area range.
  config.dataset.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop aspect range.
  config.dataset.eval_resize = 256  # Eval: resize shorter side (scaled by image_size / 224).
  config.dataset.shuffle_buffer = 10_000
  config.dataset.cache = False  # Cache decoded examples in memory (small data sets).
  # Undecodable images are replaced and counted; above this share of the images read, the run stops.
  config.dataset.max_corrupt_fraction = 0.01
  config.dataset.prefetch = 2  # Batches prefetched to the devices.
  config.dataset.num_examples = 1024  # Only for name='synthetic' (tests, benchmarks).

  # Optimizer (pretraining recipe of the reference).
  config.optim = ml_collections.ConfigDict()
  config.optim.name = 'adamw'
  config.optim.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256.
  config.optim.min_lr = 0.0
  config.optim.warmup_epochs = 1.0
  config.optim.warmup_steps = -1  # > 0 overrides warmup_epochs.
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.05
  config.optim.grad_clip_norm = 0.0  # > 0 clips by global norm.
  # Pretraining decays every tensor but 1-D ones and biases (cls and mask tokens too).
  config.optim.no_decay_names = ()
  config.optim.layer_decay = 1.0  # Layer-wise lr decay (fine-tuning); 1 disables it.
  config.optim.momentum = 0.9  # sgd and lars.
  config.optim.trust_coefficient = 0.001  # lars.

  # Device mesh; -1 = all remaining devices (of a slice, see dcn_data). Product must equal the device count
  # (or a slice's: several slices, or hosts of a GPU job, are data-parallel replicas; parallel.resolve_mesh_shape).
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.num_devices = -1  # Use the first N devices; -1 = all.
  config.mesh.dcn_data = 1  # Multi-slice: data-parallel replicas across slices.
  # Partition rules: ((regex over param paths, spec), ...); first match wins.
  # A spec is a tuple of axis names for the trailing dims, 'fsdp' (largest
  # divisible dim) or 'replicate'. Empty = mae_jax.parallel.DEFAULT_RULES.
  config.mesh.rules = ()
  config.mesh.min_fsdp_size = 2**18  # Smaller tensors stay replicated.

  if arg.runlocal:
    common.apply_runlocal(config)
  config.lock()  # Every key is declared above: a config file that sets an undeclared one (a typo) fails.
  return config
