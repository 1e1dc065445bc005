r"""Downstream evaluation of an MAE encoder: `python -m mae_jax.downstream` is `python -m mae_jax.main`.

  python -m mae_jax.downstream --config=configs/finetune.py:variant=B/16 \
    --config.pretrained_workdir=PRETRAIN_DIR --workdir=FT_DIR

`config.downstream` picks what runs: `finetune` (mae_jax.finetune), `linprobe`
(mae_jax.linprobe) or `knn` (mae_jax.knn). What fine-tuning and probing share
is in mae_jax.supervised, the training loop in mae_jax.loop.

The pretrained encoder comes from `pretrained_workdir` (a pretraining or
fine-tuning run's checkpoints), or `pretrained_path` (an export of
mae_jax.export, a reference .pth, safetensors or a Hugging Face folder); with
neither, the encoder starts from random weights (runlocal, tests, baselines).
"""

import ml_collections
from absl import app, flags

from mae_jax import config_tools, console, supervised
from mae_jax import main as main_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs what config.downstream names: finetune, linprobe or knn."""
  return main_lib.DOWNSTREAM[supervised.kind(config)](config, workdir)


def run():
  """Console-script entry point: mae-jax-downstream --config=... --workdir=... (the same as mae-jax)."""
  main_lib.define_flags()
  flags.adopt_module_key_flags(main_lib)  # --help lists them.
  flags.adopt_module_key_flags(console)
  app.run(main_lib.main, flags_parser=config_tools.parse_flags)


if __name__ == '__main__':
  run()
