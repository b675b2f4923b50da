"""Weights by name (msjax.models.pretrained), against a checkpoint served on the loopback
address: the first use downloads, checks the hash, converts and caches; later uses make
no request; a wrong, short or cut file is refused and nothing is cached; offline, the
error gives the address, the expected hash and the manual commands; training stops on it
before compiling anything."""

import hashlib
import http.server
import io
import json
import os
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msjax import models
from msjax.models import pretrained, weights

torch = pytest.importorskip("torch")


class Server:
  """An HTTP server on 127.0.0.1 serving ``files`` (path -> bytes); ``cut`` sends a path's
  full ``Content-Length`` but only that many bytes, then closes (a dropped connection)."""

  def __init__(self):
    self.files, self.cut, self.requests = {}, {}, []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 - the http.server API
        outer.requests.append(self.path)
        body = outer.files.get(self.path)
        if body is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:outer.cut.get(self.path, len(body))])

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
  s = Server()
  yield s
  s.close()


def small_checkpoint(seed=0):
  """A PyTorch-layout state dict of msjax's small CNN, saved by torch: ``(bytes, the
  msjax arrays it must convert to)``."""
  model = models.create_backbone("small_cnn", rngs=nnx.Rngs(seed))
  arrays = {k: np.asarray(v[...], np.float32) for k, v in weights.flat_variables(model).items()}
  state = {}
  for path, a in arrays.items():
    if path.endswith("/kernel"):
      a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    state[weights.torch_key(path)] = torch.tensor(a)
  buf = io.BytesIO()
  torch.save(state, buf)
  return buf.getvalue(), arrays


def publish(monkeypatch, server, name, body, *, filename="small_cnn.pth", **hashes):
  """Serves ``body`` and registers it under ``name`` as a small-CNN checkpoint."""
  server.files["/" + filename] = body
  entry = pretrained.Published("small_cnn", f"{server.url}/{filename}", "test", **hashes)
  monkeypatch.setitem(pretrained.PUBLISHED, name, entry)
  return entry


def requests_for(server, entry):
  return sum(1 for p in server.requests if entry.url.endswith(p))


def test_first_use_downloads_checks_converts_and_caches_then_never_asks_again(
    server, monkeypatch, tmp_path):
  body, arrays = small_checkpoint(seed=1)
  digest = hashlib.sha256(body).hexdigest()
  entry = publish(monkeypatch, server, "small_full", body, filename="a.pth", sha256=digest)
  logged = []
  path = pretrained.resolve("small_full", "small_cnn", cache=str(tmp_path), log=logged.append)
  assert path == tmp_path / "small_full.npz" and requests_for(server, entry) == 1
  assert any(digest in line and "matches" in line for line in logged)
  arch, cached = weights.load_npz(path)
  assert arch == "small_cnn" and cached.keys() == arrays.keys()
  for k in arrays:
    np.testing.assert_array_equal(cached[k], arrays[k])
  source = weights.read_source(path)  # where the weights came from, kept in the file
  assert source == dict(name="small_full", url=entry.url, sha256=digest, bytes=len(body))
  # The model loaded from the name computes what the source weights compute.
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)), jnp.float32)
  want = models.create_backbone("small_cnn", rngs=nnx.Rngs(1))(x)
  got = models.create_backbone("small_cnn", rngs=nnx.Rngs(0), pretrained=path)(x)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Later uses: the cache, no request; the temporary files are gone.
  for _ in range(2):
    assert pretrained.resolve("small_full", "small_cnn", cache=str(tmp_path)) == path
  assert requests_for(server, entry) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == ["small_full.npz"]


def test_a_published_hash_prefix_is_checked(server, monkeypatch, tmp_path):
  body, _ = small_checkpoint(seed=2)
  digest = hashlib.sha256(body).hexdigest()
  publish(monkeypatch, server, "small_prefix", body, filename=f"b-{digest[:8]}.pth",
          hash_prefix=digest[:8])
  assert pretrained.fetch("small_prefix", cache=str(tmp_path)).exists()
  wrong = "0" * 8 if digest[:8] != "0" * 8 else "1" * 8
  entry = publish(monkeypatch, server, "small_bad_prefix", body, filename="c.pth",
                  hash_prefix=wrong)
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.fetch("small_bad_prefix", cache=str(tmp_path))
  msg = str(e.value)
  assert entry.url in msg and digest in msg and f"starting {wrong}" in msg
  assert "python -m msjax.models.convert --arch small_cnn" in msg
  assert "Nothing was cached" in msg
  assert not (tmp_path / "small_bad_prefix.npz").exists()


