"""Warm starts (config.init_from): step 0 from a reference .pth, a Hugging Face folder, safetensors, a workdir.

Each run pretrains mae_vit_test for one step on a (data=2, fsdp=4) mesh with
one warmup step: the learning rate of step 0 is 0, so the step-1 checkpoint
holds exactly the params the run started from.
"""

import argparse
import contextlib
import logging
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mae_jax import checkpoint, config_tools, metrics, parallel, pretrain_step, train, warm_start, weights
from mae_jax.data import inputs
from mae_jax.weights import layout
from tests import two_processes
from tests.configs import tiny_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_MODEL = 'mae_vit_test'  # 32x32x3 images, 8x8 patches, width 32, 2 encoder blocks + 1 decoder block.


def _config(init_from='', **overrides):
  """tiny_synthetic, one step on (data=2, fsdp=4), lr 0 at step 0; overrides by dotted key."""
  config = tiny_synthetic.get_config()
  config.mesh.data, config.mesh.fsdp = 2, 4
  config.num_train_steps = 1
  config.optim.warmup_steps = 1  # Linear warmup from 0: step 0 trains with lr 0.
  config.init_from = init_from
  config.update_from_flattened_dict(overrides)
  return config


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(layout.plain(tree))[0]}


def _assert_equal(expected, actual, parts=('encoder', 'decoder')):
  expected, actual = _flat(expected), _flat(layout.unstack_blocks(layout.plain(actual)))
  expected = {k: v for k, v in expected.items() if k.split('/')[0] in parts}
  actual = {k: v for k, v in actual.items() if k.split('/')[0] in parts}
  assert sorted(expected) == sorted(actual)
  for key, value in expected.items():
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def _start_params(workdir):
  """The params of the step-1 checkpoint: with lr 0 at step 0, those the run started from."""
  assert checkpoint.latest_step(workdir) == 1
  records = metrics.read_metrics(workdir)
  assert [r['train/lr'] for r in records] == [0.0] and np.isfinite(records[0]['train/loss'])
  return checkpoint.load_params(workdir)[0]


@contextlib.contextmanager
def _logs():
  """Collects the messages logged through absl (every level) while the block runs."""
  lines = []
  handler = logging.Handler()
  handler.emit = lambda record: lines.append(record.getMessage())
  logger = logging.getLogger('absl')
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield lines
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


def _run(config, workdir):
  with _logs() as lines:
    result = train.train_and_evaluate(config, workdir)
  assert result['status'] == 'done' and result['step'] == config.num_train_steps
  return '\n'.join(lines)


@pytest.fixture(scope='module')
def source():
  """Unscanned MAE params of TEST_MODEL, random at a realistic scale (no init values: a mix-up would show)."""
  abstract = layout.abstract_params(TEST_MODEL, 'mae', {})
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: (0.05 * rng.standard_normal(x.shape)).astype(np.float32), abstract)


def _reference_state(params, **overrides):
  return weights.to_reference_state_dict(params, TEST_MODEL, **overrides)


@pytest.fixture(scope='module')
def pth_file(source, tmp_path_factory):
  """A reference pretraining checkpoint: the state dict (decoder included) under 'model', and 'args'."""
  torch = pytest.importorskip('torch')
  path = str(tmp_path_factory.mktemp('pth') / 'checkpoint-799.pth')
  torch.save({'model': {k: torch.from_numpy(v) for k, v in _reference_state(source).items()}, 'epoch': 799,
              'args': argparse.Namespace(model=TEST_MODEL, mask_ratio=0.75)}, path)
  return path


