"""Fine-tuning: layer-wise lr decay, exact resume, pretrained encoders, FSDP over two processes.

Tiny models (mae_vit_test) on the labelled synthetic source, 8 CPU devices (tests/conftest.py).
"""

import json
import os
import shutil
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import finetune as finetune_recipe
from mae_jax import checkpoint, finetune, loop, metrics, optim, parallel, supervised
from mae_jax.data import augment
from mae_jax.models import from_config
from mae_jax.models import pos_embed as pos_tables
from mae_jax.weights import pretrained as pretrained_lib
from tests import two_processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures('jit_cache')


def flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def reference_layer_id(path: str, depth: int) -> int:
  """The reference's layer id (timm / BEiT param groups) of a classifier parameter path."""
  names = path.split('/')
  if names[0] != 'encoder':
    return depth + 1  # fc_norm, head.
  if names[1] in ('cls_token', 'pos_embed', 'patch_embed'):
    return 0
  if names[1].startswith('blocks_'):
    return int(names[1].split('_')[1]) + 1
  return depth + 1


def test_layer_decay_scales_every_vit_b_parameter_of_the_finetune_recipe():
  config = finetune_recipe.get_config('variant=B/16')
  model = from_config.build_classifier(config, 1000)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))['params']
  decay = config.optim.layer_decay
  scales = flat(optim.layerwise_lr_scales(params, 12, decay))
  # patch embed (2) + cls + the learned position table, 12 blocks, fc_norm (2) + head (2).
  assert len(scales) == 4 + 12 * 16 + 4 and 'encoder/pos_embed' in scales
  assert 'encoder/norm/scale' not in scales  # Global pool: fc_norm replaces the final norm.
  for path, scale in scales.items():
    np.testing.assert_allclose(scale, decay ** (13 - reference_layer_id(path, 12)), rtol=1e-6, err_msg=path)


def test_finetune_optimizer_first_step_is_lr_times_the_layer_scale():
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')
  config.optim.weight_decay = 0.0
  config.optim.warmup_steps = -1
  config.optim.warmup_epochs = 0.0
  model = from_config.build_classifier(config, 10)
  depth = model.encoder['depth']
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])
  tx, lr_fn = supervised.make_optimizer(config, abstract, depth, steps_per_epoch=10, total_steps=100)

  @jax.jit
  def first_update():
    params = jax.tree.map(lambda x: jnp.full(x.shape, 0.5, x.dtype), abstract)
    return tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[0]

  updates = first_update()
  peak = float(lr_fn(0))
  assert peak == pytest.approx(config.optim.base_lr * config.batch_size / 256)
  for path, update in flat(updates).items():
    want = -peak * config.optim.layer_decay ** (depth + 1 - reference_layer_id(path, depth))
    np.testing.assert_allclose(update, np.full(update.shape, want), rtol=1e-5, err_msg=path)


def _finetune_config(steps=4):
  config = finetune_recipe.get_config('variant=B/16,runlocal=True')  # Every augmentation of the recipe.
  config.num_train_steps = steps
  config.checkpoint_every_steps = 2
  config.keep_checkpoints = 3
  config.eval_batch_size = 8  # Declared in the downstream configs: evaluation in batches of 8.
  return config


def test_finetune_checkpoints_and_resumes_exactly(tmp_path):
  config = _finetune_config()
  full = str(tmp_path / 'full')
  result = finetune.finetune(config, full)
  assert result['status'] == 'done' and result['step'] == 4
  assert 0 <= result['eval/top1'] <= result['eval/top5'] <= 1 and np.isfinite(result['train/loss'])
  assert sorted(checkpoint.load_meta(full, 2)['eval']) == []  # No eval before the end.
  with open(os.path.join(full, 'results.json'), encoding='utf-8') as f:
    assert json.load(f)['eval/top1'] == result['eval/top1']

  # A run that stopped after step 2: the step-2 checkpoint alone.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(os.path.join(full, 'checkpoints'), os.path.join(resumed, 'checkpoints'))
  shutil.rmtree(os.path.join(resumed, 'checkpoints', '4'))
  assert checkpoint.latest_step(resumed) == 2
  again = finetune.finetune(config, resumed)
  assert again['step'] == 4
  for (path, a), b in zip(flat(checkpoint.load_params(full)[0]).items(),
                          flat(checkpoint.load_params(resumed)[0]).values()):
    np.testing.assert_array_equal(a, b, err_msg=path)
  losses = {r['step']: r['train/loss'] for r in metrics.read_metrics(full) if 'train/loss' in r}
  resumed_losses = {r['step']: r['train/loss'] for r in metrics.read_metrics(resumed) if 'train/loss' in r}
  assert resumed_losses == {3: losses[3], 4: losses[4]}
  assert again['eval/top1'] == result['eval/top1']


