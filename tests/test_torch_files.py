"""``msjax.models.torch_files`` against torch itself: every file torch writes (zip and
legacy formats) and every file crafted here in the layouts of older torch releases must
read back bit for bit as ``torch.load(weights_only=True)`` reads it; damaged, foreign and
malicious files must raise ``CheckpointFileError`` and nothing else."""

import collections
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

import torch  # noqa: E402  (a test extra: the oracle)

from msjax.models import torch_files
from msjax.models.torch_files import CheckpointFileError, read_state_dict_bytes

NUMPY_DTYPES = {
    torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16,
    torch.bfloat16: ml_dtypes.bfloat16, torch.int64: np.int64, torch.int32: np.int32,
    torch.int16: np.int16, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_,
    torch.uint16: np.uint16, torch.complex64: np.complex64,
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
}
DAMAGED = re.compile(r"truncated|not a checkpoint")


def _saved(obj, zip_format=True) -> bytes:
  buf = io.BytesIO()
  torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
  return buf.getvalue()


def _torch_load(data: bytes):
  return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _assert_same(arrays, tensors):
  """Same keys in the same order, dtypes, shapes and bytes."""
  assert list(arrays) == list(tensors)
  for key, t in tensors.items():
    a = arrays[key]
    assert isinstance(a, np.ndarray), key
    assert a.dtype == NUMPY_DTYPES[t.dtype], (key, a.dtype, t.dtype)
    assert a.shape == tuple(t.shape), (key, a.shape, t.shape)
    t = t.detach().resolve_conj().resolve_neg().contiguous()
    assert a.tobytes() == t.reshape(-1).view(torch.uint8).numpy().tobytes(), key


def _module_state_dict():
  torch.manual_seed(0)
  net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
                            torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 2))
  net(torch.randn(2, 3, 6, 6))  # train mode: running stats and num_batches_tracked move
  return net.state_dict()


def _varied_state_dict():
  torch.manual_seed(1)
  base = torch.randn(5, 6)
  attributed = torch.randn(2)
  attributed.note = "kept out"  # pickled through _rebuild_from_type_v2
  return {
      **_module_state_dict(),
      "f64": torch.randn(2, 3, dtype=torch.float64),
      "f16": torch.randn(3).half(),
      "bf16": torch.randn(2, 2).bfloat16(),
      "i64": torch.tensor([-(2 ** 40), 7]),
      "i32": torch.tensor([-3, 5], dtype=torch.int32),
      "i16": torch.tensor([-3, 5], dtype=torch.int16),
      "i8": torch.tensor([-3, 5], dtype=torch.int8),
      "u8": torch.arange(250, 256, dtype=torch.uint8),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(3.5),
      "scalar_long": torch.tensor(11),
      "empty": torch.empty(0, 3),
      "base": base,
      "transposed": base.t(),                # strides (1, 6)
      "sliced": base[1:4, 2:5:2],            # offset 8, strides (6, 2)
      "flat_tail": base.view(-1)[7:],        # offset 7 into the same storage
      "param": torch.nn.Parameter(torch.randn(3)),
      "attributed": attributed,
      "complex_conj": torch.randn(3, dtype=torch.complex64).conj(),  # conj bit
      "neg_view": torch.randn(3)._neg_view(),                        # neg bit
  }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_round_trip(zip_format):
  tensors = _varied_state_dict()
  data = _saved(tensors, zip_format)
  arrays = read_state_dict_bytes(data)
  _assert_same(arrays, _torch_load(data))
  assert arrays["1.num_batches_tracked"].dtype == np.int64
  # Views of one storage come back as arrays of their own.
  assert arrays["sliced"].flags.c_contiguous and arrays["sliced"].flags.writeable
  for a, b in [("base", "transposed"), ("base", "sliced"), ("base", "flat_tail")]:
    assert not np.shares_memory(arrays[a], arrays[b])
  arrays["base"][:] = 0
  np.testing.assert_array_equal(arrays["sliced"], tensors["sliced"].numpy())


def test_dtypes_that_only_the_zip_format_keeps():
  # uint16 and float8 pickle as UntypedStorage + a torch.<dtype> (_rebuild_tensor_v3).
  tensors = {"u16": torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),
             "f8": torch.randn(4).to(torch.float8_e4m3fn)}
  data = _saved(tensors)
  _assert_same(read_state_dict_bytes(data), _torch_load(data))
  # torch's own legacy loader cannot read these back; msjax's reads what was written.
  _assert_same(read_state_dict_bytes(_saved(tensors, zip_format=False)), tensors)


