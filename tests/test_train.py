"""Trainer tests on 8 CPU devices: meshes, resume after SIGTERM, mesh change, multi-host, errors."""

import functools
import glob
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from mae_jax import checkpoint, metrics, optim, parallel, pretrain_step, train, train_state
from mae_jax.models import from_config
from tests import two_processes
from tests.configs import tiny_synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**mesh):
  config = tiny_synthetic.get_config()
  for key, value in mesh.items():
    config.mesh[key] = value
  return config


def _losses(workdir):
  return [r['train/loss'] for r in metrics.read_metrics(workdir)]


def _final_params(workdir):
  params, _ = checkpoint.load_params(workdir)
  return params


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """20 steps on (data=8)."""
  workdir = str(tmp_path_factory.mktemp('data8'))
  result = train.train_and_evaluate(_config(data=8, fsdp=1), workdir)
  assert result['status'] == 'done' and result['step'] == 20
  return workdir


def test_same_losses_on_every_mesh(reference_run, tmp_path):
  ref = _losses(reference_run)
  assert len(ref) == 20 and ref[-1] < ref[0]
  for name, mesh in (('one', dict(num_devices=1, data=1, fsdp=1)), ('2x4', dict(data=2, fsdp=4))):
    workdir = str(tmp_path / name)
    train.train_and_evaluate(_config(**mesh), workdir)
    np.testing.assert_allclose(_losses(workdir), ref, rtol=1e-4, err_msg=name)


def test_fsdp_params_are_sharded():
  config = _config(data=2, fsdp=4)
  mesh = parallel.create_mesh(config.mesh)
  model = from_config.build_mae(config)
  tx, _ = optim.create_optimizer(config.optim, global_batch=16, steps_per_epoch=10, total_steps=20)
  abstract = jax.eval_shape(lambda r: pretrain_step.init_state(model, tx, config, r), jax.random.key(0))
  shardings = parallel.tree_shardings(abstract, mesh, parallel.DEFAULT_RULES, 1)
  with jax.set_mesh(mesh):
    state = jax.jit(lambda r: pretrain_step.init_state(model, tx, config, r), out_shardings=shardings)(
        jax.random.key(0))
  kernel = state.params['encoder']['blocks_0']['mlp']['fc1']['kernel']  # [32, 128]
  assert 'fsdp' in kernel.sharding.spec
  assert kernel.addressable_shards[0].data.size == kernel.size // 4
  leaves = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, 'shape', ()) == (32, 128)]
  assert leaves and all('fsdp' in x.sharding.spec for x in leaves)


