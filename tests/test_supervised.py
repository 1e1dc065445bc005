"""What fine-tuning and probing share: classification counts, settings checked before any compile.

Tiny models (mae_vit_test) on the labelled synthetic source, 8 CPU devices (tests/conftest.py).
"""

import os

import jax
import jax.numpy as jnp
import pytest

from configs import finetune as finetune_recipe
from configs import linprobe as linprobe_recipe
from mae_jax import finetune, linprobe, supervised

pytestmark = pytest.mark.usefixtures('jit_cache')


def test_top1_top5_count_only_real_rows_of_a_padded_batch():
  logits = jnp.array([
      [0.0, 9, 8, 7, 6, 5, 4],  # label 1: top-1.
      [0.0, 9, 8, 7, 6, 5, 4],  # label 4: rank 4, top-5 only.
      [9.0, 8, 7, 6, 5, 4, 0],  # label 6: last, neither.
      [0.0, 9, 8, 7, 6, 5, 4],  # Padding (label -1): would be a top-1 hit for label 1.
      [0.0, 9, 8, 7, 6, 5, 4]])
  labels = jnp.array([1, 4, 6, -1, 1])
  mask = jnp.array([True, True, True, False, False])
  counts = jax.device_get(supervised.classification_counts(logits, labels, mask))
  assert (counts['correct1'], counts['correct5'], counts['count']) == (1, 2, 3)
  summary = supervised.summarize_counts(counts)
  assert summary['eval/top1'] == pytest.approx(1 / 3) and summary['eval/top5'] == pytest.approx(2 / 3)


@pytest.mark.parametrize('recipe', [finetune_recipe, linprobe_recipe], ids=['finetune', 'linprobe'])
@pytest.mark.parametrize('key,value,match', [
    ('log_every_steps', 0, 'log_every_steps=0'),
    ('log_every_steps', -10, 'log_every_steps=-10'),
    ('max_nonfinite_steps', 0, 'max_nonfinite_steps=0'),
    ('max_nonfinite_steps', -1, 'max_nonfinite_steps=-1'),
    ('num_epochs', 0.1, r'num_epochs=0.1 x 4 steps per epoch \(64 examples.*is 0 training steps'),
])
def test_loop_settings_that_cannot_work_fail_before_any_compile(recipe, key, value, match, tmp_path,
                                                                monkeypatch):
  config = recipe.get_config('variant=B/16,runlocal=True')  # 64 examples, batch 16: 4 steps per epoch.
  if key == 'num_epochs':
    config.num_train_steps = -1
  config[key] = value
  monkeypatch.setattr(supervised, 'run', lambda *a, **k: pytest.fail('reached the training loop'))
  run = finetune.finetune if recipe is finetune_recipe else linprobe.linear_probe
  with pytest.raises(ValueError, match=match):
    run(config, str(tmp_path))
  assert not os.listdir(str(tmp_path))


@pytest.mark.parametrize('recipe,key,value,match', [
    (linprobe_recipe, 'label_smoothing', 1.5, r'label_smoothing=1.5: must be in \[0, 1\)'),
    (finetune_recipe, 'label_smoothing', -0.1, r'label_smoothing=-0.1: must be in \[0, 1\)'),
    (linprobe_recipe, 'freeze_encoder', False, 'freeze_encoder=False has no effect with downstream=linprobe'),
    (linprobe_recipe, 'mixup', 0.8, 'mixup=0.8 has no effect with downstream=linprobe, which works as mixup=0.0'),
    (linprobe_recipe, 'cutmix', 1.0, 'cutmix=1.0 has no effect with downstream=linprobe'),
    (linprobe_recipe, 'drop_path_rate', 0.1, 'drop_path_rate=0.1 has no effect with downstream=linprobe'),
    (finetune_recipe, 'head_batchnorm', True, 'head_batchnorm=True has no effect with downstream=finetune'),
    (finetune_recipe, 'probe_cached_features', True, 'probe_cached_features=True has no effect'),
    (finetune_recipe, 'freeze_encoder', True, 'freeze_encoder=True with downstream=finetune: use downstream=linprobe'),
    (linprobe_recipe, 'probe_cached_features', True, None),  # Passes alone; with reprob below it does not.
], ids=lambda v: v.__name__.split('.')[-1] if hasattr(v, '__name__') else None)
def test_settings_the_trainer_would_ignore_or_misread_are_refused(recipe, key, value, match):
  config = recipe.get_config('variant=B/16,runlocal=True')
  supervised.validate_config(config, None)  # The recipe itself passes.
  config[key] = value
  if match is None:
    supervised.validate_config(config, None)
    config.reprob = 0.25
    match = r'probe_cached_features=True encodes every image once.*reprob=0.25 would do nothing'
  with pytest.raises(ValueError, match=match):
    supervised.validate_config(config, None)


def test_randaugment_variants_not_implemented_are_refused():
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  config.randaug.increasing = False  # timm's inc0 ops: only the reference's inc1 ops exist here.
  with pytest.raises(ValueError, match='randaug.increasing=False: only timm'):
    supervised.validate_config(config, None)