def test_read_state_dict_from_a_path(tmp_path):
  tensors = _module_state_dict()
  path = tmp_path / "weights.bin"  # the extension says nothing; the content decides
  torch.save(tensors, path)
  _assert_same(torch_files.read_state_dict(path), tensors)
  _assert_same(torch_files.read_state_dict(str(path)), tensors)
  with pytest.raises(CheckpointFileError, match="missing.pth"):
    torch_files.read_state_dict(tmp_path / "missing.pth")


# ------------------------------------------------------------- crafted torch files

class _Storage:
  """A storage in a crafted pickle: pickled as the persistent id torch would write."""

  def __init__(self, key, storage_type, numel, view=None):
    self.key, self.storage_type, self.numel, self.view = key, storage_type, numel, view


class _Call:
  """Pickles as ``func(*args)``: how torch pickles its tensors (and how an attacker
  pickles anything)."""

  def __init__(self, func, *args):
    self.func, self.args = func, args

  def __reduce__(self):
    return self.func, self.args


def _pickle(obj, legacy):
  class Pickler(pickle.Pickler):
    def persistent_id(self, o):
      if not isinstance(o, _Storage):
        return None
      if legacy:
        return ("storage", o.storage_type, o.key, "cuda:0", o.numel, o.view)
      return ("storage", o.storage_type, o.key, "cpu", o.numel)
  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def _zip_file(obj, storages: dict[str, bytes], byteorder=b"little", pkl=None) -> bytes:
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as z:
    z.writestr("archive/data.pkl", pkl if pkl is not None else _pickle(obj, legacy=False))
    z.writestr("archive/byteorder", byteorder)
    for key, raw in storages.items():
      z.writestr(f"archive/data/{key}", raw)
    z.writestr("archive/version", b"3\n")
  return buf.getvalue()


def _legacy_file(obj, storages: dict[str, tuple[int, bytes]]) -> bytes:
  """torch's legacy layout, as torch 0.x wrote it from Python 2 and a GPU."""
  parts = [pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2), pickle.dumps(1001, protocol=2),
           pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2),
           _pickle(obj, legacy=True), pickle.dumps(sorted(storages), protocol=2)]
  for key in sorted(storages):
    numel, raw = storages[key]
    parts += [struct.pack("<q", numel), raw]
  return b"".join(parts)


def test_legacy_file_of_old_torch():
  """``_rebuild_tensor`` (torch 0.3), ``torch.cuda.FloatStorage``, and a storage that is
  a view of another (torch < 1.0), as in checkpoints published in 2017."""
  root = np.arange(10, dtype=np.float32)
  view = _Storage("7", torch.cuda.FloatStorage, 10, view=("8", 2, 6))  # root[2:8]
  obj = collections.OrderedDict([
      ("conv.weight", _Call(torch._utils._rebuild_tensor,
                            _Storage("7", torch.cuda.FloatStorage, 10), 1, (2, 3), (3, 1))),
      ("viewed", _Call(torch._utils._rebuild_tensor, view, 1, (2, 2), (1, 2))),
      ("count", _Call(torch._utils._rebuild_tensor,
                      _Storage("9", torch.cuda.LongStorage, 1), 0, (), ())),
  ])
  data = _legacy_file(obj, {"7": (10, root.tobytes()), "9": (1, np.int64(5).tobytes())})
  arrays = read_state_dict_bytes(data)
  _assert_same(arrays, _torch_load(data))
  np.testing.assert_array_equal(arrays["viewed"], [[3, 5], [4, 6]])
  # The element count before a storage's bytes must be the one its pickle declares.
  wrong = _legacy_file(obj, {"7": (9, root.tobytes()), "9": (1, np.int64(5).tobytes())})
  with pytest.raises(CheckpointFileError, match="holds 9 elements on file, 10 in its"):
    read_state_dict_bytes(wrong)


def test_big_endian_zip_file():
  values = np.array([[1.5, -2.0, 3.25]], dtype=np.float32)
  obj = {"w": _Call(torch._utils._rebuild_tensor_v2, _Storage("0", torch.FloatStorage, 3),
                    0, (1, 3), (3, 1), False, collections.OrderedDict())}
  data = _zip_file(obj, {"0": values.astype(">f4").tobytes()}, byteorder=b"big")
  arrays = read_state_dict_bytes(data)
  _assert_same(arrays, _torch_load(data))
  np.testing.assert_array_equal(arrays["w"], values)