def test_finetune_at_another_resolution_starts_from_the_pretrained_encoder(pretrained, tmp_path):
  """Pretrained at 32x32 (4x4 patches), fine-tuned at 48x48: the learned table starts from the resized one."""
  config = _finetune_config(steps=1)
  config.dataset.image_size = 48
  config.pretrained_workdir = pretrained
  config.optim.base_lr = 0.0  # Nothing moves: the checkpoint holds the loaded weights.
  finetune.finetune(config, str(tmp_path))
  tuned = flat(checkpoint.load_params(str(tmp_path))[0])
  source = flat(checkpoint.load_params(pretrained)[0]['encoder'])
  encoder = {k.removeprefix('encoder/'): v for k, v in tuned.items() if k.startswith('encoder/')}
  assert set(source) - set(encoder) == {'norm/scale', 'norm/bias'}  # Global pool: fc_norm instead.
  assert set(encoder) - set(source) == {'pos_embed'}  # The MAE's table is fixed; fine-tuning learns one.
  for key, value in encoder.items():
    if key != 'pos_embed':
      np.testing.assert_array_equal(value, source[key], err_msg=key)
  assert {k.split('/')[0] for k in tuned} == {'encoder', 'fc_norm', 'head'}
  # The checkpoint's fixed 4x4 table, resized to 6x6 as the reference's interpolate_pos_embed does.
  fixed = pos_tables.get_2d_sincos_pos_embed(32, 4, cls_token=True)[None]
  np.testing.assert_array_equal(encoder['pos_embed'], pos_tables.resize_pos_embed(fixed, 4, 6))


def test_pretrained_encoder_that_does_not_fit_is_one_clear_error(pretrained):
  config = _finetune_config()
  config.pretrained_workdir = pretrained
  encoder, source = pretrained_lib.load_pretrained_encoder(config)
  wide = from_config.build_classifier(config, 10).clone(encoder={**from_config.encoder_kwargs(config), 'embed_dim': 64})
  params = jax.eval_shape(lambda: wide.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))['params']
  with pytest.raises(ValueError, match='does not fit model.name.*shape mismatches'):
    pretrained_lib.merge_encoder(params, encoder, source)


