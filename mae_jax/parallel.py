"""Device mesh, partition rules, and host-to-global batch assembly.

Sharding is data: `config.mesh.rules` is a list of (regex over '/'-joined
parameter paths, spec) pairs resolved here in one place. A spec is a tuple of
mesh axis names (or None) for the trailing dimensions of the array, or one of
the strings 'fsdp' (shard the largest divisible dimension over the `fsdp`
axis) and 'replicate'. Scanned layers add a leading [depth] axis that specs do
not mention; it stays unsharded.
"""

import math
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from mae_jax import config_tools

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the batch dimension is split over both

# Tensor-parallel layout for the ViT blocks (a no-op when mesh.tensor == 1),
# then FSDP for every other large tensor.
DEFAULT_RULES = (
    (r'.*/(query|key|value|fc1)/kernel$', ('fsdp', 'tensor')),
    (r'.*/(query|key|value|fc1)/bias$', ('tensor',)),
    (r'.*/(proj|fc2)/kernel$', ('tensor', 'fsdp')),
    (r'.*', 'fsdp'),
)


def _count(n: int, what: str = 'device') -> str:
  """'1 device', '8 devices'."""
  return f'{n} {what}' if n == 1 else f'{n} {what}s'


def _axes(names: Sequence[str]) -> str:
  """'mesh.data', 'mesh.data or mesh.fsdp', 'mesh.data, mesh.fsdp or mesh.tensor'."""
  names = [f'mesh.{a}' for a in names]
  return names[0] if len(names) == 1 else f'{", ".join(names[:-1])} or {names[-1]}'


def resolve_mesh_shape(mesh_config, num_devices: int, num_slices: int = 1) -> dict:
  """Returns {'data': d, 'fsdp': f, 'tensor': t, 'dcn_data': n}: the mesh of one slice, n slices (or groups).

  Several slices (TPU slices; on GPUs, the hosts of a multi-host job) are data-parallel replicas over the
  slower links between them (dcn_data) unless mesh.dcn_data says otherwise: an axis of -1 takes the remaining
  devices of a slice. Sizes that multiply to the job's device count are the job's: the data axis spans the
  slices where it is a multiple of their number, else the mesh is one over every device.
  """
  sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
  dcn_data = int(mesh_config['dcn_data'] or 1)
  unknown = [a for a, s in sizes.items() if s == -1]
  if len(unknown) > 1:
    raise ValueError(f'mesh: only one axis may be -1, got {" and ".join(f"mesh.{a}=-1" for a in unknown)}')
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f'mesh.{axis}={size}: must be a positive size or -1 (the remaining devices)')
  known = math.prod(s for s in sizes.values() if s != -1)
  if num_slices > 1 and dcn_data == 1:
    dcn_data = num_slices
    if not unknown and known == num_devices:  # The job's sizes.
      if sizes['data'] % num_slices:
        dcn_data = 1
      else:
        sizes['data'] //= num_slices
        known //= num_slices
  if num_devices % dcn_data:
    raise ValueError(f'mesh.dcn_data={dcn_data} does not divide the {_count(num_devices)}')
  per_slice = num_devices // dcn_data
  # 'the 8 devices', or with several slices 'the 4 devices per slice (8 in all)'.
  where = (f'the {_count(per_slice)}' if dcn_data == 1
           else f'the {_count(per_slice)} per slice ({num_devices} in all)')
  fixed = ', '.join(f'{a}={s}' for a, s in sizes.items() if s != -1)
  if unknown:
    if per_slice % known:
      raise ValueError(
          f'mesh: the fixed axes {fixed} (product {known}) do not divide {where}; '
          f'change {_axes([a for a, s in sizes.items() if s != -1])}')
    sizes[unknown[0]] = per_slice // known
  elif known > per_slice:
    raise ValueError(
        f'mesh: data*fsdp*tensor = {known} is larger than {where}; lower '
        f'{_axes([a for a, s in sizes.items() if s > 1])}, or set mesh.data=-1')
  elif known != per_slice:
    raise ValueError(
        f'mesh: data*fsdp*tensor = {known} but there {"is" if per_slice == 1 else "are"} '
        f'{where.removeprefix("the ")}; set mesh.data=-1 to use the rest, or change {_axes(MESH_AXES)}')
  sizes['dcn_data'] = dcn_data
  return sizes