def _tensor(storage, offset, size, stride):
  return _Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False,
               collections.OrderedDict())


def test_tensors_beyond_their_storage_are_refused():
  four = np.zeros(4, np.float32).tobytes()
  past_end = {"w": _tensor(_Storage("0", torch.FloatStorage, 4), 1, (4,), (1,))}
  with pytest.raises(CheckpointFileError, match="reaches past the end"):
    read_state_dict_bytes(_zip_file(past_end, {"0": four}))
  # A storage record shorter than the element count its persistent id declares.
  short = {"w": _tensor(_Storage("0", torch.FloatStorage, 8), 0, (2,), (1,))}
  with pytest.raises(CheckpointFileError, match="declares 32 bytes"):
    read_state_dict_bytes(_zip_file(short, {"0": four}))
  # Stride 0 repeats one element: a tiny file must not ask for terabytes.
  repeated = {"w": _tensor(_Storage("0", torch.FloatStorage, 4), 0, (10 ** 12,), (0,))}
  with pytest.raises(CheckpointFileError, match="far larger than the file"):
    read_state_dict_bytes(_zip_file(repeated, {"0": four}))


# ---------------------------------------------------------------------- safetensors

def _safetensors(header: dict, body: bytes) -> bytes:
  import json
  text = json.dumps(header).encode()
  return struct.pack("<Q", len(text)) + text + body


