"""The loop every trainer shares: guarded updates, state, prefetching, settings."""

import glob
import json
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune as finetune_recipe
from configs import test as test_config
from mae_jax import checkpoint, config_tools, loop, parallel, pretrain_step, supervised, train, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_skipped_steps_keep_the_moments_but_not_the_schedule():
  """A non-finite step leaves params and Adam's moments and count alone; the lr schedule still advances."""
  schedule = lambda count: 0.1 * (count + 1)
  tx = optax.adam(schedule)
  params = {'w': jnp.ones((3,))}
  state = train_state.TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                                 nonfinite_run=jnp.zeros([], jnp.int32), nonfinite_total=jnp.zeros([], jnp.int32),
                                 halted=jnp.zeros([], bool))
  for loss in (1.0, np.inf, 1.0, np.nan, 1.0):
    before = state.params
    state, _, finite = train_state.guarded_update(state, jnp.float32(loss), {'w': jnp.ones((3,))}, tx, 10)
    if not finite:
      np.testing.assert_array_equal(state.params['w'], before['w'])
  adam, schedule_state = state.opt_state
  assert int(adam.count) == 3 and int(state.nonfinite_total) == 2
  assert int(schedule_state.count) == int(state.step) == 5  # the lr logged for a step is the lr applied


def test_guarded_update_keeps_batch_stats_of_skipped_steps_only():
  tx = optax.sgd(0.1)
  state = train_state.new_state({'w': jnp.ones((2,))}, tx, batch_stats={'mean': jnp.zeros((2,))})
  applied, _, finite = train_state.guarded_update(state, jnp.float32(1.0), {'w': jnp.ones((2,))}, tx, 3,
                                                  batch_stats={'mean': jnp.ones((2,))})
  assert bool(finite) and np.allclose(applied.batch_stats['mean'], 1.0)
  skipped, _, finite = train_state.guarded_update(state, jnp.float32(np.nan), {'w': jnp.ones((2,))}, tx, 3,
                                                  batch_stats={'mean': jnp.ones((2,))})
  assert not bool(finite) and np.allclose(skipped.batch_stats['mean'], 0.0)
  assert int(skipped.step) == 1 and int(skipped.nonfinite_run) == 1


def test_new_state_has_no_batch_stats_unless_given():
  state = train_state.new_state({'w': jnp.ones((2,))}, optax.adam(1e-3))
  assert state.batch_stats == {} and int(state.step) == 0 and not bool(state.halted)


def test_prefetch_moves_every_key_of_the_host_batches_onto_the_mesh():
  mesh = parallel.data_parallel_mesh()
  local = [{'image': np.full((8, 2), i, np.float32), 'corrupt': np.zeros((8,), bool)} for i in range(3)]
  batches = list(loop.prefetch_to_mesh(iter(local), mesh, size=1))
  assert [float(b['image'][0, 0]) for b in batches] == [0.0, 1.0, 2.0]
  assert all(set(b) == {'image', 'corrupt'} for b in batches)
  assert batches[0]['image'].sharding == parallel.batch_sharding(mesh)


@pytest.mark.parametrize('get_config', [lambda: test_config.get_config('steps=1'),
                                        lambda: finetune_recipe.get_config('variant=B/16,runlocal=True')],
                         ids=['pretrain', 'finetune'])
@pytest.mark.parametrize('key,value,match', [
    ('preemption_sync_every_steps', 0, 'preemption_sync_every_steps=0'),
    ('grad_accum_steps', 3, 'grad_accum_steps=3: must be >= 1 and divide batch_size=16'),
    ('batch_size', 12, 'not divisible by the data-parallel size 8'),
])
def test_loop_settings_are_checked_the_same_for_every_trainer(get_config, key, value, match):
  config = get_config()
  config[key] = value
  mesh = parallel.create_mesh(config.mesh)
  with pytest.raises(ValueError, match=match):
    loop.check_loop_settings(config, mesh)


