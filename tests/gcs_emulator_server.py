"""gcp-storage-emulator with the object generations and preconditions TensorStore relies on.

Orbax writes arrays with TensorStore's OCDBT format, which reads an object's
generation from the `x-goog-generation` header and writes with
`ifGenerationMatch` (compare and swap). The emulator (2026.7) sends no
generation header and ignores preconditions, so this script adds both, as
Cloud Storage behaves, and serialises the handlers so a check and its write
are atomic. It also serves each connection on its own thread: the emulator's
single-threaded server stalls every client behind one connection that has
not sent its request yet (gcsfs's read-ahead opens such connections). Then
it serves in memory on 127.0.0.1.

  python tests/gcs_emulator_server.py PORT
"""

import http
import sys
import threading

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_LOCK = threading.Lock()


def _generation(storage, bucket: str, name: str) -> str:
  """The object's generation, '0' when it does not exist (Cloud Storage's convention)."""
  try:
    return str(storage.get_file_obj(bucket, name)['generation'])
  except NotFound:
    return '0'


def _with_generations(handler):
  def wrapped(request, response, storage, *args, **kwargs):
    with _LOCK:
      bucket = request.params.get('bucket_name')
      name = request.params.get('object_id') or (request.query.get('name') or [None])[0]
      if bucket and name:
        current = _generation(storage, bucket, name)
        match = (request.query.get('ifGenerationMatch') or [None])[0]
        not_match = (request.query.get('ifGenerationNotMatch') or [None])[0]
        if match is not None and match != current:
          response.status = http.HTTPStatus.PRECONDITION_FAILED
          return None
        if not_match is not None and not_match == current:
          response.status = http.HTTPStatus.NOT_MODIFIED
          return None
      result = handler(request, response, storage, *args, **kwargs)
      if bucket and name and request.method == 'GET':
        generation = _generation(storage, bucket, name)
        if generation != '0':
          response['x-goog-generation'] = generation
          response['x-goog-metageneration'] = '1'
      return result

  return wrapped


def _patch():
  wrapped = {}

  def wrap(fn):
    if fn not in wrapped:
      wrapped[fn] = _with_generations(fn)
    return wrapped[fn]

  server.HANDLERS = tuple((regex, {method: wrap(fn) for method, fn in methods.items()})
                          for regex, methods in server.HANDLERS)
  objects.insert = wrap(objects.insert)  # The dispatcher's fallback for uploads.
  server.server.HTTPServer = server.server.ThreadingHTTPServer  # `server.server` is http.server.


if __name__ == '__main__':
  _patch()
  server.create_server('127.0.0.1', int(sys.argv[1]), in_memory=True).run()