def test_a_wrong_file_is_refused_and_not_cached(server, monkeypatch, tmp_path):
  body, _ = small_checkpoint(seed=3)
  other, _ = small_checkpoint(seed=4)  # a valid checkpoint, but not the published one
  entry = publish(monkeypatch, server, "small_wrong", other, filename="d.pth",
                  sha256=hashlib.sha256(body).hexdigest())
  with pytest.raises(pretrained.WeightsError, match="SHA-256 is " +
                     hashlib.sha256(other).hexdigest()) as e:
    pretrained.fetch("small_wrong", cache=str(tmp_path))
  assert hashlib.sha256(body).hexdigest() in str(e.value) and entry.url in str(e.value)
  assert list(tmp_path.iterdir()) == []
  # The same with a pinned hash on a name that publishes none.
  publish(monkeypatch, server, "small_unpublished", other, filename="e.pth")
  with pytest.raises(pretrained.WeightsError, match="config.model.pretrained_sha256"):
    pretrained.fetch("small_unpublished", cache=str(tmp_path), pinned="ab" * 32)
  assert list(tmp_path.iterdir()) == []
  # Pinned to the right hash (either case), it is accepted; a cached file is held to a
  # pin set later too, through the hash its download had.
  assert pretrained.fetch("small_unpublished", cache=str(tmp_path),
                          pinned=hashlib.sha256(other).hexdigest().upper()).exists()
  with pytest.raises(pretrained.WeightsError, match="was converted from a download with "
                     f"SHA-256 {hashlib.sha256(other).hexdigest()}, not the pinned "):
    pretrained.fetch("small_unpublished", cache=str(tmp_path), pinned="cd" * 32)


