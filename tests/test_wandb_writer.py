"""The optional Weights & Biases writer, run offline (WANDB_MODE=offline): what the run files hold."""

import glob
import json
import os
import struct
import sys

import jax
import numpy as np
import pytest
from clu import metric_writers

from configs import default as default_config
from mae_jax import wandb_writer


def _config(**wandb):
  config = default_config.get_config()
  config.wandb.enabled = True
  config.wandb.update(wandb)
  return config


def _records(run_file):
  """The records of a .wandb file (a LevelDB-style log of wandb_internal_pb2.Record) as (type, message)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(run_file, 'rb') as f:
    data = f.read()
  assert data[:4] == b':W&B', data[:7]
  block, pos, pending, out = 32768, 7, b'', []
  while pos + 7 <= len(data):
    if block - pos % block < 7:  # A block's tail too short for a header is padding.
      pos += block - pos % block
      continue
    _, length, kind = struct.unpack('<IHB', data[pos:pos + 7])
    pending += data[pos + 7:pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):  # A full record, or the last piece of one.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      pending = b''
      out.append((record.WhichOneof('record_type'), record))
  return out


def _key(item):
  return item.key or '/'.join(item.nested_key)


def _read_run(wandb_dir):
  """{'run': the run record, 'config': {key: value}, 'history': [{key: value}], 'dir': the run folder}."""
  import wandb  # pylint: disable=g-import-not-at-top
  wandb.teardown()  # run.finish() returns before W&B's service has written the offline file; this waits for it.
  runs = glob.glob(os.path.join(wandb_dir, 'wandb', 'offline-run-*'))
  assert len(runs) == 1, runs
  (run_file,) = glob.glob(os.path.join(runs[0], 'run-*.wandb'))
  out = {'config': {}, 'history': [], 'dir': runs[0]}
  for kind, record in _records(run_file):
    if kind == 'run':
      out['run'] = record.run
      out['config'].update({_key(u): json.loads(u.value_json) for u in record.run.config.update})
    elif kind == 'config':
      out['config'].update({_key(u): json.loads(u.value_json) for u in record.config.update})
    elif kind == 'history':
      out['history'].append({_key(i): json.loads(i.value_json) for i in record.history.item})
  return out


@pytest.fixture
def offline(tmp_path, monkeypatch):
  pytest.importorskip('wandb')
  wandb_dir = tmp_path / 'wandb_files'
  wandb_dir.mkdir()
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_DIR', str(wandb_dir))
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.delenv('WANDB_RUN_ID', raising=False)
  return str(wandb_dir)


def test_offline_run_holds_scalars_images_and_config(offline, tmp_path):
  workdir = str(tmp_path / 'my_run')
  config = _config(tags=('mae', 'test'), group='sweep1')
  writer = wandb_writer.maybe_create(config, workdir)
  assert isinstance(writer, metric_writers.MetricWriter)
  writer.write_scalars(1, {'train/loss': np.float32(1.5), 'train/lr': 0.001})
  writer.write_scalars(2, {'train/loss': 0.25})
  grid = np.random.default_rng(0).integers(0, 256, (1, 24, 40, 3), dtype=np.uint8)
  writer.write_images(2, {'reconstructions': grid})
  writer.write_hparams({'extra.value': 7})
  writer.close()

  run = _read_run(offline)
  assert run['run'].display_name == 'my_run'  # config.wandb.name '' = the workdir's name.
  assert run['run'].project == 'mae-jax' and run['run'].run_group == 'sweep1'
  assert list(run['run'].tags) == ['mae', 'test']
  config_dict = config.to_dict()
  assert run['config']['mask_ratio'] == config_dict['mask_ratio']
  assert run['config']['model.name'] == config_dict['model']['name']
  assert run['config']['dataset.mean'] == list(config_dict['dataset']['mean'])
  assert run['config']['extra.value'] == 7
  losses = [(h['_step'], h['train/loss']) for h in run['history'] if 'train/loss' in h]
  assert losses == [(1, 1.5), (2, 0.25)]
  assert [h['train/lr'] for h in run['history'] if 'train/lr' in h] == [0.001]
  images = [h for h in run['history'] if any(k.startswith('reconstructions') for k in h)]
  assert images and images[0]['_step'] == 2
  (png,) = glob.glob(os.path.join(run['dir'], 'files', 'media', 'images', 'reconstructions_*.png'))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(np.asarray(Image.open(png)), grid[0])
  with open(os.path.join(workdir, wandb_writer.RUN_ID_FILE)) as f:
    assert f.read().strip() == run['run'].run_id


def test_a_resumed_job_continues_its_run(offline, tmp_path):
  workdir = str(tmp_path / 'resumed')
  first = wandb_writer.maybe_create(_config(name='named'), workdir)
  first.write_scalars(1, {'train/loss': 1.0})
  first.close()
  run_id = first.run.id
  second = wandb_writer.maybe_create(_config(name='named'), workdir)
  assert second.run.id == run_id and second.run.name == 'named'
  second.close()


def test_run_files_go_into_a_local_workdir_without_wandb_dir(offline, tmp_path, monkeypatch):
  monkeypatch.delenv('WANDB_DIR')
  workdir = str(tmp_path / 'local_run')
  writer = wandb_writer.maybe_create(_config(mode='offline'), workdir)
  writer.write_scalars(3, {'eval/knn_top1': 0.5})
  writer.close()
  history = _read_run(workdir)['history']
  assert [h['eval/knn_top1'] for h in history if 'eval/knn_top1' in h] == [0.5]


def test_disabled_or_other_processes_get_no_writer(tmp_path, monkeypatch):
  assert wandb_writer.maybe_create(default_config.get_config(), str(tmp_path)) is None  # enabled=False
  pytest.importorskip('wandb')
  monkeypatch.setattr(jax, 'process_index', lambda: 1)
  assert wandb_writer.maybe_create(_config(mode='offline'), str(tmp_path)) is None
  assert not os.listdir(tmp_path)


def test_enabled_without_wandb_names_the_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # What `import wandb` meets where it is not installed.
  with pytest.raises(ImportError, match=r"pip install 'mae_jax\[wandb\]'"):
    wandb_writer.check(_config())
  with pytest.raises(ImportError, match='config.wandb.enabled=True'):
    wandb_writer.maybe_create(_config(), str(tmp_path))
  wandb_writer.check(default_config.get_config())  # Disabled: wandb is never imported.


@pytest.mark.parametrize('wandb,match', [
    (dict(mode='online2'), r"config.wandb.mode='online2': must be one of"),
    (dict(project=''), 'config.wandb.project is empty'),
    (dict(tags=(1, 2)), r'config.wandb.tags=\(1, 2\): must be strings'),
])
def test_bad_settings_name_the_key(wandb, match):
  with pytest.raises(ValueError, match=match):
    wandb_writer.check(_config(**wandb))
