"""Intermediate features: encode(return_layers) against Hugging Face, and the mae_jax.features command."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax import checkpoint, features, models, weights
from mae_jax.data import prepare, preprocess
from tests.test_export import _mae_params

pytestmark = pytest.mark.usefixtures('jit_cache')
tf.config.set_visible_devices([], 'GPU')

MODEL = 'mae_vit_test'  # 32x32 images, 8x8 patches (16 tokens + cls), width 32.
DEPTH = 3  # One more block than mae_vit_test's two, so a middle block exists.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def params():
  return _mae_params(MODEL, seed=3, depth=DEPTH)


@pytest.fixture(scope='module')
def weights_file(params, tmp_path_factory):
  """The encoder as safetensors; its metadata names the model and depth=3."""
  out = str(tmp_path_factory.mktemp('weights') / 'encoder.safetensors')
  return weights.export_weights(params, MODEL, 'safetensors', out, model_overrides={'depth': DEPTH})


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """Seven images of other sizes in two class folders (5 is not a multiple of 8 devices), and a broken file at the
  top (skipped: it neither gives a label nor takes the folders' labels away)."""
  root = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  for i, (sub, size) in enumerate([('a', (40, 36)), ('a', (32, 32)), ('a', (50, 64)), ('b', (33, 45)),
                                   ('b', (70, 40)), ('b', (32, 48)), ('b', (36, 36))]):
    os.makedirs(root / sub, exist_ok=True)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / sub / f'img{i}.png')
  (root / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  return str(root)


def _expected_tokens(params, folder, names, layers, mean, std):
  """What the command should compute: the eval transform of each file, then encode (with return_layers)."""
  eval_fn = preprocess.make_eval_preprocess_fn({'name': 'x', 'image_size': 32, 'channels': 3, 'mean': mean,
                                                'std': std})
  images = np.stack([eval_fn(tf.constant(tf.io.gfile.GFile(os.path.join(folder, n), 'rb').read())).numpy()
                     for n in names])
  model = models.get_model(MODEL, depth=DEPTH)
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, return_layers=layers, method=model.encode))
  tokens = encode(params, images)
  return [np.asarray(tokens)] if layers is None else [np.asarray(t) for t in tokens]