def test_hand_written_safetensors():
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  bf = np.array([1.0, -2.5], dtype=ml_dtypes.bfloat16)
  mask = np.array([True, False])
  count = np.array(9, dtype=np.int64)
  body = w.tobytes() + bf.tobytes() + mask.tobytes() + count.tobytes()
  header = {"__metadata__": {"format": "pt"},
            "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "bf": {"dtype": "BF16", "shape": [2], "data_offsets": [24, 28]},
            "mask": {"dtype": "BOOL", "shape": [2], "data_offsets": [28, 30]},
            "count": {"dtype": "I64", "shape": [], "data_offsets": [30, 38]},
            "none": {"dtype": "U8", "shape": [0, 4], "data_offsets": [38, 38]}}
  arrays = read_state_dict_bytes(_safetensors(header, body))
  assert list(arrays) == ["w", "bf", "mask", "count", "none"]
  for key, want in [("w", w), ("bf", bf), ("mask", mask), ("count", count),
                    ("none", np.zeros((0, 4), np.uint8))]:
    assert arrays[key].dtype == want.dtype and arrays[key].shape == want.shape, key
    assert arrays[key].tobytes() == want.tobytes(), key
  bad = dict(header, w={"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]})
  with pytest.raises(CheckpointFileError, match="spans 20 bytes"):
    read_state_dict_bytes(_safetensors(bad, body))


def test_safetensors_package_files(tmp_path):
  st_numpy = pytest.importorskip("safetensors.numpy")
  st_torch = pytest.importorskip("safetensors.torch")
  arrays = {"a": np.random.default_rng(0).normal(size=(3, 4)).astype(np.float16),
            "b": np.arange(5, dtype=np.int32), "c": np.array([True, False])}
  st_numpy.save_file(arrays, tmp_path / "a.safetensors")
  got = torch_files.read_state_dict(tmp_path / "a.safetensors")
  for key, want in arrays.items():
    assert got[key].dtype == want.dtype and got[key].tobytes() == want.tobytes()
  tensors = {**_module_state_dict(), "bf16": torch.randn(4, 2).bfloat16(),
             "f64": torch.randn(2, dtype=torch.float64), "i8": torch.tensor([-1, 2],
                                                                         dtype=torch.int8)}
  st_torch.save_file(tensors, tmp_path / "t.safetensors")
  got = torch_files.read_state_dict(tmp_path / "t.safetensors")
  _assert_same({k: got[k] for k in tensors}, tensors)


# ------------------------------------------------------------------------- wrappers

def test_wrappers_and_prefixes():
  sd = _module_state_dict()
  keys = list(sd)
  read = lambda obj: read_state_dict_bytes(_saved(obj))  # noqa: E731

  assert list(read({"state_dict": sd, "epoch": 3, "arch": "net"})) == keys
  assert list(read({"model": sd, "optimizer": {"lr": 0.1}})) == keys
  # The PyTorch ImageNet example saves its best accuracy as a tensor beside the weights.
  assert list(read({"state_dict": sd, "best_acc1": torch.tensor(0.7), "epoch": 3})) == keys
  module = {f"module.{k}": v for k, v in sd.items()}
  assert list(read(module)) == keys
  assert list(read({"state_dict": module})) == keys
  # Not every key is prefixed: nothing is stripped.
  mixed = {"module.a": torch.ones(1), "b": torch.ones(1)}
  assert list(read(mixed)) == ["module.a", "b"]
  # Values that are not tensors are left out of a state dict.
  got = read({"w": torch.ones(2), "note": "x", "nested": {"v": torch.ones(1)}, "n": 3})
  assert list(got) == ["w"]


def test_dino_checkpoints():
  backbone = {"cls_token": torch.randn(1, 1, 4), "blocks.0.norm1.weight": torch.randn(4)}
  student = {f"module.backbone.{k}": v + 1 for k, v in backbone.items()}
  teacher = {f"backbone.{k}": v for k, v in backbone.items()}
  head = {"head.mlp.0.weight": torch.randn(2, 4), "head.last_layer.weight_g": torch.ones(2)}
  import argparse
  args = argparse.Namespace(arch="vit_small", lr=5e-4)
  # The released backbone-only file (DINO's teacher, keys prefixed by hand here).
  _assert_same(read_state_dict_bytes(_saved({f"module.backbone.{k}": v
                                             for k, v in backbone.items()})), backbone)
  # A full training checkpoint: "teacher" wins over "student", the projection head
  # beside the backbone is dropped, and the pickled argparse.Namespace is harmless.
  full = {"student": {**student, **{f"module.{k}": v for k, v in head.items()}},
          "teacher": {**teacher, **head}, "optimizer": {"state": {}}, "epoch": 100,
          "args": args, "dino_loss": {"center": torch.zeros(1, 2)}}
  for zip_format in (True, False):
    _assert_same(read_state_dict_bytes(_saved(full, zip_format)), backbone)
  _assert_same(read_state_dict_bytes(_saved({"teacher": {f"module.backbone.{k}": v for k, v
                                                         in backbone.items()}})), backbone)


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_files_without_a_state_dict():
  with pytest.raises(CheckpointFileError, match=r"no arrays.*\['epoch', 'args'\]"):
    read_state_dict_bytes(_saved({"epoch": 3, "args": {"lr": 0.1}}), name="run.pth")
  with pytest.raises(CheckpointFileError, match="run.pth: holds a tensor, not a state dict"):
    read_state_dict_bytes(_saved(torch.ones(2)), name="run.pth")
  with pytest.raises(CheckpointFileError, match="holds no arrays"):
    read_state_dict_bytes(_saved({}))
  with pytest.raises(CheckpointFileError, match="refuses to load the global "
                                                r"torch\.nn\.modules\.container\.Sequential"):
    read_state_dict_bytes(_saved(torch.nn.Sequential(torch.nn.Linear(2, 2))))
  with pytest.raises(CheckpointFileError, match="TorchScript"):
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
    read_state_dict_bytes(buf.getvalue())
  with pytest.raises(CheckpointFileError, match="not a torch.save checkpoint"):
    buf = io.BytesIO()
    np.savez(buf, w=np.ones(2))  # an .npz is a zip too
    read_state_dict_bytes(buf.getvalue())
  with pytest.raises(CheckpointFileError, match="tar archive"):
    read_state_dict_bytes(b"storages" + bytes(249) + b"ustar\x0000" + bytes(300))
  with pytest.raises(CheckpointFileError, match="not a checkpoint"):
    read_state_dict_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))


# ------------------------------------------------------------------ damaged files

def _small_files():
  sd = {"a": torch.randn(3, 2), "b": torch.tensor([1, 2]), "e": torch.empty(0)}
  st = _safetensors({"a": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 24]},
                     "b": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}},
                    sd["a"].numpy().tobytes() + sd["b"].numpy().tobytes())
  return {"zip": _saved(sd), "legacy": _saved(sd, zip_format=False), "safetensors": st}