def test_the_trainers_checks_raise_config_errors_which_main_does_not_let_launchers_retry():
  """ConfigError (a ValueError): main exits 78 on it; the message is the check's own."""
  for config, validate in ((test_config.get_config('steps=1'), pretrain_step.validate_config),
                           (finetune_recipe.get_config('variant=B/16,runlocal=True'), supervised.validate_config)):
    config.batch_size = 12
    with pytest.raises(config_tools.ConfigError, match='not divisible by the data-parallel size 8') as raised:
      validate(config, parallel.create_mesh(config.mesh))
    assert type(raised.value.__cause__) is ValueError  # The check's own error, kept as the cause.
  config.mesh.num_devices = 16
  with pytest.raises(config_tools.ConfigError, match='mesh.num_devices=16 but only 8 devices'):
    parallel.create_mesh(config.mesh)
  # Typos in settings read only when the step is built: named before it is (they were exit 1, retried).
  for key, value, match in (('optim.name', 'adm', r"optim.name='adm': must be one of \('adamw'"),
                            ('model.dtype', 'int8', r"model.dtype='int8': must be float32, bfloat16 or float16")):
    for config, validate in ((test_config.get_config('steps=1'), pretrain_step.validate_config),
                             (finetune_recipe.get_config('variant=B/16,runlocal=True'), supervised.validate_config)):
      section, field = key.split('.')
      config[section][field] = value
      with pytest.raises(config_tools.ConfigError, match=match):
        validate(config, parallel.create_mesh(config.mesh))


def test_checkpoint_errors_lose_tensorstores_spec():
  data_read = Exception("Encountered error while reading array index: (slice(0, 64, 1),). See full TensorStore "
                        "details: <bound method spec of TensorStore({'metadata': {'shape': [64]}})>")
  assert checkpoint.error_text(data_read) == 'Encountered error while reading array index: (slice(0, 64, 1),)'
  manifest = ValueError('DATA_LOSS: Error decoding manifest [tensorstore_spec=\'{"metadata": {"shape": [3]}}\']')
  assert checkpoint.error_text(manifest) == 'DATA_LOSS: Error decoding manifest'
  assert not checkpoint.is_misfit(manifest)  # 'shape' in the spec is not Orbax saying that the tree misfits.
  assert checkpoint.is_misfit(ValueError('Requested shape (3,) does not match the saved shape (4,)'))


def test_a_resume_with_other_settings_says_which_and_keeps_the_earlier_config(tmp_path, caplog):
  workdir = str(tmp_path)
  config = test_config.get_config('steps=1')
  assert train.train_and_evaluate(config, workdir)['status'] == 'done'
  first = json.loads(open(os.path.join(workdir, 'config.json')).read())
  with caplog.at_level(logging.WARNING):
    loop.check_resume(test_config.get_config('steps=1'), workdir)  # The same settings: nothing to say.
  assert 'settings other than' not in caplog.text
  shorter = test_config.get_config('steps=1')
  shorter.num_train_steps = 1
  shorter.optim.base_lr = 0.5
  train.train_and_evaluate(shorter, workdir)  # Nothing to train: config.json is left as it is.
  assert json.loads(open(os.path.join(workdir, 'config.json')).read()) == first
  changed = test_config.get_config('steps=2')
  changed.optim.base_lr = 0.5
  changed.mask_ratio = 0.5
  with caplog.at_level(logging.WARNING):
    assert train.train_and_evaluate(changed, workdir)['step'] == 2
  assert (f'Resuming {workdir} at step 1 with settings other than its checkpoint\'s (kept in '
          'config.until_step_1.json): mask_ratio: 0.75 -> 0.5; num_train_steps: 1 -> 2; optim.base_lr: ') in caplog.text
  assert json.loads(open(os.path.join(workdir, 'config.until_step_1.json')).read()) == first
  assert json.loads(open(os.path.join(workdir, 'config.json')).read())['optim']['base_lr'] == 0.5
  # resume_allow_changes: the refused keys are accepted and said too.
  bigger = test_config.get_config('steps=3')
  bigger.batch_size, bigger.resume_allow_changes = 32, True
  with caplog.at_level(logging.WARNING):
    loop.check_resume(bigger, workdir)
  assert 'batch_size: 16 -> 32' in caplog.text.split('settings other than')[-1]