def test_sigterm_then_resume_equals_uninterrupted(reference_run, tmp_path):
  workdir = str(tmp_path / 'interrupted')

  def send_sigterm_after_step(k):
    while True:
      if len(metrics.read_metrics(workdir)) >= k:
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.01)

  killer = threading.Thread(target=send_sigterm_after_step, args=(7,), daemon=True)
  killer.start()
  first = train.train_and_evaluate(_config(data=8, fsdp=1), workdir)
  killer.join()
  assert first['status'] == 'preempted' and 7 <= first['step'] < 20
  # The step-5 save may still be in flight at the SIGTERM: then it is kept and no second save is written.
  assert checkpoint.latest_step(workdir) == first['saved_step'] in (first['step'] // 5 * 5, first['step'])
  second = train.train_and_evaluate(_config(data=8, fsdp=1), workdir)
  assert second['status'] == 'done' and second['step'] == 20
  assert _max_abs_diff(_final_params(workdir), _final_params(reference_run)) <= 1e-6
  # Same data order: the resumed losses equal the uninterrupted ones step for step.
  steps = [r['step'] for r in metrics.read_metrics(workdir)]
  assert steps == list(range(1, 21))  # Steps logged before the resume and again after it appear once.
  records = {r['step']: r['train/loss'] for r in metrics.read_metrics(workdir)}
  ref = {r['step']: r['train/loss'] for r in metrics.read_metrics(reference_run)}
  for step in range(first['step'] + 1, 21):
    np.testing.assert_allclose(records[step], ref[step], rtol=1e-5)


def test_restore_on_another_mesh_and_continue(reference_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'remesh')
  shutil.copytree(reference_run, workdir)
  for step in (15, 20):  # keep the (data=8) checkpoint of step 10 only
    shutil.rmtree(os.path.join(workdir, 'checkpoints', str(step)))
  assert checkpoint.latest_step(workdir) == 10
  config = _config(num_devices=4, data=2, fsdp=2)
  result = train.train_and_evaluate(config, workdir)  # resumes at 10 on 4 devices, runs to 20
  assert result['step'] == 20 and result['status'] == 'done'
  assert _max_abs_diff(_final_params(workdir), _final_params(reference_run)) < 1e-4


def test_half_written_checkpoint_is_ignored(reference_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'partial')
  shutil.copytree(reference_run, workdir)
  # A crash mid-save leaves only a temporary directory, which must not count.
  tmp_dir = os.path.join(workdir, 'checkpoints', '25.orbax-checkpoint-tmp-1234')
  os.makedirs(os.path.join(tmp_dir, 'params'))
  assert checkpoint.latest_step(workdir) == 20


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
  config = _config(data=8, fsdp=1)
  config.optim.base_lr = 1e30  # explodes to inf/nan within a few steps
  config.optim.warmup_steps = 1
  config.max_nonfinite_steps = 3
  config.checkpoint_every_steps = 1
  with pytest.raises(train_state.NonFiniteLossError, match='consecutive steps'):
    train.train_and_evaluate(config, str(tmp_path))
  records = metrics.read_metrics(str(tmp_path))
  assert any(r['train/skipped'] > 0 for r in records)
  params, _ = checkpoint.load_params(str(tmp_path))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize('key,value,match', [
    ('batch_size', 12, r'batch_size=12 .*data-parallel size 8'),
    ('grad_accum_steps', 3, 'grad_accum_steps=3'),
    ('mask_ratio', 1.5, r'mask_ratio=1.5: must be in \(0, 1\)'),
    ('log_every_steps', 0, 'log_every_steps=0: must be an integer >= 1'),
    ('max_nonfinite_steps', 0, 'max_nonfinite_steps=0: must be an integer >= 1'),
    ('preemption_sync_every_steps', 0, 'preemption_sync_every_steps=0: must be an integer >= 1'),
    ('num_epochs', 0.001, r'num_epochs=0.001 x 64 steps per epoch .* is 0 training steps: raise num_epochs'),
])
def test_config_errors_before_compile(tmp_path, key, value, match):
  config = _config(data=8, fsdp=1)
  config[key] = value
  if key == 'num_epochs':
    config.num_train_steps = -1
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(os.path.join(str(tmp_path), 'checkpoints'))


def test_mesh_larger_than_devices(tmp_path):
  with pytest.raises(ValueError, match='mesh: data\\*fsdp\\*tensor = 16 is larger than the 8 devices'):
    train.train_and_evaluate(_config(data=4, fsdp=4), str(tmp_path))


def test_grad_accumulation_matches_full_batch(monkeypatch):
  """grad_accum_steps=2 gives the mean of the two micro-batches' gradients, each with its own mask key."""
  config = _config(data=8, fsdp=1)
  model = from_config.build_mae(config)
  tx, lr_fn = optim.create_optimizer(config.optim, global_batch=16, steps_per_epoch=10, total_steps=20)
  state = pretrain_step.init_state(model, tx, config, jax.random.key(0))
  images = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  base_rng = jax.random.key(2)
  captured = {}

  def capture(state, loss, grads, tx, max_nonfinite):
    jax.debug.callback(lambda loss, grads: captured.update(loss=loss, grads=grads), loss, grads)
    return train_state.guarded_update.__wrapped__(state, loss, grads, tx, max_nonfinite)

  capture.__wrapped__ = train_state.guarded_update
  monkeypatch.setattr(train_state, 'guarded_update', capture)
  step = functools.partial(pretrain_step.train_step, model=model, tx=tx, lr_fn=lr_fn, mask_ratio=0.75, accum_steps=2,
                           max_nonfinite=10, base_rng=base_rng)
  jax.block_until_ready(jax.jit(step)(state, {'image': images}))  # The callback gives the values as arrays.
  jax.effects_barrier()

  def loss_fn(params, chunk, key):
    return model.apply({'params': params}, chunk, mask_ratio=0.75, rngs={'mask': key}, train=True)[0]

  rng = jax.random.fold_in(base_rng, 0)  # the step's key at step 0
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  parts = [value_and_grad(state.params, images[j::2], jax.random.fold_in(rng, j)) for j in range(2)]
  want_loss = (parts[0][0] + parts[1][0]) / 2
  want_grads = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
  np.testing.assert_allclose(captured['loss'], want_loss, rtol=1e-5)
  assert _max_abs_diff(captured['grads'], want_grads) < 1e-5
  # And the masks matter: one full-batch step with the step's key gives other gradients.
  _, full_grads = value_and_grad(state.params, images, rng)
  assert _max_abs_diff(full_grads, want_grads) > 1e-4


def test_accumulated_run_writes_reconstructions(tmp_path):
  accum = _config(data=8, fsdp=1)
  accum.num_train_steps = 2
  accum.optim.warmup_steps = 1
  accum.batch_size = 32
  accum.grad_accum_steps = 2
  accum.visualize_every_steps = 2  # writes a reconstruction grid to TensorBoard
  train.train_and_evaluate(accum, str(tmp_path / 'accum'))
  assert np.isfinite(_losses(str(tmp_path / 'accum'))).all()
  events = [f for f in os.listdir(str(tmp_path / 'accum')) if f.startswith('events.out.tfevents')]
  assert events and any(os.path.getsize(str(tmp_path / 'accum' / f)) > 10_000 for f in events)


def _main_argv(workdir, extra=()):
  return [sys.executable, '-m', 'mae_jax.main', f'--config={REPO}/tests/configs/tiny_synthetic.py',
          f'--workdir={workdir}', '--config.num_train_steps=8', '--config.checkpoint_every_steps=4',
          '--config.mesh.data=8', *extra]


def test_two_processes_match_one(tmp_path):
  port = two_processes.free_port()
  multi = str(tmp_path / 'multi')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  procs = [subprocess.Popen(_main_argv(multi, [f'--coordinator_address=127.0.0.1:{port}',
                                               '--num_processes=2', f'--process_id={i}',
                                               '--config.visualize_every_steps=4']),
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), outputs[0][-3000:] + outputs[1][-3000:]
  single = str(tmp_path / 'single')
  env1 = dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  out = subprocess.run(_main_argv(single), env=env1, cwd=REPO, capture_output=True, timeout=300)
  assert out.returncode == 0, out.stderr.decode()[-3000:]
  np.testing.assert_allclose(_losses(multi), _losses(single), rtol=1e-4)
  # Process 0 wrote the reconstruction grids (the params span both processes' devices).
  events = [f for f in os.listdir(multi) if f.startswith('events.out.tfevents')]
  assert events and any(os.path.getsize(os.path.join(multi, f)) > 10_000 for f in events)
  # The checkpoint written by the 2-process job restores in a 1-process job.
  assert checkpoint.latest_step(multi) == 8
  _, config = checkpoint.load_params(multi)
  assert config['batch_size'] == 16
  # Another process count reads other examples at a step: allowed here on purpose.
  resumed = subprocess.run(_main_argv(multi, ['--config.num_train_steps=10', '--config.resume_allow_changes=True']),
                           env=env1, cwd=REPO,
                           capture_output=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
  assert checkpoint.latest_step(multi) == 10
  logs = sorted(glob.glob(os.path.join(multi, 'logs', 'main.*.log')), key=os.path.getmtime)
  with open(logs[-1], encoding='utf-8') as f:  # INFO lines go to the run's log file, not the terminal.
    assert 'Resumed from checkpoint at step 8' in f.read()


@pytest.mark.parametrize('service,sync_every', [('true', 100000), ('false', 3)],
                         ids=['jax_preemption_service', 'all_gather_every_3_steps'])
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, service, sync_every):
  """Only process 0 gets SIGTERM; both agree, save the same step and exit 75 (no deadlock).

  With jax.distributed's preemption service (the default) the service spreads
  the notice (the trainer's own all-gather would not come before step 100000);
  without it, the processes agree by an all-gather every 3 steps.
  """
  port = two_processes.free_port()
  workdir = str(tmp_path / 'multi')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO, JAX_ENABLE_PREEMPTION_SERVICE=service)
  argv = lambda i: _main_argv(workdir, [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                                        f'--process_id={i}', '--config.num_train_steps=100000',
                                        '--config.checkpoint_every_steps=100000',
                                        f'--config.preemption_sync_every_steps={sync_every}'])
  procs = [subprocess.Popen(argv(i), env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    deadline = time.time() + 240
    while len(metrics.read_metrics(workdir)) < 5:
      assert time.time() < deadline and all(p.poll() is None for p in procs), 'no training progress'
      time.sleep(0.2)
    procs[0].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [75, 75], outputs[0][-3000:] + outputs[1][-3000:]
  step = checkpoint.latest_step(workdir)
  assert step is not None and step >= 5
  if service == 'false':
    assert step % sync_every == 0  # The all-gather's steps.
  assert all(f'saved step {step}; rerun the same command to resume' in out for out in outputs)


PROCESS_0_FAILS = r'''
import sys
import jax
from mae_jax import loop, main
logged = loop._log_metrics
def failing(writer, step, *args, **kwargs):
  if jax.process_index() == 0 and step >= 3:
    raise RuntimeError('process 0 alone failed')
  return logged(writer, step, *args, **kwargs)
loop._log_metrics = failing
sys.argv = ['mae_jax.main', *sys.argv[1:]]
main.run()
'''


def test_an_error_on_one_process_ends_the_job_in_seconds(tmp_path):
  """Process 0 alone fails (say a write only it makes): it leaves with its status, process 1 follows within
  seconds (it loses the coordination service), instead of both waiting 5 minutes in the shutdown barrier."""
  port = two_processes.free_port()
  workdir = str(tmp_path / 'multi')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4', JAX_PLATFORMS='cpu',
             PYTHONPATH=REPO)
  argv = _main_argv(workdir, [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                              '--config.num_train_steps=1000', '--config.log_every_steps=1'])
  command = [sys.executable, '-c', PROCESS_0_FAILS, *argv[3:]]
  start = time.time()
  codes, outputs = two_processes.run(command, env, REPO, tmp_path, timeout=100)
  assert codes[0] == 1 and codes[1] != 0, outputs
  assert 'RuntimeError: process 0 alone failed' in outputs[0]
  assert time.time() - start < 100  # The shutdown barrier alone waited 300 s.


def test_main_runs_the_downstream_configs(tmp_path):
  """`mae_jax.main` with configs/linprobe.py (a `downstream` key) trains the probe, not an MAE."""
  workdir = str(tmp_path / 'probe')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, '-m', 'mae_jax.main', '--config=configs/linprobe.py:variant=B/16,runlocal=True',
                        f'--workdir={workdir}', '--config.num_train_steps=2'],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  records = metrics.read_metrics(workdir)
  assert any('eval/top1' in r for r in records), records[-1]


def test_corrupt_images_are_skipped_and_counted_in_pretraining(tmp_path):
  """A TFDS data set with undecodable images trains on; the log counts them (4 per epoch, 2 epochs)."""
  from PIL import Image

  from tests import test_data_pipeline as data_tests

  def png(level):
    buffer = io.BytesIO()
    Image.new('RGB', (32, 32), (level, 255 - level, level // 2)).save(buffer, 'PNG')
    return buffer.getvalue()

  images = [png(6 * i) for i in range(40)]
  for i in (1, 9, 22, 30):
    images[i] = b'not an image'
  data_dir = str(tmp_path / 'data')
  data_tests._write_records(data_dir, 'garbled', images, [20, 20], (32, 32, 3))
  config = _config(data=8, fsdp=1)
  config.dataset.name = 'garbled'
  config.dataset.data_dir = data_dir
  config.dataset.shuffle_buffer = 8
  config.num_train_steps = 5  # 80 images: two passes over the 40
  config.checkpoint_every_steps = 5
  # 10% corrupt: a data or code bug. Over fewer than loop.CORRUPT_CHECK_MIN_IMAGES images read (80), the limit
  # is a fraction of that minimum: 8 > 0.005 * 1000.
  config.dataset.max_corrupt_fraction = 0.005
  with pytest.raises(ValueError, match=r'\d+ of the \d+ images read so far \(\d+.\d%\) could not be decoded.*'
                                       r'dataset.max_corrupt_fraction=0.005'):
    train.train_and_evaluate(config, str(tmp_path / 'strict'))
  config.dataset.max_corrupt_fraction = 0.2
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['status'] == 'done'
  records = metrics.read_metrics(str(tmp_path / 'run'))
  assert sum(r['train/corrupt_images'] for r in records) == 8
  assert all(np.isfinite(r['train/loss']) for r in records)


def test_unknown_config_key_fails_with_close_match(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, '-m', 'mae_jax.main', f'--config={REPO}/tests/configs/tiny_synthetic.py',
                        f'--workdir={tmp_path}', '--config.batch_sise=32'],
                       env=env, cwd=REPO, capture_output=True, timeout=300)
  assert out.returncode == 2
  assert 'batch_sise' in out.stderr.decode() and 'batch_size' in out.stderr.decode()
  assert not os.path.exists(os.path.join(str(tmp_path), 'checkpoints'))


def test_knn_monitor_during_pretraining(tmp_path):
  config = _config(data=8, fsdp=1)
  config.num_train_steps = 4
  config.eval_every_steps = 2
  config.knn.update({'train_examples': 64, 'eval_examples': 32, 'batch_size': 32})
  result = train.train_and_evaluate(config, str(tmp_path))
  records = metrics.read_metrics(str(tmp_path))
  knn = [r for r in records if 'eval/knn_top1' in r]
  assert [r['step'] for r in knn] == [2, 4]
  assert 0.0 <= result['eval/knn_top1'] <= 1.0


def test_the_metrics_command_prints_the_last_training_record_and_evaluations(tmp_path, capsys):
  writer = metrics.JsonlWriter(str(tmp_path), 0)
  writer.write_scalars(10, {'train/loss': 0.5, 'train/lr': 1e-3})
  writer.write_scalars(10, {'eval/knn_top1': 0.25, 'eval/num_examples': 10000.0})
  writer.write_scalars(20, {'train/loss': 0.25, 'train/lr': 5e-4})
  writer.flush()
  metrics.main([str(tmp_path)])
  assert capsys.readouterr().out.splitlines() == [
      f'{tmp_path}: 3 records, steps 10-20',
      'step 20: train/loss 0.2500, train/lr 0.0005',
      'step 10: eval/knn_top1 25.00%, eval/num_examples 10000']
  metrics.main([str(tmp_path), '--jsonl'])
  assert [json.loads(line)['step'] for line in capsys.readouterr().out.splitlines()] == [10, 10, 20]
  with pytest.raises(SystemExit, match='no metrics logged'):
    metrics.main([str(tmp_path / 'elsewhere')])


def test_metric_writes_that_fail_are_retried_and_nothing_is_lost(tmp_path, monkeypatch):
  """Process 0 alone writes metrics and events: a storage error there warns and the next write catches up."""
  from mae_jax import fileio  # pylint: disable=g-import-not-at-top
  failing = {'on': True}
  for name in ('write_text', 'write_bytes'):
    real = getattr(fileio, name)
    def flaky(path, data, real=real):
      if failing['on']:
        raise OSError('503 Service Unavailable')
      return real(path, data)
    monkeypatch.setattr(metrics.fileio, name, flaky)
  warnings = []
  monkeypatch.setattr(metrics.logging, 'warning', lambda *args: warnings.append(args[0] % args[1:]))
  monkeypatch.setattr(metrics, 'LINES_PER_PART', 2)
  jsonl, events = metrics.JsonlWriter(str(tmp_path), 0), metrics.TensorBoardWriter(str(tmp_path))
  for step in (1, 2, 3, 4, 5):  # Three parts of two lines, the first two full while writes fail.
    jsonl.write_scalars(step, {'train/loss': 1.0 / step})
    events.write_scalars(step, {'train/loss': 1.0 / step})
  events.flush()
  assert not glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  assert sum('Could not write' in w for w in warnings) == 2  # Once per writer, not once per write.
  failing['on'] = False
  jsonl.write_scalars(6, {'train/loss': 0.25})
  events.flush()
  assert [r['step'] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  (path,) = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  accumulator = event_accumulator.EventAccumulator(path)
  accumulator.Reload()
  assert [e.step for e in accumulator.Scalars('train/loss')] == [1, 2, 3, 4, 5]
  assert sum('works again' in w for w in warnings) == 2
