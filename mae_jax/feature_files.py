"""The files `mae_jax.features` writes: .safetensors, .npz, or .npy with a JSON sidecar; and reading them back.

  arrays, names, metadata = read_features('feats.safetensors')
"""

import io
import json
import os
from collections.abc import Sequence

import numpy as np

from mae_jax import fileio

OUT_EXTENSIONS = ('.safetensors', '.npz', '.npy')
METADATA_KEY = 'mae_jax_features'


class FeaturesError(ValueError):
  """A setting of the features command is wrong; the message names the flag."""



def _extension(out: str) -> str:
  ext = os.path.splitext(out)[1].lower()
  if ext not in OUT_EXTENSIONS:
    raise FeaturesError(f'--out={out}: must end in one of {", ".join(OUT_EXTENSIONS)}')
  return ext


def sidecar_path(out: str) -> str:
  """Where an .npy output's names and metadata go: FILE_STEM.metadata.json."""
  return os.path.splitext(out)[0] + '.metadata.json'


def check_out(out: str, overwrite: bool = False) -> None:
  """Refuses a bad --out before any work: extension, existing file, unwritable folder."""
  if not out:
    raise FeaturesError('--out is required: a .safetensors, .npz or .npy file (local or gs://)')
  ext = _extension(out)
  if fileio.isdir(out):
    raise FeaturesError(f'--out={out} is a folder: give a file name ending in {ext}')
  if fileio.exists(out) and not overwrite:
    raise FeaturesError(f'--out={out} exists: pass --overwrite to replace it, or choose another file')
  side = sidecar_path(out)
  if ext == '.npy' and fileio.exists(side) and 'names' not in json.loads(fileio.read_text(side) or '{}'):
    raise FeaturesError(f'--out={out}: its names would go to {side}, which holds other metadata (an export\'s?); '
                        'choose another file name')
  probe = fileio.join(str(fileio.path(out).parent), f'.{os.path.basename(out)}.probe')
  try:  # Creates the folder too; an hour of extraction must not end in a permission error.
    fileio.write_bytes(probe, b'')
    fileio.remove(probe)
  except Exception as e:  # pylint: disable=broad-except  # OSError locally, other types for object stores.
    raise FeaturesError(f'--out={out}: cannot write there ({type(e).__name__}: {e})') from e


def write_features(out: str, arrays: dict[str, np.ndarray], names: Sequence[str], metadata: dict,
                   labels: np.ndarray | None = None) -> str:
  """Writes the arrays, names and metadata to `out` (.safetensors, .npz or .npy); returns out."""
  ext = _extension(out)
  names = [str(n) for n in names]
  metadata = {**metadata, 'keys': list(arrays)}
  extra = {} if labels is None else {'labels': np.asarray(labels, np.int64)}
  if ext == '.safetensors':
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    header = {METADATA_KEY: json.dumps(metadata), 'names': json.dumps(names)}
    tensors = {k: np.ascontiguousarray(v) for k, v in {**arrays, **extra}.items()}
    fileio.write_bytes(out, safetensors.numpy.save(tensors, metadata=header))
  elif ext == '.npz':
    fileio.save_npz(out, **arrays, **extra, names=np.asarray(names, dtype=str),
                    metadata=np.asarray(json.dumps(metadata)))
  else:
    stacked = next(iter(arrays.values())) if len(arrays) == 1 else np.stack(list(arrays.values()), axis=1)
    buffer = io.BytesIO()
    np.save(buffer, stacked, allow_pickle=False)
    fileio.write_bytes(out, buffer.getvalue())
    side = {**metadata, 'names': names, 'stacked_axis': None if len(arrays) == 1 else 1}
    if labels is not None:
      side['labels'] = [int(v) for v in labels]
    fileio.write_text(sidecar_path(out), json.dumps(side))
  return out


def read_features(path: str) -> tuple[dict[str, np.ndarray], list[str], dict]:
  """(arrays by key (labels included when written), names, metadata) of a features file."""
  ext = _extension(path)
  if ext == '.safetensors':
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    data = fileio.read_bytes(path)
    size = int.from_bytes(data[:8], 'little')
    header = json.loads(data[8:8 + size])['__metadata__']
    return (dict(safetensors.numpy.load(data)), json.loads(header['names']),
            json.loads(header[METADATA_KEY]))
  if ext == '.npz':
    arrays = fileio.load_npz(path)
    names = [str(n) for n in arrays.pop('names')]
    return arrays, names, json.loads(str(arrays.pop('metadata')))
  stacked = np.load(io.BytesIO(fileio.read_bytes(path)), allow_pickle=False)
  side = json.loads(fileio.read_text(sidecar_path(path)))
  keys = side['keys']
  arrays = {keys[0]: stacked} if len(keys) == 1 else {k: stacked[:, i] for i, k in enumerate(keys)}
  if side.get('labels') is not None:
    arrays['labels'] = np.asarray(side.pop('labels'), np.int64)
  names = side.pop('names')
  return arrays, names, side
