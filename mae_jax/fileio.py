"""The one file layer for workdirs and outputs: local paths and gs:// (or any etils.epath scheme).

Every file that a trainer, export, sweep, feature job or visualize writes or
reads in a workdir goes through here. Object stores have no append and no
rename, so files are written whole, once: `write_text` / `write_bytes` put a
complete object (local files go through a temporary name and an atomic
rename, so a reader never sees half a file).

Backends: etils.epath, as Orbax and tfds use. gs:// goes through TensorFlow's
GCS file system by default; with `EPATH_USE_TF=false` it goes through fsspec
(gcsfs), which also honours `STORAGE_EMULATOR_HOST` (the tests' local GCS
emulator).
"""

import functools
import io
import os
import uuid

import numpy as np
from etils import epath

PathLike = str | os.PathLike

try:  # fsspec (gcsfs) caches directory listings per process; workdirs change under us (other processes
  # write checkpoints, metrics, markers), so listings are always fresh. TF's GCS file system does not cache.
  import fsspec  # pylint: disable=g-import-not-at-top
  for _protocol in ('gs', 'gcs', 's3'):
    fsspec.config.conf.setdefault(_protocol, {}).setdefault('use_listings_cache', False)
except ImportError:
  pass


class StorageError(OSError):
  """A remote path (gs://) could not be reached: no network, no credentials, no such bucket."""


def _reached(fn):
  """fn(p, ...) with a remote store's errors other than 'not found' as one StorageError naming the path."""

  @functools.wraps(fn)
  def call(p, *args, **kwargs):
    try:
      return fn(p, *args, **kwargs)
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, StorageError, ImportError,
            NotImplementedError):  # Not the storage out of reach: a missing client, a path of the wrong kind.
      raise
    except Exception as e:  # noqa: BLE001  # pylint: disable=broad-except  # Any storage client's error.
      if not is_remote(p) or isinstance(e, (ValueError, TypeError)):
        raise
      reason = (str(e).strip().splitlines() or [''])[0][:300]
      raise StorageError(f'{os.fspath(p)}: the storage could not be reached ({type(e).__name__}: {reason}); check '
                         'the bucket name, the credentials (gcloud auth application-default login) and the '
                         'network') from e

  return call


def is_remote(path: PathLike) -> bool:
  """True for URLs such as gs://bucket/run (anything with a scheme)."""
  return '://' in os.fspath(path)


def path(p: PathLike) -> epath.Path:
  """An epath.Path; local paths are made absolute (a relative workdir stays where it was started)."""
  p = os.fspath(p)
  return epath.Path(p if is_remote(p) else os.path.abspath(p))


def join(base: PathLike, *parts: str) -> str:
  """base/parts... as a string, for local paths and URLs alike."""
  base = os.fspath(base)
  if is_remote(base):
    return '/'.join([base.rstrip('/')] + [p.strip('/') for p in parts])
  return os.path.join(base, *parts)


@_reached
def exists(p: PathLike) -> bool:
  return path(p).exists()


@_reached
def isdir(p: PathLike) -> bool:
  return path(p).is_dir()


@_reached
def makedirs(p: PathLike) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


@_reached
def listdir(p: PathLike) -> list[str]:
  """Names (not paths) in directory p, sorted; [] if it does not exist."""
  d = path(p)
  if not d.exists():
    return []
  return sorted(child.name for child in d.iterdir())


@_reached
def glob(p: PathLike, pattern: str) -> list[str]:
  """Paths in directory p whose names match `pattern`, sorted by name."""
  d = path(p)
  if not d.exists():
    return []
  return sorted(os.fspath(child) for child in d.glob(pattern))


@_reached
def read_bytes(p: PathLike) -> bytes:
  return path(p).read_bytes()


@_reached
def read_text(p: PathLike) -> str:
  return path(p).read_text(encoding='utf-8')


@_reached
def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes the whole file at once (parents created); readers see the old or the new file, never part."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):  # An object store puts an object whole or not at all.
    target.write_bytes(data)
    return
  tmp = target.parent / f'.{target.name}.{uuid.uuid4().hex}.tmp'
  try:
    tmp.write_bytes(data)
    os.replace(os.fspath(tmp), os.fspath(target))
  finally:
    if tmp.exists():
      tmp.unlink()


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode('utf-8'))


def create_exclusive(p: PathLike, data: bytes) -> bool | None:
  """Creates a local file only if it does not exist: True when created, False when it was there.

  None for object stores (gs://), which this layer cannot ask to create an
  object only if absent: the caller writes and reads back instead.
  """
  if is_remote(p):
    return None
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  try:
    fd = os.open(os.fspath(target), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'wb') as f:
    f.write(data)
  return True


def rmtree(p: PathLike) -> None:
  target = path(p)
  if target.exists():
    target.rmtree()


@_reached
def remove(p: PathLike) -> None:
  target = path(p)
  if target.exists():
    target.unlink()


def save_npz(p: PathLike, **arrays) -> None:
  """np.savez to any path, written whole."""
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(p, buffer.getvalue())


def load_npz(p: PathLike) -> dict:
  """The arrays of an .npz file (no pickles: object arrays are refused)."""
  with np.load(io.BytesIO(read_bytes(p)), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}