@pytest.mark.parametrize("published", ["sha256", "nothing"])
def test_a_cut_download_never_passes_for_a_complete_one(server, monkeypatch, tmp_path,
                                                        published):
  """A connection dropped before Content-Length, and a file that is itself cut (served
  whole, so only its hash or its own structure can tell): refused at every cut point,
  nothing cached. Without a published hash the checkpoint's own structure is the check."""
  body, _ = small_checkpoint(seed=5)
  hashes = {"sha256": hashlib.sha256(body).hexdigest()} if published == "sha256" else {}
  for i, cut in enumerate((0, 1, len(body) // 3, len(body) // 2, len(body) - 1)):
    publish(monkeypatch, server, "small_cut", body, filename=f"cut{i}.pth", **hashes)
    server.cut[f"/cut{i}.pth"] = cut
    with pytest.raises(pretrained.WeightsError, match=f"stopped at {cut:,} of {len(body):,}"):
      pretrained.fetch("small_cut", cache=str(tmp_path))
    publish(monkeypatch, server, "small_cut", body[:cut], filename=f"short{i}.pth", **hashes)
    with pytest.raises(pretrained.WeightsError,
                       match="SHA-256 is" if hashes else "not a usable small_cnn checkpoint"):
      pretrained.fetch("small_cut", cache=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_offline_names_the_address_the_hash_and_the_manual_commands(monkeypatch, tmp_path):
  import socket
  with socket.socket() as s:  # a port nothing listens on
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  entry = pretrained.Published("small_cnn", f"http://127.0.0.1:{port}/x-1234abcd.pth", "t",
                               hash_prefix="1234abcd")
  monkeypatch.setitem(pretrained.PUBLISHED, "small_offline", entry)
  with pytest.raises(pretrained.WeightsError) as e:
    pretrained.fetch("small_offline", cache=str(tmp_path))
  msg = str(e.value)
  assert "Could not download" in msg and entry.url in msg and "starting 1234abcd" in msg
  assert f"--out {tmp_path / 'small_offline.npz'}" in msg and "sha256sum x-1234abcd.pth" in msg
  assert list(tmp_path.iterdir()) == []


def test_names_paths_and_mistakes(tmp_path):
  assert pretrained.resolve("", "vit_s16") is None
  assert pretrained.resolve("weights/x.npz", "vit_s16") == "weights/x.npz"
  with pytest.raises(pretrained.WeightsError, match="holds vit_s16 weights but "
                     "config.model.backbone='bninception'.*bninception_imagenet"):
    pretrained.resolve("vit_s16_dino", "bninception", cache=str(tmp_path))
  with pytest.raises(pretrained.WeightsError, match="not a published checkpoint"):
    pretrained.fetch("vit_s16_imagenet21k", cache=str(tmp_path))
  # Every published name fits a backbone msjax builds; hashes are what the publishers give.
  for name, p in pretrained.PUBLISHED.items():
    assert p.arch in models.BACKBONES, name
    assert p.url.startswith(("http://", "https://")) and p.url.endswith(".pth"), name
    if p.hash_prefix:  # torch hub's convention: the prefix is in the file name
      assert f"-{p.hash_prefix}." in p.filename, name
    assert not p.sha256 or len(p.sha256) == 64, name


def test_the_cache_directory_setting_and_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "env"))
  assert pretrained.cached_path("vit_s16_dino") == tmp_path / "env" / "vit_s16_dino.npz"
  assert pretrained.cached_path("vit_s16_dino", str(tmp_path / "cfg")).parent == tmp_path / "cfg"
  monkeypatch.delenv(pretrained.CACHE_ENV)
  assert str(pretrained.cache_dir()).endswith(os.path.join(".cache", "msjax", "weights"))


_GCS_FETCH = """
import json, sys
from msjax.models import pretrained, weights
url, digest = sys.argv[1], sys.argv[2]
pretrained.PUBLISHED["small_gcs"] = pretrained.Published("small_cnn", url, "t", sha256=digest)
path = pretrained.fetch("small_gcs", cache="gs://msjax-test/weights", log=lambda s: None)
arch, arrays = weights.load_npz(path)
print(json.dumps({"path": str(path), "arch": arch, "n": len(arrays)}))
"""


def test_a_gcs_cache_is_filled_once(server, fake_gcs):
  body, arrays = small_checkpoint(seed=6)
  server.files["/gcs.pth"] = body
  env = {**os.environ, **fake_gcs}
  args = [sys.executable, "-c", _GCS_FETCH, f"{server.url}/gcs.pth",
          hashlib.sha256(body).hexdigest()]
  for _ in range(2):
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"path": "gs://msjax-test/weights/small_gcs.npz", "arch": "small_cnn",
                   "n": len(arrays)}
  assert server.requests.count("/gcs.pth") == 1


def test_the_list_command(capsys):
  assert pretrained.main(["list"]) == 0
  out = capsys.readouterr().out
  for name, p in pretrained.PUBLISHED.items():
    assert name in out and p.url in out
  assert "starting 52deb4733" in out and "no published hash" in out


def test_training_from_a_name_that_cannot_be_fetched_stops_before_compiling(
    monkeypatch, tmp_path):
  """The entry point prints the download error and exits 1; no workdir is written."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = ("import sys; from msjax.models import pretrained as p; "
            "p.PUBLISHED['small_offline'] = p.Published('small_cnn', "
            f"'http://127.0.0.1:{port}/w-00000000.pth', 't', hash_prefix='00000000'); "
            "from msjax import main; from absl import app; sys.argv = sys.argv[:1] + "
            "sys.argv[2:]; app.run(main.main)")
  workdir = tmp_path / "run"
  done = subprocess.run(
      [sys.executable, "-c", script, "-", "--config", "configs/synthetic.py",
       f"--workdir={workdir}", "--config.model.pretrained=small_offline",
       f"--config.model.weights_cache={tmp_path / 'cache'}"],
      capture_output=True, text=True, timeout=300,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 1, done.stderr[-3000:]
  assert "error: Could not download pretrained weights 'small_offline'" in done.stderr
  assert "python -m msjax.models.convert --arch small_cnn" in done.stderr
  assert "Traceback" not in done.stderr and not workdir.exists()

