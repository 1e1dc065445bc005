"""A Google Cloud Storage emulator on 127.0.0.1 for gs:// workdir tests.

`gcp-storage-emulator` (the `dev` extra), started by gcs_emulator_server.py
with the object generations and preconditions it lacks, serves the JSON and
upload APIs in memory. `ENV` points every client at it and away from Google's servers:
etils.epath and the metrics/config files go through fsspec's gcsfs
(`EPATH_USE_TF=false`, `STORAGE_EMULATOR_HOST`), Orbax's arrays through
TensorStore (`TENSORSTORE_GCS_HTTP_URL`), and no client may look for the GCE
metadata server anywhere but a closed port on 127.0.0.1.
"""

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
import time

import pytest

SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'gcs_emulator_server.py')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def env_for(url: str) -> dict:
  closed = f'127.0.0.1:{_free_port()}'  # Nothing listens: credential lookups fail at once, locally.
  return {'EPATH_USE_TF': 'false', 'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'NO_GCE_CHECK': 'True', 'GCE_METADATA_HOST': closed,
          'GCE_METADATA_ROOT': closed, 'GCE_METADATA_IP': closed, 'GOOGLE_CLOUD_PROJECT': 'test'}


@contextlib.contextmanager
def running(bucket: str):
  """Starts the emulator, creates `bucket`, sets ENV in os.environ; yields the env to give subprocesses."""
  if importlib.util.find_spec('gcsfs') is None:  # Not imported here: gcsfs reads ENV when imported.
    pytest.skip('gs:// tests need gcsfs (the dev extra)')
  if importlib.util.find_spec('gcp_storage_emulator') is None:
    pytest.skip('gs:// tests need gcp-storage-emulator (the dev extra)')
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  # Its output goes to a file: a pipe nobody reads fills up and stalls the server (and every client).
  log = tempfile.NamedTemporaryFile('w+', prefix='gcs_emulator.', suffix='.log', delete=False)
  proc = subprocess.Popen([sys.executable, SERVER, str(port)], stdout=log, stderr=subprocess.STDOUT)
  saved = dict(os.environ)
  try:
    deadline = time.time() + 60
    while True:
      with socket.socket() as s:
        if s.connect_ex(('127.0.0.1', port)) == 0:
          break
      if proc.poll() is not None or time.time() > deadline:
        log.seek(0)
        raise RuntimeError(f'gcp-storage-emulator did not start: {log.read()[-2000:]}')
      time.sleep(0.1)
    env = env_for(url)
    os.environ.update(env)
    from etils.epath import gpath  # pylint: disable=g-import-not-at-top
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access  (EPATH_USE_TF is read once)
    import gcsfs  # pylint: disable=g-import-not-at-top
    gcsfs.GCSFileSystem(token='anon', project='test', skip_instance_cache=True).mkdir(bucket)
    yield env
  finally:
    os.environ.clear()
    os.environ.update(saved)
    from etils.epath import gpath  # pylint: disable=g-import-not-at-top
    gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()
    os.unlink(log.name)