@pytest.mark.parametrize("fmt", ["zip", "legacy", "safetensors"])
def test_every_truncation_is_refused(fmt):
  data = _small_files()[fmt]
  assert read_state_dict_bytes(data)  # the whole file reads
  for cut in range(len(data)):  # every prefix, the last bytes included
    with pytest.raises(CheckpointFileError, match=DAMAGED) as info:
      read_state_dict_bytes(data[:cut], name=f"cut{cut}")
    assert f"cut{cut}" in str(info.value)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_changed_storage_bytes_are_caught_or_read_as_written(fmt):
  data = _small_files()[fmt]
  # The last storage's first byte: a zip's CRC catches it; the legacy format has no
  # checksum, so the changed value reads as written, with nothing else moved.
  pos = data.rfind(np.int64(1).tobytes() + np.int64(2).tobytes())
  damaged = data[:pos] + b"\x05" + data[pos + 1:]
  if fmt == "zip":
    with pytest.raises(CheckpointFileError, match="CRC"):
      read_state_dict_bytes(damaged)
  else:
    np.testing.assert_array_equal(read_state_dict_bytes(damaged)["b"], [5, 2])


def test_foreign_bytes_are_refused():
  rng = np.random.default_rng(0)
  with pytest.raises(CheckpointFileError, match="is empty"):
    read_state_dict_bytes(b"", name="empty.pth")
  for _ in range(20):
    noise = rng.bytes(int(rng.integers(1, 4000)))
    with pytest.raises(CheckpointFileError, match=DAMAGED):
      read_state_dict_bytes(noise)
    for magic in (b"PK\x03\x04", b"\x80\x02"):  # noise behind each format's magic bytes
      with pytest.raises(CheckpointFileError):
        read_state_dict_bytes(magic + noise)


# ----------------------------------------------------------------------- malicious

@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "builtins.exec"])
def test_malicious_pickles_are_refused(tmp_path, fmt, target):
  marker = tmp_path / "pwned"
  command = f"touch {marker}"
  func = {"os.system": os.system, "builtins.eval": eval, "builtins.exec": exec}[target]
  arg = command if func is os.system else f"__import__('os').system({command!r})"
  weights = {"w": _tensor(_Storage("0", torch.FloatStorage, 2), 0, (2,), (1,))}
  raw = np.ones(2, np.float32).tobytes()
  make = {"zip": lambda obj: _zip_file(obj, {"0": raw}),
          "legacy": lambda obj: _legacy_file(obj, {"0": (2, raw)})}[fmt]
  np.testing.assert_array_equal(read_state_dict_bytes(make(weights))["w"], [1, 1])
  # os.system pickles as posix.system; protocol 2 names builtins __builtin__.
  module = "(os|posix)" if func is os.system else "builtins"
  for obj in ({**weights, "x": _Call(func, arg)}, _Call(func, arg),
              {"state_dict": weights, "args": [_Call(func, arg)]}):
    with pytest.raises(CheckpointFileError,
                       match=rf"refuses to load the global {module}\.{target.split('.')[1]}"):
      read_state_dict_bytes(make(obj))
    assert not marker.exists()
  _Call(func, arg).__reduce__()[0](arg)  # the payload itself does work
  assert marker.exists()


def test_reading_never_imports_torch(tmp_path, fake_gcs):
  """The module is loaded from its file in a fresh interpreter where torch cannot be
  imported, as on a TPU VM, and reads local and gs:// files."""
  torch.save({"w": torch.arange(3.0)}, tmp_path / "w.pth")
  torch.save({"w": torch.arange(3.0)}, tmp_path / "legacy.pth",
             _use_new_zipfile_serialization=False)
  script = f"""
import importlib.util, sys
sys.modules["torch"] = None  # any import of torch now fails
spec = importlib.util.spec_from_file_location("tf", {torch_files.__file__!r})
tf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tf)
from etils import epath
local = epath.Path({str(tmp_path)!r})
remote = epath.Path("gs://msjax-test/weights/legacy.pth")
remote.write_bytes((local / "legacy.pth").read_bytes())
for path in (local / "w.pth", str(local / "legacy.pth"), str(remote)):
  print(tf.read_state_dict(path)["w"].tolist())
try:
  tf.read_state_dict("gs://msjax-test/weights/missing.pth")
except tf.CheckpointFileError as e:
  print(e)
"""
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={**os.environ, **fake_gcs})
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[:3] == ["[0.0, 1.0, 2.0]"] * 3
  assert lines[3].startswith("gs://msjax-test/weights/missing.pth: cannot be read")