def test_the_config_a_run_trained_with_before_a_change_is_kept_once(tmp_path):
  workdir = str(tmp_path)
  configs = [test_config.get_config('steps=1') for _ in range(3)]
  for i, config in enumerate(configs):
    config.optim.base_lr = 0.1 * (i + 1)
  loop.write_config(configs[0], workdir)
  loop.write_config(configs[1], workdir, start_step=5, total_steps=9)
  # Preempted before a save, then resumed with yet other settings: step 5's earlier config stays the first's.
  loop.write_config(configs[2], workdir, start_step=5, total_steps=9)
  read = lambda name: json.loads(open(os.path.join(workdir, name)).read())['optim']['base_lr']  # noqa: E731
  assert read('config.until_step_5.json') == 0.1 and read('config.json') == pytest.approx(0.3)
  loop.write_config(configs[0], workdir, start_step=9, total_steps=9)  # Nothing to train: left as it is.
  assert read('config.json') == pytest.approx(0.3)


def test_train_steps_from_epochs_or_steps():
  config = test_config.get_config('steps=5')
  assert train_state.train_steps(config, 64) == (4, 5)
  config.num_train_steps = -1
  config.num_epochs = 2.5
  assert train_state.train_steps(config, 64) == (4, 10)


# The damaged checkpoint's reads still in flight end on Orbax's closed event loop (the entry points log them:
# tests/test_console.py).
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_resume_with_another_batch_or_seed_fails_naming_the_keys(tmp_path, capsys):
  workdir = str(tmp_path)
  config = test_config.get_config('steps=1')
  assert train.train_and_evaluate(config, workdir)['status'] == 'done'
  assert train.train_and_evaluate(config, workdir)['step'] == 1  # A rerun says that it had nothing to do.
  assert f'{workdir} already holds step 1 (num_train_steps=1): nothing to train' in capsys.readouterr().err
  config.num_train_steps = 2  # Continuing a run is allowed.
  loop.check_resume(config, workdir)
  changed = test_config.get_config('steps=2')
  changed.batch_size = 32
  changed.seed = 3
  with pytest.raises(loop.ResumeError, match=r"batch_size: 16 -> 32.*seed|seed: 0 -> 3.*batch_size: 16 -> 32"):
    train.train_and_evaluate(changed, workdir)
  assert checkpoint.latest_step(workdir) == 1  # Refused before anything ran.
  reshuffled = test_config.get_config('steps=2')
  reshuffled.dataset.shuffle_buffer = reshuffled.dataset.get('shuffle_buffer', 0) + 7  # Another order in an epoch.
  with pytest.raises(loop.ResumeError, match=r'dataset.shuffle_buffer: '):
    loop.check_resume(reshuffled, workdir)
  deeper = test_config.get_config('steps=2')
  deeper.model.decoder_depth += 1  # The checkpoint's trees no longer fit: one line naming the setting.
  with pytest.raises(loop.ResumeError, match=rf'model.decoder_depth: {deeper.model.decoder_depth - 1} -> '
                                             rf'{deeper.model.decoder_depth}\. Use a new --workdir'):
    train.train_and_evaluate(deeper, workdir)
  changed.resume_allow_changes = True
  loop.check_resume(changed, workdir)
  # The entry point says it in one line, without a traceback.
  done = subprocess.run([sys.executable, '-m', 'mae_jax.main', '--config=configs/test.py:steps=2',
                         f'--workdir={workdir}', '--config.batch_size=32'], capture_output=True, text=True,
                        timeout=300, cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert done.returncode == 78 and 'Traceback' not in done.stderr, done.stderr[-3000:]  # Not retried.
  assert done.stderr.strip().splitlines()[-1].startswith(f'Error: {workdir} holds a run (step 1) with other settings')
  # An unreadable checkpoint is not a settings change: its own error (which a launcher may retry), not ResumeError.
  for manifest in glob.glob(os.path.join(workdir, 'checkpoints', '1', 'params', '**', 'manifest.ocdbt'),
                            recursive=True):
    with open(manifest, 'wb') as f:
      f.write(b'not a manifest')
  with pytest.raises(loop.CheckpointReadError) as failed:
    train.train_and_evaluate(test_config.get_config('steps=2'), workdir)
  directory = os.path.join(workdir, 'checkpoints')
  assert str(failed.value).startswith(f'checkpoint step 1 in {directory} could not be read (')
  assert str(failed.value).endswith(f'if the checkpoint is damaged, move {directory}/1 out of {directory} (the only '
                                    'checkpoint) to start again from step 0')
  assert 'tensorstore_spec' not in str(failed.value)
  with pytest.raises(checkpoint.CheckpointReadError, match=r'\(DATA_LOSS: .*no earlier step is kept to read instead$'):
    checkpoint.load_params(workdir)  # What export, features, visualize and the downstream trainers read.


@pytest.mark.parametrize('grid,num_devices,count,processes,match', [
    (np.array([[[0, 0]], [[1, 1]]]), -1, 4, 2, None),  # Each tensor pair within one process.
    (np.array([[[0, 1]], [[0, 1]]]), -1, 4, 2, 'mesh.tensor=2 spans processes'),
    (np.array([[[0]], [[1]]]), 2, 4, 2, 'mesh.num_devices=2'),  # Two processes' devices left out.
    (np.array([[[0]], [[0]]]), 2, 8, 1, None),  # One process may use some of its devices.
])
def test_a_mesh_that_feeds_overlapping_or_missing_rows_fails(grid, num_devices, count, processes, match):
  axes = ('data', 'fsdp', 'tensor')
  if match is None:
    train_state.check_mesh_feeds_whole_rows(grid, axes, num_devices, count, processes)
  else:
    with pytest.raises(ValueError, match=match):
      train_state.check_mesh_feeds_whole_rows(grid, axes, num_devices, count, processes)


def test_window_means_leave_skipped_steps_out_and_count_them():
  steps = [{'train/loss': 1.0, 'train/skipped': 0.0, 'train/lr': 0.1, 'train/corrupt_images': 1},
           {'train/loss': np.nan, 'train/skipped': 1.0, 'train/lr': 0.2, 'train/corrupt_images': 0},
           {'train/loss': 3.0, 'train/skipped': 0.0, 'train/lr': 0.3, 'train/corrupt_images': 2}]
  scalars = loop.window_scalars(steps)
  assert scalars == {'train/loss': 2.0, 'train/skipped': 1.0, 'train/lr': 0.3, 'train/corrupt_images': 3.0}
  assert np.isnan(loop.window_scalars(steps[1:2])['train/loss'])


def test_throughput_window_leaves_out_what_is_not_training(monkeypatch):
  clock = iter([100.0, 101.0, 105.0, 110.0])
  monkeypatch.setattr(loop.time, 'time', lambda: next(clock))
  window = loop.Window(0)
  window.restart(1)  # t = 100
  window.excluding(lambda: None)  # 101 -> 105: an evaluation, 4 s
  assert window.train_seconds() == pytest.approx(6.0)  # t = 110: 10 s wall, 4 s of it evaluating


SECOND_SIGTERM_DURING_FINAL_SAVE = '''
import os, signal, sys
from configs import test as test_config
from mae_jax import checkpoint, train
close = checkpoint.Checkpointer.close
def close_after_a_second_sigterm(self):
  os.kill(os.getpid(), signal.SIGTERM)  # A requeue or a launcher's kill while the last save commits.
  close(self)
checkpoint.Checkpointer.close = close_after_a_second_sigterm
print(train.train_and_evaluate(test_config.get_config('steps=2'), sys.argv[1])['status'])
'''


def test_a_second_sigterm_during_the_final_save_does_not_lose_it(tmp_path):
  """The trainer's SIGTERM handler stays installed until the last checkpoint is committed."""
  workdir = str(tmp_path / 'run')
  done = subprocess.run([sys.executable, '-c', SECOND_SIGTERM_DURING_FINAL_SAVE, workdir], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().splitlines()[-1] == 'done'
  params, _ = checkpoint.load_params(workdir)
  assert checkpoint.latest_step(workdir) == 2 and params['encoder']



def test_the_first_ctrl_c_asks_for_a_save_and_the_second_stops_at_once(capsys):
  import signal  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGINT)
  flag = loop.PreemptionFlag().install()
  try:
    signal.raise_signal(signal.SIGINT)
    assert flag.requested(1)  # The loop saves after this step and stops (exit 75: rerun to resume).
    assert 'Ctrl-C: saving a checkpoint after this step' in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  finally:
    flag.uninstall()
  assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.parametrize('service', [True, False])
def test_processes_agree_on_a_stop_by_all_gather_only_without_jax_preemption_service(monkeypatch, service):
  """With the service (it owns SIGTERM; its sync point stops the loop) nothing can set the flag: no host sync."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from mae_jax import preemption  # pylint: disable=g-import-not-at-top
  gathered = []
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(preemption, 'jax_preemption_service', lambda: service)
  monkeypatch.setattr(multihost_utils, 'process_allgather', lambda x: gathered.append(x) or np.asarray([x, 0]))
  flag = loop.PreemptionFlag(sync_every_steps=10).install()
  try:
    assert [flag.requested(step) for step in (9, 10, 20)] == [False, False, False]
  finally:
    flag.uninstall()
  assert len(gathered) == (0 if service else 2)


def test_a_preemption_during_a_scheduled_save_keeps_it_instead_of_saving_twice(tmp_path):
  """SIGTERM while the step-5 save is still being written: no second save in the grace period."""
  import jax  # pylint: disable=g-import-not-at-top
  checkpointer = checkpoint.Checkpointer(str(tmp_path), every_steps=5)
  params = {'w': jax.numpy.ones((64, 1024, 1024))}  # 256 MB: the async save takes a while.
  save = lambda step: checkpointer.save(step, params, {'count': jax.numpy.zeros([])}, {'step': step})
  flag = loop.PreemptionFlag()
  try:
    assert loop.save_or_stop(checkpointer, flag, 5, 20, False, lambda: save(5)) == (False, 5)
    flag.event.set()
    assert checkpointer.save_in_flight() == 5
    assert loop.save_or_stop(checkpointer, flag, 7, 20, False, lambda: save(7)) == (True, 5)
    checkpointer.manager.wait_until_finished()
    # Nothing in flight: the preemption saves its own step.
    assert loop.save_or_stop(checkpointer, flag, 8, 20, False, lambda: save(8)) == (True, 8)
  finally:
    checkpointer.close()
  assert checkpointer.all_steps() == [5, 8]


def test_every_process_takes_process_0s_newest_checkpoint(monkeypatch):
  """A run still training may finish a checkpoint between two processes' looks: they take process 0's."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  sent = []
  monkeypatch.setattr(checkpoint.jax, 'process_count', lambda: 2)
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all', lambda x: sent.append(int(x)) or np.int32(7))
  assert checkpoint._agreed_step(5) == 7 and sent == [5]  # pylint: disable=protected-access
  monkeypatch.setattr(multihost_utils, 'broadcast_one_to_all', lambda x: sent.append(int(x)) or np.int32(-1))
  assert checkpoint._agreed_step(None) is None and sent == [5, -1]  # pylint: disable=protected-access


def test_corrupt_images_stop_training_above_the_fraction_of_at_least_the_minimum_read():
  # One bad image in the first batches of a large data set is not a broken data set.
  loop.check_corrupt(1, 64, 0.01, 'read so far', min_seen=loop.CORRUPT_CHECK_MIN_IMAGES)
  loop.check_corrupt(10, 640, 0.01, 'read so far', min_seen=1000)  # 10 = 0.01 * 1000: not more.
  with pytest.raises(ValueError, match=r'11 of the 640 images read so far \(1.7%\) could not be decoded'):
    loop.check_corrupt(11, 640, 0.01, 'read so far', min_seen=1000)
  with pytest.raises(ValueError, match=r'21 of the 2000 images'):
    loop.check_corrupt(21, 2000, 0.01, 'read so far', min_seen=1000)
  with pytest.raises(ValueError, match=r'1 of the 64 images of the split \(1.6%\)'):
    loop.check_corrupt(1, 64, 0.01, 'of the split')  # A whole split read (evaluation): its own fraction.


def test_a_stop_request_skips_the_evaluation_due_at_that_step(tmp_path, monkeypatch):
  """The grace period is for the save: a kNN evaluation due at the step the stop arrives is skipped."""
  from mae_jax import metrics  # pylint: disable=g-import-not-at-top
  asked = []

  def requested(self, step):
    asked.append(step)
    return step == 4  # SIGTERM arrives during step 4, an evaluation step.

  monkeypatch.setattr(loop.PreemptionFlag, 'requested', requested)
  config = test_config.get_config('steps=8')
  config.eval_every_steps = 2
  config.log_every_steps = 2
  workdir = str(tmp_path / 'run')
  result = train.train_and_evaluate(config, workdir)
  assert result['status'] == 'preempted' and result['step'] == 4 and checkpoint.latest_step(workdir) == 4
  assert asked == [1, 2, 3, 4]  # Once per step.
  evaluated = [r['step'] for r in metrics.read_metrics(workdir) if 'eval/knn_top1' in r]
  assert evaluated == [2]