def test_two_processes_fine_tune_fsdp_over_both_from_pretrained_weights(pretrained, tmp_path):
  """mesh fsdp=-1 over 2 processes x 4 devices: every parameter spans both processes.

  Loading the pretrained encoder must not fetch a parameter to one host; the
  run matches a 1-process run on 8 devices (lr 0: the checkpoint holds exactly
  the loaded weights).
  """
  overrides = {'mesh.data': 1, 'mesh.fsdp': -1, 'mesh.min_fsdp_size': 1, 'num_train_steps': 1,
               'optim.base_lr': 0.0, 'pretrained_workdir': pretrained, 'randaug.num_layers': 0, 'reprob': 0.0,
               'mixup': 0.0, 'cutmix': 0.0}
  spec = 'variant=L/16,runlocal=True'
  multi = str(tmp_path / 'multi')
  port = two_processes.free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  command = [sys.executable, '-m', 'mae_jax.downstream', f'--config=configs/finetune.py:{spec}',
             f'--workdir={multi}', *[f'--config.{k}={v}' for k, v in overrides.items()],
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--verbose']
  single = str(tmp_path / 'single')

  def single_process_run():  # Meanwhile the same run in this process, on 8 devices.
    config = finetune_recipe.get_config(spec)
    config.update_from_flattened_dict(overrides)
    finetune.finetune(config, single)

  codes, outputs = two_processes.run(command, env, REPO, tmp_path, timeout=240, meanwhile=single_process_run)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  assert all('Loaded the pretrained encoder' in out for out in outputs)

  results = {}
  for workdir in (multi, single):
    with open(os.path.join(workdir, loop.RESULTS_FILE), encoding='utf-8') as f:
      results[workdir] = json.load(f)
  assert results[multi]['status'] == 'done' and results[multi]['step'] == 1
  for key in ('eval/top1', 'eval/top5', 'eval/loss', 'eval/num_examples', 'train/loss'):
    np.testing.assert_allclose(results[multi][key], results[single][key], rtol=1e-5, err_msg=key)
  tuned = flat(checkpoint.load_params(multi)[0])
  source = flat(checkpoint.load_params(pretrained)[0]['encoder'])
  assert {k.split('/')[0] for k in tuned} == {'encoder', 'fc_norm', 'head'}
  fixed = pos_tables.get_2d_sincos_pos_embed(32, 4, cls_token=True)[None]  # Same grid: the table as it was.
  for key, value in tuned.items():
    if key.startswith('encoder/'):
      np.testing.assert_array_equal(value, source.get(key.removeprefix('encoder/'), fixed), err_msg=key)
  for key, value in flat(checkpoint.load_params(single)[0]).items():
    np.testing.assert_array_equal(tuned[key], value, err_msg=key)


def test_merged_encoder_is_host_arrays_and_the_rest_is_untouched(pretrained):
  config = _finetune_config()
  config.pretrained_workdir = pretrained
  encoder, source = pretrained_lib.load_pretrained_encoder(config)
  model = from_config.build_classifier(config, 10)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params'])()
  merged = pretrained_lib.merge_encoder(params, encoder, source)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(merged['encoder']))
  assert merged['head']['kernel'] is params['head']['kernel']  # Not fetched, not copied.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, 8, 1), ('data', 'fsdp', 'tensor'))
  config.mesh.min_fsdp_size = 1
  placed = parallel.place_on_mesh(merged, config, mesh)
  flat_placed = flat(placed)
  for key, value in flat(merged).items():
    np.testing.assert_array_equal(flat_placed[key], value, err_msg=key)
  assert flat_placed['encoder/cls_token'].sharding.mesh == mesh


def test_the_h14_448_recipe_is_the_papers_at_448_with_a_learned_interpolated_table():
  config = finetune_recipe.get_config('variant=H/14@448')
  assert config.model.name == 'mae_vit_huge_patch14' and config.dataset.image_size == 448
  # The paper's / reference's ViT-H fine-tuning: batch 1024, blr 1e-3, layer decay 0.75, 50 epochs, drop path 0.3.
  assert (config.batch_size, config.optim.base_lr, config.optim.layer_decay, config.num_epochs,
          config.drop_path_rate) == (1024, 1e-3, 0.75, 50, 0.3)
  assert config.pos_embed == 'learned' and config.global_pool
  assert config.model.remat_policy == 'dots_no_batch' and config.mesh.fsdp == -1
  # Evaluation: no zoom above 224 (crop_pct 1.0), whichever resize rule the input pipeline applies.
  assert augment.eval_resize_size(448, config.dataset.eval_resize) == 448
  assert round(448 * config.dataset.eval_resize / 224) == 448
  model = from_config.build_classifier(config, 1000)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 448, 448, 3))))['params']
  assert params['encoder']['pos_embed'].shape == (1, 1 + 32 * 32, 1280)
  assert params['encoder']['patch_embed']['kernel'].shape == (14, 14, 3, 1280)
  # Every other variant takes @SIZE too; a size that is not a multiple of the patch is refused.
  assert finetune_recipe.get_config('variant=B/16@384').dataset.image_size == 384
  with pytest.raises(ValueError, match='multiple of the patch size 16'):
    finetune_recipe.get_config('variant=L/16@200')
  with pytest.raises(ValueError, match='VARIANT@SIZE'):
    finetune_recipe.get_config('variant=H/14@big')