@config_tools.settings_check
def create_mesh(mesh_config, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """Builds the ('data', 'fsdp', 'tensor') mesh with Auto axes from `config.mesh`."""
  devices = list(devices if devices is not None else jax.devices())
  wanted = int(mesh_config['num_devices'] or -1)
  if wanted > len(devices):
    raise ValueError(f'mesh.num_devices={wanted} but only {_count(len(devices))} '
                     f'{"is" if len(devices) == 1 else "are"} visible')
  if wanted > 0:
    devices = devices[:wanted]
  num_slices = len({getattr(d, 'slice_index', 0) for d in devices})
  sizes = resolve_mesh_shape(mesh_config, len(devices), num_slices)
  ici_shape = [sizes[a] for a in MESH_AXES]
  if sizes['dcn_data'] > 1:
    dcn_shape = [sizes['dcn_data'], 1, 1]
    try:
      device_array = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
    except (ValueError, AssertionError, KeyError, AttributeError):
      device_array = np.asarray(devices).reshape([s * d for s, d in zip(ici_shape, dcn_shape)])
  else:
    try:
      device_array = mesh_utils.create_device_mesh(ici_shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
      device_array = np.asarray(devices).reshape(ici_shape)
  return jax.sharding.Mesh(device_array, MESH_AXES)


def data_parallel_mesh(devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """Every device on the data axis (what a mesh section of data=-1, fsdp=1, tensor=1 gives)."""
  return create_mesh({'data': -1, 'fsdp': 1, 'tensor': 1, 'dcn_data': 1, 'num_devices': -1}, devices)


def batch_axis_size(mesh: jax.sharding.Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def path_str(path) -> str:
  """'/'-joined names of a jax key path: 'params/encoder/blocks_0/attn/query/kernel'."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def _fit_spec(spec, shape, mesh):
  """Pads a trailing-dims spec to the array rank and drops axes that do not divide."""
  spec = tuple(spec)
  if len(spec) > len(shape):
    return (None,) * len(shape)
  spec = (None,) * (len(shape) - len(spec)) + spec
  fitted = []
  for dim, axis in zip(shape, spec):
    if axis is not None and (mesh.shape.get(axis, 1) == 1 or dim % mesh.shape[axis]):
      axis = None
    fitted.append(axis)
  return tuple(fitted)


def _fsdp_spec(shape, mesh, min_size, base=None):
  """Shards the largest dimension divisible by the fsdp size (and not yet sharded)."""
  spec = list(base) if base is not None else [None] * len(shape)
  fsdp = mesh.shape.get('fsdp', 1)
  if fsdp == 1 or math.prod(shape) < min_size or 'fsdp' in spec:
    return tuple(spec)
  candidates = [i for i, d in enumerate(shape) if spec[i] is None and d % fsdp == 0]
  if candidates:
    spec[max(candidates, key=lambda i: shape[i])] = 'fsdp'
  return tuple(spec)


def partition_spec(name: str, shape, mesh, rules=DEFAULT_RULES, min_fsdp_size: int = 2**18):
  """The PartitionSpec for one array, from the first rule whose regex matches `name`."""
  for pattern, rule in rules:
    if re.fullmatch(pattern, name) or re.match(pattern, name):
      if rule == 'replicate':
        return jax.sharding.PartitionSpec()
      if rule == 'fsdp':
        return jax.sharding.PartitionSpec(*_fsdp_spec(shape, mesh, min_fsdp_size))
      spec = _fit_spec(rule, shape, mesh)
      if math.prod(shape) < min_fsdp_size:  # small tensors stay whole on every device
        spec = tuple(a if a != 'fsdp' else None for a in spec)
      return jax.sharding.PartitionSpec(*spec)
  return jax.sharding.PartitionSpec()


def tree_shardings(tree, mesh, rules=DEFAULT_RULES, min_fsdp_size: int = 2**18):
  """NamedShardings for every array leaf of an (abstract) pytree, by path rules."""
  def one(path, leaf):
    shape = getattr(leaf, 'shape', ())
    spec = partition_spec(path_str(path), shape, mesh, rules, min_fsdp_size)
    return jax.sharding.NamedSharding(mesh, spec)
  return jax.tree_util.tree_map_with_path(one, tree)


def rules_from_config(mesh_config):
  """Reads config.mesh.rules ((regex, spec), ...) or falls back to DEFAULT_RULES."""
  rules = mesh_config['rules']
  if not rules:
    return DEFAULT_RULES
  parsed = []
  for entry in rules:
    if len(entry) != 2:
      raise ValueError(f'mesh.rules entry {entry!r}: must be (regex, spec)')
    pattern, spec = entry
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f'mesh.rules regex {pattern!r} does not compile: {e}') from e
    if isinstance(spec, str):
      if spec not in ('fsdp', 'replicate'):
        raise ValueError(f"mesh.rules spec {spec!r}: must be 'fsdp', 'replicate' or a tuple of axes")
    else:
      spec = tuple(spec)
      bad = [a for a in spec if a is not None and a not in MESH_AXES]
      if bad:
        raise ValueError(f'mesh.rules spec {spec!r} names unknown axes {bad}; allowed {MESH_AXES}')
    parsed.append((pattern, spec))
  return tuple(parsed)


def global_batch_from_local(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """Assembles each process's local numpy batch into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local_batch)


def host_to_global(value, sharding: jax.sharding.Sharding) -> jax.Array:
  """`value` (the same on every process) as a global array with `sharding`.

  Host values are cut into this process's shards (make_array_from_callback),
  so a sharding that spans several processes works and nothing is fetched from
  another host. A global array already laid out so is returned as is; one with
  another layout is resharded on the devices.
  """
  if isinstance(value, jax.Array):
    if value.sharding == sharding:
      return value
    if not value.is_fully_addressable:
      return jax.jit(lambda x: x, out_shardings=sharding)(value)
    if sharding.is_fully_addressable:
      return jax.device_put(value, sharding)
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def place_tree(tree, shardings):
  """host_to_global over a tree and the matching tree of shardings."""
  return jax.tree.map(host_to_global, tree, shardings)


def config_shardings(tree, config, mesh: jax.sharding.Mesh):
  """Shardings of `tree` (arrays or abstract) by config.mesh's partition rules (FSDP for large tensors)."""
  return tree_shardings(tree, mesh, rules_from_config(config.mesh), config.mesh.min_fsdp_size)


def place_on_mesh(tree, config, mesh: jax.sharding.Mesh):
  """Host arrays (the same on every process) sharded by the config's rules; each process builds
  only its own shards, so the mesh may span processes."""
  return place_tree(tree, config_shardings(tree, config, mesh))


def init_on_mesh(init_fn, config, mesh: jax.sharding.Mesh):
  """init_fn() computed straight into the config's shardings (never whole on one device)."""
  shardings = config_shardings(jax.eval_shape(init_fn), config, mesh)
  with jax.set_mesh(mesh):
    return jax.jit(init_fn, out_shardings=shardings)()


def eval_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """`batch_size` rounded down to a multiple of the processes and the data-parallel size (at least one)."""
  unit = math.lcm(batch_axis_size(mesh), jax.process_count())
  return max(unit, batch_size // unit * unit)
