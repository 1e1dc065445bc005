"""A tiny synthetic pretraining config for tests: 3 steps of mae_vit_test on 32x32x3.

  python -m mae_jax.main --config=configs/test.py --workdir=/tmp/mae_test

Arguments: steps=N (default 3), runlocal=True (accepted for symmetry; the
config is already local-sized).
"""

from configs import common, default


def get_config(arg=None):
  """The reference pretraining settings on a model and data set small enough for unit tests."""
  arg = common.parse_arg(arg, steps=common.RUNLOCAL_STEPS, runlocal=False)
  if arg.steps < 1:
    raise ValueError(f'config argument steps={arg.steps}: must be >= 1')
  config = default.get_config()
  # Reference optimizer, mask ratio and loss; only the size of the job is tiny.
  config.model.decoder_embed_dim = 32  # Decoder width (swept by tiny_demo_sweep).
  config.model.decoder_depth = 1  # Decoder blocks (swept by tiny_demo_sweep).
  config.model.decoder_num_heads = 2  # Decoder attention heads.
  common.apply_runlocal(config)
  config.num_train_steps = arg.steps  # Optimizer steps of the run.
  return config
