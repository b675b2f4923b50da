"""A local Google Cloud Storage for tests: ``python tests/gcs_fake.py PORT BUCKET``.

The ``gcp-storage-emulator`` package, in memory, with the generation headers its object
downloads lack (TensorStore, which orbax writes checkpoints through, reads them) and the
``moveTo`` call gcsfs renames with (``metrics.jsonl``, the JSON results). Point
the clients at it with ``environment(port)``: gcsfs (etils' gs:// paths) reads
``STORAGE_EMULATOR_HOST``, TensorStore ``TENSORSTORE_GCS_HTTP_URL``.
"""

import sys
import threading
import types
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def environment(port: int) -> dict:
  url = f"http://localhost:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "GOOGLE_CLOUD_PROJECT": "msjax-test"}


def main(port: int, bucket: str) -> None:
  from gcp_storage_emulator.handlers import objects
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", 1))
    except Exception:  # noqa: BLE001 - a missing object: the original handler answers 404
      pass
    return download(request, response, storage, *args, **kwargs)

  def move(request, response, storage, *args, **kwargs):  # the moveTo gcsfs renames with
    name = request.params["bucket_name"]
    try:
      moved = objects._copy(request.base_url, storage, name, request.params["object_id"],
                            name, request.params["dest_object_id"])
    except objects.NotFound:
      response.status = HTTPStatus.NOT_FOUND
      return
    objects._delete(storage, name, request.params["object_id"])
    response.json(moved)

  objects.download = download_with_generation
  from gcp_storage_emulator import server as server_lib  # reads objects.download now
  # One thread per connection (two processes and their HTTP pools share the server, and a
  # single-threaded one can stall them all behind one idle connection), but one request
  # at a time inside (its in-memory storage is not thread-safe).
  server_lib.server = types.SimpleNamespace(HTTPServer=ThreadingHTTPServer,
                                            BaseHTTPRequestHandler=BaseHTTPRequestHandler)
  handle, lock = server_lib.Router.handle, threading.Lock()

  def handle_alone(self, method):
    with lock:
      return handle(self, method)

  server_lib.Router.handle = handle_alone
  server_lib.HANDLERS = (
      (r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
       r"(?P<dest_object_id>.*[^/]+)$", {server_lib.POST: move}),
      *server_lib.HANDLERS)
  server = server_lib.create_server("localhost", port, in_memory=True, default_bucket=bucket)
  server.start()
  print("ready", flush=True)
  threading.Event().wait()


if __name__ == "__main__":
  main(int(sys.argv[1]), sys.argv[2])
