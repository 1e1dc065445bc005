"""The loop every trainer shares: guarded updates, state, prefetching, settings."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import finetune as finetune_recipe
from configs import test as test_config
from mae_jax import loop, parallel


def test_skipped_steps_keep_the_moments_but_not_the_schedule():
  """A non-finite step leaves params and Adam's moments and count alone; the lr schedule still advances."""
  schedule = lambda count: 0.1 * (count + 1)
  tx = optax.adam(schedule)
  params = {'w': jnp.ones((3,))}
  state = loop.TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                           nonfinite_run=jnp.zeros([], jnp.int32), nonfinite_total=jnp.zeros([], jnp.int32),
                           halted=jnp.zeros([], bool))
  for loss in (1.0, np.inf, 1.0, np.nan, 1.0):
    before = state.params
    state, _, finite = loop.guarded_update(state, jnp.float32(loss), {'w': jnp.ones((3,))}, tx, 10)
    if not finite:
      np.testing.assert_array_equal(state.params['w'], before['w'])
  adam, schedule_state = state.opt_state
  assert int(adam.count) == 3 and int(state.nonfinite_total) == 2
  assert int(schedule_state.count) == int(state.step) == 5  # the lr logged for a step is the lr applied


def test_guarded_update_keeps_batch_stats_of_skipped_steps_only():
  tx = optax.sgd(0.1)
  state = loop.new_state({'w': jnp.ones((2,))}, tx, batch_stats={'mean': jnp.zeros((2,))})
  applied, _, finite = loop.guarded_update(state, jnp.float32(1.0), {'w': jnp.ones((2,))}, tx, 3,
                                           batch_stats={'mean': jnp.ones((2,))})
  assert bool(finite) and np.allclose(applied.batch_stats['mean'], 1.0)
  skipped, _, finite = loop.guarded_update(state, jnp.float32(np.nan), {'w': jnp.ones((2,))}, tx, 3,
                                           batch_stats={'mean': jnp.ones((2,))})
  assert not bool(finite) and np.allclose(skipped.batch_stats['mean'], 0.0)
  assert int(skipped.step) == 1 and int(skipped.nonfinite_run) == 1


def test_new_state_has_no_batch_stats_unless_given():
  state = loop.new_state({'w': jnp.ones((2,))}, optax.adam(1e-3))
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


def test_train_steps_from_epochs_or_steps():
  config = test_config.get_config('steps=5')
  assert loop.train_steps(config, 64) == (4, 5)
  config.num_train_steps = -1
  config.num_epochs = 2.5
  assert loop.train_steps(config, 64) == (4, 10)