# ----------------------------------------------------------------------------
# encode(return_layers) equals Hugging Face's hidden states.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('scan_layers', [False, True])
def test_encode_return_layers_equal_hf_hidden_states(params, tmp_path, scan_layers):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  folder = weights.export_weights(params, MODEL, 'hf', str(tmp_path / 'hf'), model_overrides={'depth': DEPTH})
  net = transformers.ViTMAEModel.from_pretrained(folder, mask_ratio=0.0)
  net.eval()
  images = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
  noise = torch.arange(16, dtype=torch.float32).expand(2, 16)  # Ascending noise keeps the patch order.
  with torch.no_grad():
    out = net(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)), noise=noise,
              output_hidden_states=True)
  hidden = [h.numpy() for h in out.hidden_states]  # Embeddings, then each block's output.
  assert len(hidden) == DEPTH + 1

  model = models.get_model(MODEL, depth=DEPTH, scan_layers=scan_layers)
  p = weights.stack_blocks(params) if scan_layers else params
  layers = (0, 1, 2, -2)
  got = jax.jit(lambda p, x: model.apply({'params': p}, x, return_layers=layers, method=model.encode))(p, images)
  assert len(got) == len(layers)
  for i, tokens in zip(layers, got):
    assert tokens.shape == (2, 17, 32)
    np.testing.assert_allclose(np.asarray(tokens), hidden[i % DEPTH + 1], atol=1e-4, rtol=0, err_msg=f'block {i}')
  final = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.encode))(p, images)
  np.testing.assert_allclose(np.asarray(final), out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  # The blocks differ from each other: a wrong index would not pass by accident.
  assert np.abs(hidden[1] - hidden[2]).max() > 0.1 and np.abs(hidden[2] - hidden[3]).max() > 0.1


# ----------------------------------------------------------------------------
# The command on a folder and on a prepared data set.
# ----------------------------------------------------------------------------


def test_folder_labels_come_from_class_folders_and_a_mixed_folder_says_why_it_has_none(caplog):
  names = ['a/x.png', 'b/y.png', 'b/z.png']
  class_names, label_of = features.folder_labels(names, '/imgs')
  assert class_names == ['a', 'b'] and [label_of(n) for n in names] == [0, 1, 1]
  assert features.folder_labels(['x.png', 'y.png'], '/imgs') == ([], None) and not caplog.records  # Unlabelled.
  assert features.folder_labels(names + ['top.png'], '/imgs') == ([], None)
  assert caplog.records[-1].getMessage() == ('No labels written: 1 of the images lie directly in /imgs (e.g. '
                                             'top.png), not in a class sub-folder')


def test_a_class_folder_without_a_readable_image_keeps_its_label_as_prepare_gives_it(weights_file, tmp_path):
  root = tmp_path / 'imgs'
  for sub in ('a', 'b', 'c'):
    (root / sub).mkdir(parents=True)
  Image.new('RGB', (32, 32), (10, 20, 30)).save(root / 'a' / 'x.png')
  (root / 'b' / 'y.png').write_bytes(b'not an image')
  Image.new('RGB', (32, 32), (90, 20, 30)).save(root / 'c' / 'z.png')
  out = str(tmp_path / 'f.npz')
  features.write_embeddings(out, weights=weights_file, images=str(root), pool='cls', progress=False)
  arrays, names, meta = features.read_features(out)
  assert names == ['a/x.png', 'c/z.png'] and meta['class_names'] == ['a', 'b', 'c']
  assert arrays['labels'].tolist() == [0, 2]


def test_command_line_on_a_folder_writes_every_token_of_the_layers(params, weights_file, folder, tmp_path):
  out = str(tmp_path / 'feats.safetensors')
  result = subprocess.run(
      [sys.executable, '-m', 'mae_jax.features', f'--weights={weights_file}', f'--images={folder}',
       '--layers=0,-1', '--pool=none', f'--out={out}', '--batch_size=8'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Features written to {out}' in result.stdout
  arrays, names, meta = features.read_features(out)
  good = [f'a/img{i}.png' for i in range(3)] + [f'b/img{i}.png' for i in range(3, 7)]
  assert names == good  # Relative paths in sorted order, the broken file left out.
  assert sorted(arrays) == ['labels', 'layer_0', 'layer_2']
  # Labelled by their class folders, as mae_jax.data.prepare labels the folder.
  assert arrays['labels'].tolist() == [0, 0, 0, 1, 1, 1, 1] and meta['class_names'] == ['a', 'b']
  assert meta['layers'] == [0, 2] and meta['pool'] == 'none' and meta['model_name'] == MODEL
  assert meta['num_skipped'] == 1 and meta['skipped'] == ['broken.png']
  assert meta['mean'] == [0.485, 0.456, 0.406]  # No run config in the metadata: ImageNet's.
  want = _expected_tokens(params, folder, good, (0, -1), meta['mean'], meta['std'])
  for key, expected in zip(['layer_0', 'layer_2'], want):
    assert arrays[key].shape == (7, 17, 32) and arrays[key].dtype == np.float32
    np.testing.assert_allclose(arrays[key], expected, atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize('pool,ext,layers', [('cls', '.npz', (1, -1)), ('mean', '.npy', (0, 1)),
                                             ('mean', '.safetensors', None), ('cls', '.npy', (2,))])
def test_pools_and_formats_read_back(params, weights_file, folder, tmp_path, pool, ext, layers):
  out = str(tmp_path / f'feats{ext}')
  features.write_embeddings(out, weights=weights_file, images=folder, layers=layers, pool=pool, batch_size=16,
                            progress=False)
  arrays, names, meta = features.read_features(out)
  assert len(names) == 7 and names[0] == 'a/img0.png' and names[-1] == 'b/img6.png'
  keys = ['features'] if layers is None else [f'layer_{i % DEPTH}' for i in layers]
  assert [k for k in arrays if k != 'labels'] == keys and meta['keys'] == keys
  assert arrays['labels'].tolist() == [0, 0, 0, 1, 1, 1, 1]  # From the class folders.
  tokens = _expected_tokens(params, folder, names, layers, meta['mean'], meta['std'])
  for key, t in zip(keys, tokens):
    want = t[:, 0] if pool == 'cls' else t[:, 1:].mean(axis=1)
    assert arrays[key].shape == (7, 32)
    np.testing.assert_allclose(arrays[key], want, atol=1e-5, rtol=0, err_msg=key)


def test_prepared_data_set_gives_the_folders_features_with_labels(weights_file, folder, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  version_dir = prepare.prepare_folder(folder, data_dir, name='feature_shapes', progress=False)
  from_folder = str(tmp_path / 'folder.npz')
  features.write_embeddings(from_folder, weights=weights_file, images=folder, layers='1,2', pool='none',
                            progress=False)
  out = str(tmp_path / 'dataset.npz')
  features.write_embeddings(out, weights=weights_file, dataset='feature_shapes', data_dir=data_dir, split='train',
                            layers='1,2', pool='none', batch_size=8, progress=False)
  arrays, names, meta = features.read_features(out)
  assert names == [f'train/{i}' for i in range(7)]
  assert meta['input'] == 'feature_shapes:train'
  # The data set stores the files in a shuffled order; its file_name feature says which is which.
  records = tfds.builder_from_directory(version_dir).as_dataset(split='train', shuffle_files=False)
  file_names = [r['file_name'].decode() for r in tfds.as_numpy(records)]
  assert arrays['labels'].tolist() == [0 if n.startswith('a/') else 1 for n in file_names]
  folder_arrays, folder_names, _ = features.read_features(from_folder)
  order = [folder_names.index(n) for n in file_names]
  for key in ('layer_1', 'layer_2'):
    assert arrays[key].shape == (7, 17, 32)
    np.testing.assert_allclose(arrays[key], folder_arrays[key][order], atol=2e-5, rtol=0, err_msg=key)
  # A sub-split keeps its own indices.
  part = str(tmp_path / 'part.npz')
  features.write_embeddings(part, weights=weights_file, dataset=version_dir, split='train[2:5]', pool='cls',
                            progress=False)
  part_arrays, part_names, _ = features.read_features(part)
  assert part_names == ['train[2:5]/0', 'train[2:5]/1', 'train[2:5]/2']
  np.testing.assert_allclose(part_arrays['labels'], arrays['labels'][2:5])


def test_workdir_checkpoint_gives_its_export_features(pretrained, folder, tmp_path):
  """--workdir reads the run's checkpoint and normalisation; its export gives the same features."""
  out = str(tmp_path / 'workdir.npz')
  features.write_embeddings(out, workdir=pretrained, images=folder, pool='mean', progress=False)
  arrays, names, meta = features.read_features(out)
  run_config = json.loads(open(os.path.join(pretrained, 'config.json')).read())
  assert meta['mean'] == list(run_config['dataset']['mean'])
  assert meta['source'] == f'{pretrained} step {checkpoint.latest_step(pretrained)}'
  exported = weights.export_weights(checkpoint.load_params(pretrained)[0], MODEL, 'safetensors',
                                    str(tmp_path / 'run.safetensors'), metadata={'config': run_config})
  again = str(tmp_path / 'export.npz')
  features.write_embeddings(again, weights=exported, images=folder, pool='mean', progress=False)
  np.testing.assert_allclose(features.read_features(again)[0]['features'], arrays['features'], atol=1e-6)
  assert arrays['features'].shape == (7, 32) and len(names) == 7


def test_a_workdir_defaults_to_its_runs_data_set_and_data_dir(pretrained, tmp_path):
  run = {'name': 'fashion_mnist', 'data_dir': '.data/tensorflow_datasets'}
  assert features._run_dataset(run, None, '', 'w') == ('fashion_mnist', '.data/tensorflow_datasets')
  assert features._run_dataset(run, 'fashion_mnist', '', 'w') == ('fashion_mnist', '.data/tensorflow_datasets')
  assert features._run_dataset(run, 'fashion_mnist', '/data', 'w') == ('fashion_mnist', '/data')
  assert features._run_dataset(run, 'other', '', 'w') == ('other', '')  # Another data set: not the run's folder.
  # The test run trained on synthetic data: nothing to default to.
  with pytest.raises(features.FeaturesError, match=r'trained on synthetic data: give --images or --dataset'):
    features.write_embeddings(str(tmp_path / 'x.npz'), workdir=pretrained, progress=False)


# ----------------------------------------------------------------------------
# Errors name the flag.
# ----------------------------------------------------------------------------


def test_fine_tuned_weights_keep_their_trained_position_table(tmp_path):
  """A classifier's export (learned pos_embed): its features are the classifier's own (cls head, final norm)."""
  classifier = models.get_classifier(MODEL, 10, False, 'learned')
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  params = jax.tree.map(np.asarray, classifier.init({'params': jax.random.key(0)}, images)['params'])
  table = params['encoder']['pos_embed']
  params['encoder']['pos_embed'] = np.random.default_rng(0).normal(0, 1, table.shape).astype(np.float32)
  path = weights.export_weights(params, MODEL, 'safetensors', str(tmp_path / 'finetuned.safetensors'))
  kwargs, encoder, _ = features.load_encoder(weights=path)
  assert kwargs['pos_embed'] == 'learned'
  got = features.make_features_fn(kwargs, None, 'cls')(encoder, images)[0]
  want = classifier.apply({'params': params}, images, return_features=True)[1]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  # A table trained at another grid (2x2 patches) is resized to the images' 4x4, as fine-tuning resizes it.
  small = {'pos_embed': np.random.default_rng(1).normal(size=(1, 5, 32)).astype(np.float32)}
  resized = features._with_position_table(small, {'image_size': 32, 'patch_size': 8}, 'w')['pos_embed']
  assert resized.shape == (1, 17, 32)
  np.testing.assert_array_equal(resized[0, 0], small['pos_embed'][0, 0])  # The cls entry is kept.


@pytest.mark.parametrize('kwargs,match', [
    (dict(images='FOLDER'), 'exactly one of --weights'),
    (dict(weights='WEIGHTS', workdir='/tmp/run', images='FOLDER'), 'exactly one of --weights'),
    (dict(weights='WEIGHTS', images='FOLDER', dataset='x'), 'exactly one of --images'),
    (dict(weights='WEIGHTS', images='FOLDER', layers='0,3'), r'--layers=0,3: mae_vit_test has 3 blocks'),
    (dict(weights='WEIGHTS', images='FOLDER', layers='1,-2'), r'--layers=1,-2: names block\(s\) twice'),
    (dict(weights='WEIGHTS', images='FOLDER', layers='x'), '--layers=x: must be block indices'),
    (dict(weights='WEIGHTS', images='FOLDER', pool='max'), '--pool=max: must be one of cls, mean, none'),
    (dict(weights='WEIGHTS', images='FOLDER', mean=[0.5]), '--mean and --std go together'),
    (dict(weights='WEIGHTS', images='FOLDER', mean=[0.5], std=[0.2]), r'--mean=\[0.5\]: needs one value per'),
    (dict(weights='WEIGHTS', dataset='nothing_here', data_dir='DATA_DIR'), '--dataset=nothing_here'),
    (dict(weights='WEIGHTS', images='EMPTY'), 'no image files'),
    (dict(weights='WEIGHTS', images='FOLDER', overrides=['in_chanels=4']), "'in_chanels' is not a model field"),
    (dict(workdir='/tmp/run', images='FOLDER', overrides=['in_channels=4']), '--override goes with --weights'),
])
def test_bad_settings_name_the_flag(weights_file, folder, tmp_path, kwargs, match):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'tfds').mkdir()
  subs = {'WEIGHTS': weights_file, 'FOLDER': folder, 'EMPTY': str(tmp_path / 'empty'),
          'DATA_DIR': str(tmp_path / 'tfds')}
  kwargs = {k: subs.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
  with pytest.raises(features.FeaturesError, match=match):
    features.write_embeddings(str(tmp_path / 'out.npz'), progress=False, **kwargs)
  assert not os.path.exists(tmp_path / 'out.npz')


def test_bad_out_names_the_flag(weights_file, folder, tmp_path):
  run = lambda out, **kw: features.write_embeddings(out, weights=weights_file, images=folder, progress=False, **kw)
  with pytest.raises(features.FeaturesError, match='--out=.*must end in one of .safetensors, .npz, .npy'):
    run(str(tmp_path / 'feats.pt'))
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  with pytest.raises(features.FeaturesError, match='--out=.*cannot write there'):
    run(str(blocker / 'feats.npz'))
  (tmp_path / 'run.metadata.json').write_text('{"model_name": "mae_vit_test", "format": "safetensors"}')
  with pytest.raises(features.FeaturesError, match=r"run\.metadata\.json, which holds other metadata \(an export's"):
    run(str(tmp_path / 'run.npy'))  # The export run.safetensors keeps its metadata.
  (tmp_path / 'done.npz').write_bytes(b'')
  with pytest.raises(features.FeaturesError, match='--out=.*exists: pass --overwrite'):
    run(str(tmp_path / 'done.npz'))
  (tmp_path / 'dir.npz').mkdir()
  with pytest.raises(features.FeaturesError, match='--out=.*is a folder'):
    run(str(tmp_path / 'dir.npz'))
  # The write probe left nothing.
  assert sorted(os.listdir(tmp_path)) == ['a_file', 'dir.npz', 'done.npz', 'run.metadata.json']


def test_command_line_usage_error_names_the_flag(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'mae_jax.features', f'--images={tmp_path}',
                           f'--out={tmp_path / "x.npz"}'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert 'exactly one of --weights' in result.stderr and 'Traceback' not in result.stderr
  assert '--num_workers' not in result.stderr  # One line, not the whole --help.


def test_a_mae_encoder_at_another_image_size_gives_the_same_features_from_every_format(params, weights_file,
                                                                                         tmp_path):
  """A MAE encoder's fixed table: the fixed table at the images' grid, whichever format holds the weights (the
  safetensors file stores the table at its own 4x4 grid; an orbax export stores none)."""
  orbax = weights.export_weights(params, MODEL, 'orbax', str(tmp_path / 'orbax'), model_overrides={'depth': DEPTH})
  images = jax.random.normal(jax.random.key(2), (2, 48, 48, 3))
  got = []
  for path in (weights_file, orbax):
    kwargs, encoder, _ = features.load_encoder(weights=path, model_overrides={'image_size': 48})
    assert kwargs['pos_embed'] == 'sincos' and 'pos_embed' not in encoder
    got.append(np.asarray(features.make_features_fn(kwargs, None, 'none')(encoder, images)[0]))
  np.testing.assert_array_equal(got[0], got[1])
  # A conversion at another size writes the fixed table of that size.
  from mae_jax import export  # pylint: disable=g-import-not-at-top
  out = export.convert(weights_file, 'orbax', str(tmp_path / 'at48'), image_size=48)
  assert weights.read_metadata(out)['model_overrides']['image_size'] == 48
  assert 'pos_embed' not in weights.import_weights(out)['encoder']
