"""The non-finite guard around the optimizer update: what it costs over a plain optax update.

  JAX_PLATFORMS=cpu python benchmarks/bench_guarded_update.py [--model=mae_vit_base_patch16] [--rounds=7]

Times three jitted, donated updates of the same AdamW state (the pretraining
recipe's optimizer, the model's real parameter tree), interleaved round by
round, medians, compilation excluded:

  plain     optax: tx.update + apply_updates (no guard);
  plain+norm  the same, and the gradients' global norm, which the guard reads
            (and the trainers report as train/grad_norm): one more pass over
            the gradients;
  guarded   mae_jax.train_state.guarded_update (the trainers' update: a lax.cond);
  select    the former guard: both outcomes computed, then jnp.where on every
            parameter and moment.

Prints milliseconds and the ratio to plain. Never fails on time.
"""

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, __file__.rsplit('/benchmarks/', 1)[0])

from configs import default  # noqa: E402
from mae_jax import optim, train_state  # noqa: E402
from mae_jax.models import from_config  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('model', 'mae_vit_base_patch16', 'Model whose parameter tree is updated.')
flags.DEFINE_integer('image_size', 224, 'Image size of the model.')
flags.DEFINE_integer('rounds', 7, 'Timed rounds (interleaved).')


def select_guard(state, loss, grads, tx, max_nonfinite):
  """The guard before the lax.cond: computes the update, then selects every leaf."""
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & ~state.halted
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  keep_opt = lambda new, old: jax.tree.map(lambda n, o: n if is_schedule(n) else keep(n, o), new, old,
                                           is_leaf=is_schedule)
  nonfinite_run = jnp.where(finite, 0, state.nonfinite_run + 1)
  return state.replace(step=state.step + 1, params=keep(new_params, state.params),
                       opt_state=keep_opt(new_opt_state, state.opt_state), nonfinite_run=nonfinite_run,
                       nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
                       halted=state.halted | (nonfinite_run >= max_nonfinite))


def main(argv):
  del argv
  config = default.get_config()
  config.model.name = FLAGS.model
  config.dataset.image_size = FLAGS.image_size
  config.dataset.channels = 3
  model = from_config.build_mae(config)
  images = jnp.zeros((1, FLAGS.image_size, FLAGS.image_size, 3))
  params = jax.jit(lambda: model.init({'params': jax.random.key(0), 'mask': jax.random.key(1)}, images,
                                      train=False)['params'])()
  count = sum(x.size for x in jax.tree.leaves(params))
  tx, _ = optim.create_optimizer(config.optim, global_batch=4096, steps_per_epoch=312, total_steps=250_000)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  loss = jnp.float32(1.0)

  def plain(state, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)

  def plain_and_norm(state, grads):
    return plain(state, grads), optax.tree.norm(grads)

  fns = {
      'plain': jax.jit(plain, donate_argnums=0),
      'plain+norm': jax.jit(plain_and_norm, donate_argnums=0),
      'guarded': jax.jit(lambda s, g: train_state.guarded_update(s, loss, g, tx, 10)[:2], donate_argnums=0),
      'select': jax.jit(lambda s, g: select_guard(s, loss, g, tx, 10), donate_argnums=0),
  }
  init = jax.jit(lambda p: train_state.new_state(p, tx))
  states = {name: init(params) for name in fns}
  def call(name):
    out = jax.block_until_ready(fns[name](states[name], grads))
    states[name] = out[0] if isinstance(out, tuple) else out

  for name in fns:  # Compile and warm up.
    call(name)
  times = {name: [] for name in fns}
  for _ in range(FLAGS.rounds):
    for name in fns:
      start = time.perf_counter()
      call(name)
      times[name].append(time.perf_counter() - start)
  print(f'{FLAGS.model}: {count / 1e6:.1f}M parameters, AdamW, {jax.devices()[0].device_kind}, '
        f'{FLAGS.rounds} interleaved rounds, medians')
  plain_ms = 1e3 * np.median(times['plain'])
  for name in fns:
    ms = 1e3 * np.median(times[name])
    print(f'{name:10s} {ms:8.1f} ms   {ms / plain_ms:5.2f}x plain')


if __name__ == '__main__':
  app.run(main)