@pytest.fixture(scope='module')
def hf_folder(source, tmp_path_factory):
  """transformers.ViTMAEForPreTraining holding `source`, written by its own save_pretrained."""
  pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  base = tmp_path_factory.mktemp('hf')
  export = weights.export_weights(source, TEST_MODEL, 'hf', str(base / 'export'), encoder_only=False)
  net, info = transformers.ViTMAEForPreTraining.from_pretrained(export, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  folder = str(base / 'vit-mae-test')
  net.save_pretrained(folder)  # transformers' own names and config.json, no mae_jax metadata.
  return folder


@pytest.fixture(scope='module')
def pth_run(pth_file, tmp_path_factory):
  """A warm start from pth_file on (data=2, fsdp=4): (workdir, log)."""
  workdir = str(tmp_path_factory.mktemp('from_pth'))
  return workdir, _run(_config(pth_file), workdir)


def test_reference_pth_warm_start_begins_with_the_files_encoder_and_decoder(pth_run, source, pth_file):
  workdir, log = pth_run
  _assert_equal(source, _start_params(workdir))
  assert f'Warm start from {pth_file}: step 0' in log
  assert 'From the file: encoder and decoder' in log and 'initialised afresh: nothing' in log


def test_hugging_face_folder_warm_start_into_scanned_blocks(hf_folder, source, tmp_path):
  workdir = str(tmp_path / 'from_hf')
  log = _run(_config(hf_folder, **{'model.scan_layers': True}), workdir)
  params = _start_params(workdir)
  assert params['encoder']['blocks']['attn']['query']['kernel'].shape == (2, 32, 32)  # Stacked: [depth, ...].
  _assert_equal(source, params)
  assert 'From the file: encoder and decoder' in log


def test_encoder_only_safetensors_gives_the_files_encoder_and_a_fresh_decoder(source, tmp_path):
  path = weights.export_weights(source, TEST_MODEL, 'safetensors', str(tmp_path / 'encoder.safetensors'))
  config = _config(path)
  log = _run(config, str(tmp_path / 'run'))
  params = _start_params(str(tmp_path / 'run'))
  _assert_equal(source, params, parts=('encoder',))
  # The decoder is the one a run without init_from starts with (same seed and mesh).
  config.init_from = ''
  mesh = parallel.create_mesh(config.mesh)
  random = pretrain_step.build_train_step(config, mesh, inputs.num_train_examples(config)).init_state().params
  _assert_equal(jax.device_get(random), params, parts=('decoder',))
  assert not np.allclose(_flat(random)['encoder/cls_token'], _flat(params)['encoder/cls_token'])
  assert 'From the file: encoder (' in log and 'initialised afresh: decoder' in log


def test_workdir_warm_start_reads_its_newest_checkpoint(pth_run, source, tmp_path):
  workdir = str(tmp_path / 'from_workdir')
  log = _run(_config(pth_run[0], **{'model.scan_layers': True}), workdir)
  _assert_equal(source, _start_params(workdir))
  assert f'Warm start from {pth_run[0]} (step 1)' in log


def test_resume_wins_over_init_from(pth_run, tmp_path):
  workdir = str(tmp_path / 'resumed')
  shutil.copytree(pth_run[0], workdir)
  config = _config('/no/such/file.pth', num_train_steps=2)  # Never read: the run resumes.
  log = _run(config, workdir)
  assert checkpoint.latest_step(workdir) == 2
  assert 'config.init_from=/no/such/file.pth is ignored' in log and 'Resumed from checkpoint at step 1' in log


@pytest.mark.parametrize('source_kind, overrides, messages', [
    ('pth', {'model.patch_size': 4},
     [r'patch_embed.proj.weight: shape (32, 3, 8, 8) in the file, (32, 3, 4, 4) in the model',
      "the file's patch size is 8, the model's 4: change model.name (or model.patch_size)"]),
    ('pth', {'dataset.channels': 1, 'dataset.mean': (0.0,), 'dataset.std': (1.0,)},
     ['patch_embed.proj.weight: shape (32, 3, 8, 8) in the file, (32, 1, 8, 8) in the model',
      'decoder_pred.weight: shape (192, 32) in the file, (64, 32) in the model',
      "the file's number of image channels is 3, the model's 1: change dataset.channels"]),
    ('pth', {'model.depth': 3},
     ['in the model but not in the file (12): blocks.2.attn.proj.bias',
      "the file's encoder depth is 2, the model's 3: change model.name (or model.depth)"]),
    ('hf', {'model.decoder_embed_dim': 64},
     ['decoder.decoder_embed.weight: shape (32, 32) in the file, (64, 32) in the model',
      "the file's decoder width is 32, the model's 64: change model.decoder_embed_dim"]),
    ('hf', {'model.num_heads': 4},
     ["the file's number of attention heads is 2, the model's 4: change model.name (or model.num_heads)"]),
    ('workdir', {'model.decoder_depth': 2},
     ['in the model but not in the file (16): decoder/blocks_1/attn/key/bias',
      "the file's decoder depth is 1, the model's 2: change model.decoder_depth"]),
], ids=['patch_size', 'channels', 'depth', 'hf_decoder_width', 'hf_heads', 'workdir_decoder_depth'])
def test_file_that_does_not_fit_fails_before_compile_naming_tensor_and_key(
    pth_file, hf_folder, pth_run, tmp_path, source_kind, overrides, messages):
  path = {'pth': pth_file, 'hf': hf_folder, 'workdir': pth_run[0]}[source_kind]
  with pytest.raises(config_tools.ConfigError) as error:  # mae_jax.main exits 78: launchers do not retry it.
    train.train_and_evaluate(_config(path, **overrides), str(tmp_path))
  text = str(error.value)
  assert text.startswith(f'config.init_from={path}') and 'does not fit the model of this config' in text
  for message in messages:
    assert message in text, text
  assert not os.path.exists(os.path.join(str(tmp_path), 'checkpoints'))  # Stopped before the state was built.


def test_a_global_pool_classifier_is_named_as_such(source, tmp_path):
  """Fine-tuned with global pooling: fc_norm in place of the encoder's norm, and a head."""
  state = {k: v for k, v in _reference_state({'encoder': source['encoder']}).items() if not k.startswith('norm.')}
  state.update({'fc_norm.weight': np.ones(32, np.float32), 'fc_norm.bias': np.zeros(32, np.float32),
                'head.weight': np.zeros((10, 32), np.float32), 'head.bias': np.zeros(10, np.float32)})
  path = str(tmp_path / 'classifier.safetensors')
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  safetensors.numpy.save_file(state, path)
  with pytest.raises(config_tools.ConfigError, match='a classifier fine-tuned with global pooling'):
    train.train_and_evaluate(_config(path), str(tmp_path / 'run'))


def _prepare(config, workdir):
  """warm_start.prepare as train_and_evaluate calls it (nothing compiles): (WarmStart, state shardings, log)."""
  mesh = parallel.create_mesh(config.mesh)
  step = pretrain_step.build_train_step(config, mesh, inputs.num_train_examples(config))
  with _logs() as lines:
    warm = warm_start.prepare(config, workdir, step.abstract_state.params, step.state_shardings.params)
  return warm, step.state_shardings.params, '\n'.join(lines)


def test_learned_position_table_and_another_image_size_are_logged_and_ignored(source, pth_file, tmp_path):
  """Pretraining uses fixed sin-cos tables for any grid: a file's learned or other-sized table is not used."""
  learned = str(tmp_path / 'learned')  # An Orbax params tree whose encoder has a learned `pos_embed` leaf.
  table = np.ones((1, 17, 32), np.float32)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(learned, {**source, 'encoder': {**source['encoder'], 'pos_embed': table}})
  note = 'not used: encoder/pos_embed (a learned or other-grid position table'
  for path, leaf_note in ((learned, note), (pth_file, '')):
    config = _config(path, **{'dataset.image_size': 64})  # A grid of 8 x 8 patches; the file's tables are 4 x 4.
    warm, shardings, log = _prepare(config, str(tmp_path / 'run'))
    assert warm.fresh == () and leaf_note in log
    _assert_equal(source, jax.device_get(warm.params))
    for leaf, sharding in zip(jax.tree.leaves(warm.params), jax.tree.leaves(layout.plain(shardings))):
      assert leaf.sharding == sharding  # Placed into the state's shardings (FSDP over 4 devices).


def test_encoder_only_hugging_face_folder_leaves_the_decoder_fresh(source, tmp_path):
  folder = weights.export_weights(source, TEST_MODEL, 'hf', str(tmp_path / 'vitmae_model'))  # A ViTMAEModel.
  warm, _, log = _prepare(_config(folder), str(tmp_path / 'run'))
  assert warm.fresh and all(path.startswith('decoder/') for path in warm.fresh)
  _assert_equal(source, jax.device_get(warm.params), parts=('encoder',))
  assert 'From the file: encoder (37 tensors); initialised afresh: decoder' in log


def test_two_processes_warm_start_with_params_spanning_both(pth_file, source, tmp_path):
  """2 processes x 4 devices, mesh fsdp=8: every parameter spans both processes, none is gathered."""
  workdir = str(tmp_path / 'multi')
  port = two_processes.free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  command = [sys.executable, '-m', 'mae_jax.main', f'--config={REPO}/tests/configs/tiny_synthetic.py',
             f'--workdir={workdir}', '--config.num_train_steps=1', '--config.optim.warmup_steps=1',
             '--config.mesh.data=1', '--config.mesh.fsdp=8', f'--config.init_from={pth_file}',
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', '--verbose']
  codes, outputs = two_processes.run(command, env, REPO, tmp_path, timeout=300)
  assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  assert all(f'Warm start from {pth_file}: step 0' in out for out in outputs)
  _assert_equal(source, _start_params(workdir))


def test_the_warm_start_line_reaches_the_terminal(capsys):
  warm_start._log('w.pth', ('encoder/cls_token', 'encoder/norm/scale'), ('decoder/mask_token',), ('head',))
  assert capsys.readouterr().err == ('Warm start from w.pth: step 0, fresh optimizer state and schedule. From the '
                                     'file: encoder (2 tensors); initialised afresh: decoder; not used: head\n')


@pytest.mark.parametrize('saved, message', [
    ({'downstream': 'linprobe', 'pretrained_workdir': '/runs/mae'},
     r'linprobe run\'s workdir: it holds no encoder.*Start from the encoder it probed: config.init_from=/runs/mae'),
    ({'downstream': 'finetune', 'global_pool': True, 'pretrained_path': '/w/mae.pth'},
     r'with global pooling: its encoder has no final norm.*fine-tuned from: config.init_from=/w/mae.pth'),
    ({'downstream': 'finetune', 'global_pool': False}, r'Export its encoder'),
])
def test_a_downstream_workdir_points_to_what_pretraining_can_start_from(source, tmp_path, saved, message):
  workdir = str(tmp_path / 'downstream')
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(2, {'head': {'bias': np.zeros(3, np.float32)}}, {'count': np.zeros((), np.int32)},
            {'step': 2, 'config': {'model': {'name': 'mae_vit_test'}, **saved}})
  ckpt.close()
  with pytest.raises(config_tools.ConfigError, match=message):
    train.train_and_evaluate(_config(workdir), str(tmp_path / 'run'))
