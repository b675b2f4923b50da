"""Reads PyTorch checkpoint files into ``{key: numpy array}`` without importing torch.

Three formats are recognised by their content, whatever the file is called:

- torch's zip format (``torch.save`` since 1.6): ``<prefix>/data.pkl`` is a pickle whose
  tensors point, through persistent ids, at raw storages ``<prefix>/data/<key>``.
- torch's legacy format (``torch.save`` before 1.6, or with
  ``_use_new_zipfile_serialization=False``): a magic-number pickle, the protocol version,
  system info, the object pickle, the list of storage keys, then each storage's bytes
  after an int64 element count.
- safetensors: an 8-byte header length, a JSON header, then the tensors' bytes.

A checkpoint is untrusted data: its pickles are read by an unpickler that knows only the
globals a state dict needs (torch's tensor rebuild functions, storage classes and dtypes,
``collections.OrderedDict``, and a few inert builtins) and refuses any other global
without importing it. Tensors come back as NumPy arrays with their stored dtype
(``bfloat16`` and ``float8`` through ``ml_dtypes``), shape and strides, each a copy of
its own. A file that is truncated, corrupt or not a checkpoint raises
``CheckpointFileError``; nothing is returned from a file that does not check out.

``read_state_dict`` returns the flat tensor dict. A training checkpoint whose top level
is not all tensors is unwrapped: its ``"teacher"`` (DINO), else ``"state_dict"``, else
``"model"``. A ``module.`` (DistributedDataParallel) prefix shared by every key is
dropped, then a ``backbone.`` one (DINO); a DINO teacher's projection head (``head.``,
beside ``backbone.``) is dropped with it. Values that are not tensors (an ``epoch``, a
nested dict) are left out.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np


class CheckpointFileError(ValueError):
  """A file that is not a readable checkpoint; the message names it and what is wrong."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of the checkpoint at ``path`` (local or ``gs://``), by state-dict key."""
  from etils import epath
  try:
    data = epath.Path(path).read_bytes()
  except OSError as e:
    raise CheckpointFileError(f"{path}: cannot be read: {e}") from e
  return read_state_dict_bytes(data, name=os.fspath(path))


def read_state_dict_bytes(data: bytes, name: str = "checkpoint") -> dict[str, np.ndarray]:
  """The tensors of a checkpoint held in ``data``; ``name`` is used in error messages."""
  data = bytes(data)
  obj, materialize = _load(data, name)
  state = _select_state_dict(obj, name)
  arrays = {}
  budget = _Budget(data, name)
  for key, tensor in state.items():
    arrays[key] = materialize(tensor, key, budget)
  return arrays


# ---------------------------------------------------------------------------- dtypes

# Legacy storage classes (``torch.FloatStorage``) and the dtype each stores.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}

# ``torch.<name>`` dtype objects, as pickled (``torch.float32``); aliases included.
_TORCH_DTYPES = {
    "float64": np.float64, "double": np.float64,
    "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32,
    "int16": np.int16, "short": np.int16,
    "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
    "bool": np.bool_,
    "complex64": np.complex64, "cfloat": np.complex64,
    "complex128": np.complex128, "cdouble": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "float8_e8m0fnu": ml_dtypes.float8_e8m0fnu,
}
_TORCH_DTYPES = {k: np.dtype(v) for k, v in _TORCH_DTYPES.items()}

_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
    "BOOL": np.bool_, "C64": np.complex64,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_SAFETENSORS_DTYPES = {k: np.dtype(v) for k, v in _SAFETENSORS_DTYPES.items()}

# Storage types whose dtype numpy cannot hold: named in the error rather than misread.
_UNSUPPORTED_STORAGES = ("QInt8Storage", "QInt32Storage", "QUInt8Storage",
                         "QUInt4x2Storage", "QUInt2x4Storage")


# ------------------------------------------------------------- unpickled stand-ins

class _Inert:
  """Base of the unpickler's stand-ins: a pickle may not set their attributes."""
  __slots__ = ()

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"cannot set the state of {type(self).__name__}")


class _StorageType(_Inert):
  """A storage class (``torch.FloatStorage``; ``UntypedStorage`` holds bytes)."""
  __slots__ = ("dtype",)

  def __init__(self, dtype):
    self.dtype = dtype


class _DType(_Inert):
  """A ``torch.<dtype>`` object."""
  __slots__ = ("dtype",)

  def __init__(self, dtype):
    self.dtype = dtype


class _Storage(_Inert):
  """A storage a persistent id names: ``numel`` elements of ``dtype`` starting
  ``start`` bytes into the raw record ``key`` (legacy views start past 0)."""
  __slots__ = ("key", "dtype", "numel", "start")

  def __init__(self, key, dtype, numel, start=0):
    self.key, self.dtype, self.numel, self.start = key, dtype, numel, start

  @property
  def nbytes(self):
    return self.numel * self.dtype.itemsize


class _Tensor(_Inert):
  """A tensor to be read once the storages are: a strided view of ``storage``."""
  __slots__ = ("storage", "offset", "size", "stride", "dtype", "neg", "conj")

  def __init__(self, storage, offset, size, stride, dtype, metadata=None):
    if not isinstance(storage, _Storage):
      raise pickle.UnpicklingError(f"a tensor's storage is a {type(storage).__name__}")
    self.storage = storage
    self.offset = _int(offset, "storage offset")
    self.size = _ints(size, "size")
    self.stride = _ints(stride, "stride")
    if len(self.size) != len(self.stride):
      raise pickle.UnpicklingError(f"size {self.size} and stride {self.stride} differ in "
                                   "length")
    self.dtype = dtype
    # torch's lazy negation and conjugation bits (``_neg_view``, ``conj()``): the storage
    # holds the values before them.
    metadata = metadata or {}
    if not isinstance(metadata, dict):
      raise pickle.UnpicklingError(f"tensor metadata is a {type(metadata).__name__}")
    self.neg = bool(metadata.get("neg", False))
    self.conj = bool(metadata.get("conj", False))


def _int(value, what):
  if type(value) is not int or value < 0:  # bool is excluded too
    raise pickle.UnpicklingError(f"a tensor's {what} is {value!r}")
  return value


def _ints(values, what):
  if not isinstance(values, (tuple, list)):
    raise pickle.UnpicklingError(f"a tensor's {what} is {values!r}")
  return tuple(_int(v, what) for v in values)


class _OrderedDict(dict):
  """``collections.OrderedDict``: a plain dict (torch pickles state dicts as these,
  with their ``_metadata`` attribute as state, which is dropped)."""

  def __setstate__(self, state):
    pass


class _Namespace(_Inert):
  """``argparse.Namespace``, kept as its attribute dict: DINO's training checkpoints
  save their arguments as one, beside the ``teacher`` weights."""
  __slots__ = ("attrs",)

  def __setstate__(self, state):
    self.attrs = state


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _Tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, metadata=None):
  return _Tensor(storage, storage_offset, size, stride, None, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  if not isinstance(dtype, _DType):
    raise pickle.UnpicklingError(f"_rebuild_tensor_v3 got dtype {dtype!r}")
  return _Tensor(storage, storage_offset, size, stride, dtype.dtype, metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
  if not isinstance(data, _Tensor):
    raise pickle.UnpicklingError(f"a parameter's data is a {type(data).__name__}")
  return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
  return _rebuild_parameter(data, requires_grad, backward_hooks)


_REBUILDS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3)
_TENSOR_TYPES = ("torch.Tensor", "torch._tensor.Tensor", "torch.nn.parameter.Parameter")


def _rebuild_from_type_v2(func, new_type, args, state):
  """A tensor with Python attributes: rebuilt by ``func``; type and attributes dropped."""
  if func not in _REBUILDS or new_type not in _TENSOR_TYPES or not isinstance(args, tuple):
    raise pickle.UnpicklingError("_rebuild_from_type_v2 of an unsupported tensor type")
  return func(*args)


def _encode(text, encoding):
  # Protocol 2 pickles ``bytes`` as ``_codecs.encode(text, "latin1")``.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError("_codecs.encode is allowed only for latin-1 bytes")
  return text.encode("latin-1")


def _device(*args):
  return ":".join(str(a) for a in args)


def _allowed_globals():
  found = {
      ("collections", "OrderedDict"): _OrderedDict,
      ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
      ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
      ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
      ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
      ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
      ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
      ("torch.storage", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
      ("torch", "UntypedStorage"): _StorageType(np.dtype(np.uint8)),
      ("torch", "Size"): tuple,
      ("torch", "device"): _device,
      ("argparse", "Namespace"): _Namespace,
      ("_codecs", "encode"): _encode,
      ("builtins", "set"): set,
      ("builtins", "frozenset"): frozenset,
      ("builtins", "complex"): complex,
  }
  for name in _TENSOR_TYPES:  # only as _rebuild_from_type_v2's type argument
    module, _, attr = name.rpartition(".")
    found[module, attr] = name
  for name, dtype in _STORAGE_DTYPES.items():
    # Files saved from a GPU before torch 1.0 name ``torch.cuda.FloatStorage``.
    found["torch", name] = found["torch.cuda", name] = _StorageType(dtype)
  for name, dtype in _TORCH_DTYPES.items():
    found["torch", name] = _DType(dtype)
  return found


_GLOBALS = _allowed_globals()
# Python 2 pickles name the builtins module ``__builtin__``.
_RENAMED_MODULES = {"__builtin__": "builtins"}


class _Unpickler(pickle.Unpickler):
  """Knows only ``_GLOBALS``; hands persistent ids to ``persistent``."""

  def __init__(self, file, name, persistent=None):
    super().__init__(file, encoding="utf-8")
    self._name = name
    self._persistent = persistent

  def find_class(self, module, name):
    module = _RENAMED_MODULES.get(module, module)
    found = _GLOBALS.get((module, name))
    if found is not None:
      return found
    if module in ("torch", "torch.cuda") and name in _UNSUPPORTED_STORAGES:
      raise CheckpointFileError(f"{self._name}: holds quantized tensors ({module}.{name}), "
                                "which cannot be read without torch")
    raise CheckpointFileError(
        f"{self._name}: refuses to load the global {module}.{name}: a state-dict "
        "checkpoint needs only tensors and plain containers (a pickled nn.Module, "
        "optimizer or other Python object cannot be read safely; save its "
        "state_dict() instead)")

  def persistent_load(self, pid):
    if self._persistent is None:
      raise pickle.UnpicklingError("unexpected persistent id")
    return self._persistent(pid)


def _unpickle(file, name, persistent=None):
  return _Unpickler(file, name, persistent).load()


def _storage_type(pid_type):
  if not isinstance(pid_type, _StorageType):
    raise pickle.UnpicklingError(f"a storage's type is {pid_type!r}")
  return pid_type.dtype


def _text(value):
  return value.decode("ascii") if isinstance(value, bytes) else value


# ----------------------------------------------------------------------- formats

def _load(data: bytes, name: str):
  """(The unpickled object with ``_Tensor`` leaves, a function that reads one.)"""
  if not data:
    raise CheckpointFileError(f"{name}: is empty, not a checkpoint")
  if data[:4] == b"PK\x03\x04":
    return _guarded(_load_zip, data, name, "torch zip checkpoint")
  if _is_safetensors(data):
    return _guarded(_load_safetensors, data, name, "safetensors file")
  if data[:1] == b"\x80":  # a pickle's protocol opcode
    return _guarded(_load_legacy, data, name, "legacy torch checkpoint")
  if data[257:262] == b"ustar":
    raise CheckpointFileError(
        f"{name}: is a tar archive, torch's format before 0.1.10, which cannot be read "
        "without torch; load it with torch and save it again")
  raise CheckpointFileError(
      f"{name}: is truncated or not a checkpoint: it starts with {data[:8]!r}, which "
      "is neither torch's zip or legacy format nor safetensors")


def _guarded(load, data, name, kind):
  try:
    return load(data, name)
  except CheckpointFileError:
    raise
  except Exception as e:  # whatever a damaged file makes the parsers raise
    raise CheckpointFileError(
        f"{name}: is truncated or corrupt, not a readable {kind} "
        f"({type(e).__name__}: {e})") from e


def _load_zip(data: bytes, name: str):
  archive = zipfile.ZipFile(io.BytesIO(data))
  names = archive.namelist()
  pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    found = "no" if not pickles else f"{len(pickles)}"
    raise CheckpointFileError(
        f"{name}: is a zip archive with {found} <prefix>/data.pkl records, not a "
        f"torch.save checkpoint (it holds {names[:5]})")
  prefix = pickles[0][:-len("data.pkl")]
  if prefix + "constants.pkl" in names:
    raise CheckpointFileError(
        f"{name}: is a TorchScript archive (torch.jit.save), not a state dict; save "
        "the model's state_dict() with torch.save instead")
  limit = 8 * len(data) + (1 << 20)

  def record(key):
    try:
      info = archive.getinfo(key)
    except KeyError:
      raise CheckpointFileError(f"{name}: lacks the record {key}") from None
    if info.file_size > limit:  # a compressed record cannot expand without bound
      raise CheckpointFileError(f"{name}: record {key} declares {info.file_size} bytes")
    try:
      return archive.read(info)
    except Exception as e:  # a bad CRC, a cut or garbled record
      raise CheckpointFileError(f"{name}: is truncated or corrupt: record {key} cannot "
                                f"be read ({type(e).__name__}: {e})") from e

  byteorder = b"little"
  if prefix + "byteorder" in names:
    byteorder = record(prefix + "byteorder").strip()
    if byteorder not in (b"little", b"big"):
      raise CheckpointFileError(f"{name}: has an unknown byte order {byteorder!r}")

  storages = {}

  def persistent(pid):
    if not isinstance(pid, tuple) or len(pid) != 5 or _text(pid[0]) != "storage":
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel = pid
    dtype = _storage_type(storage_type)
    key = _text(key)
    if not isinstance(key, str):
      raise pickle.UnpicklingError(f"a storage key is {key!r}")
    numel = _int(numel, "storage size")
    # Every tensor viewing one storage shares its _Storage (torch saves one dtype each).
    if key not in storages:
      storages[key] = _Storage(key, dtype, numel)
    return storages[key]

  obj = _unpickle(io.BytesIO(record(prefix + "data.pkl")), name, persistent)
  blobs = {}

  def storage_bytes(storage: _Storage) -> memoryview:
    if storage.key not in blobs:
      blobs[storage.key] = memoryview(record(f"{prefix}data/{storage.key}"))
    return blobs[storage.key]

  return obj, _materializer(name, storage_bytes, swap=byteorder == b"big")


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001


def _load_legacy(data: bytes, name: str):
  f = io.BytesIO(data)
  try:
    magic = _unpickle(f, name)
  except CheckpointFileError:
    raise
  except Exception:
    magic = None
  if magic != _LEGACY_MAGIC:
    raise CheckpointFileError(
        f"{name}: is truncated or not a checkpoint: a pickle without torch's magic "
        "number (a plain pickle is not a torch.save file)")
  protocol = _unpickle(f, name)
  if protocol != _LEGACY_PROTOCOL:
    raise CheckpointFileError(f"{name}: has legacy protocol version {protocol!r}, not "
                              f"{_LEGACY_PROTOCOL}")
  _unpickle(f, name)  # system info: the data is little-endian whatever it says

  roots, views = {}, {}

  def persistent(pid):
    if not isinstance(pid, tuple) or not pid:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    if _text(pid[0]) == "module":
      raise CheckpointFileError(f"{name}: holds a pickled nn.Module, not a state dict; "
                                "save the model's state_dict() instead")
    if _text(pid[0]) != "storage" or len(pid) != 6:
      raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
    _, storage_type, key, _location, numel, view = pid
    key = _text(key)
    if not isinstance(key, str):
      raise pickle.UnpicklingError(f"a storage key is {key!r}")
    if key not in roots:  # the first reference decides the element size on file
      roots[key] = _Storage(key, _storage_type(storage_type), _int(numel, "storage size"))
    root = roots[key]
    if view is None:
      return root
    # Before torch 1.0 a storage could be a slice of another: (key, offset, size).
    view_key, offset, size = view
    if view_key not in views:
      start = root.start + _int(offset, "storage view offset") * root.dtype.itemsize
      views[view_key] = _Storage(key, root.dtype, _int(size, "storage view size"), start)
    return views[view_key]

  obj = _unpickle(f, name, persistent)
  keys = _unpickle(f, name)
  if not isinstance(keys, list):
    raise CheckpointFileError(f"{name}: its storage key list is a {type(keys).__name__}")
  pos = f.tell()
  whole = memoryview(data)
  blobs = {}
  for key in keys:
    key = _text(key)
    if key not in roots:
      raise CheckpointFileError(f"{name}: lists storage {key!r}, which no tensor uses")
    root = roots[key]
    if pos + 8 > len(data):
      raise CheckpointFileError(f"{name}: is truncated: storage {key} is cut off")
    (numel,) = struct.unpack_from("<q", data, pos)
    if numel != root.numel:
      raise CheckpointFileError(f"{name}: storage {key} holds {numel} elements on file, "
                                f"{root.numel} in its pickle: the file is corrupt")
    end = pos + 8 + root.nbytes
    if end > len(data):
      raise CheckpointFileError(f"{name}: is truncated: storage {key} needs bytes "
                                f"{pos + 8}..{end}, the file has {len(data)}")
    blobs[key] = whole[pos + 8:end]
    pos = end

  def storage_bytes(storage: _Storage) -> memoryview:
    if storage.key not in blobs:
      raise CheckpointFileError(f"{name}: lacks the data of storage {storage.key}")
    return blobs[storage.key]

  return obj, _materializer(name, storage_bytes, swap=False)


def _is_safetensors(data: bytes) -> bool:
  if len(data) < 9:
    return False
  (size,) = struct.unpack_from("<Q", data)
  # safetensors caps its header at 100 MB; a legacy pickle's first bytes read far larger.
  return size <= 100_000_000 and data[8:9] == b"{"


def _load_safetensors(data: bytes, name: str):
  (size,) = struct.unpack_from("<Q", data)
  if 8 + size > len(data):
    raise CheckpointFileError(f"{name}: is truncated: its safetensors header needs "
                              f"{8 + size} bytes, the file has {len(data)}")
  try:
    header = json.loads(data[8:8 + size])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointFileError(f"{name}: is truncated or corrupt: its safetensors header "
                              f"is not JSON ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointFileError(f"{name}: its safetensors header is not a JSON object")
  body = memoryview(data)[8 + size:]
  storages, tensors = {}, {}
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    try:
      dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
      shape = _ints(entry["shape"], "shape")
      begin, end = _ints(entry["data_offsets"], "data offsets")
    except (KeyError, TypeError, ValueError, pickle.UnpicklingError) as e:
      raise CheckpointFileError(f"{name}: safetensors entry {key!r} is malformed or of an "
                                f"unsupported dtype: {entry!r}") from e
    numel = math.prod(shape)
    if end - begin != numel * dtype.itemsize:
      raise CheckpointFileError(f"{name}: safetensors entry {key!r} spans {end - begin} "
                                f"bytes for shape {shape} of {dtype}")
    if end > len(body):
      raise CheckpointFileError(f"{name}: is truncated: tensor {key!r} needs bytes up to "
                                f"{8 + size + end}, the file has {len(data)}")
    storages[key] = _Storage(key, dtype, numel, begin)
    strides = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
    tensors[key] = _Tensor(storages[key], 0, shape, strides, None)
  return tensors, _materializer(name, lambda storage: body, swap=False)


# --------------------------------------------------------------------- reading tensors

class _Budget:
  """Bounds the bytes the arrays may take, so that a crafted file whose strides repeat
  one element cannot demand more memory than the machine has."""

  def __init__(self, data, name):
    self.left = 16 * len(data) + (1 << 30)
    self.name = name

  def take(self, nbytes, key):
    self.left -= nbytes
    if self.left < 0:
      raise CheckpointFileError(f"{self.name}: tensor {key!r} makes the arrays far larger "
                                "than the file; refusing to expand it")


def _materializer(name, storage_bytes, swap):
  def materialize(tensor: _Tensor, key: str, budget: _Budget) -> np.ndarray:
    try:
      return _read_tensor(tensor, key, budget)
    except CheckpointFileError:
      raise
    except Exception as e:  # whatever a damaged record makes numpy raise
      raise CheckpointFileError(f"{name}: is truncated or corrupt: tensor {key!r} cannot "
                                f"be read ({type(e).__name__}: {e})") from e

  def _read_tensor(tensor: _Tensor, key: str, budget: _Budget) -> np.ndarray:
    storage = tensor.storage
    raw = storage_bytes(storage)
    if storage.start + storage.nbytes > len(raw):
      raise CheckpointFileError(
          f"{name}: is truncated or corrupt: the storage of {key!r} declares "
          f"{storage.nbytes} bytes, {len(raw) - storage.start} are there")
    raw = raw[storage.start:storage.start + storage.nbytes]
    dtype = tensor.dtype if tensor.dtype is not None else storage.dtype
    size, item = tensor.size, dtype.itemsize
    budget.take(math.prod(size) * item, key)
    if math.prod(size) == 0:
      return np.empty(size, dtype)
    last = tensor.offset + sum((n - 1) * s for n, s in zip(size, tensor.stride))
    if (last + 1) * item > len(raw):
      raise CheckpointFileError(
          f"{name}: tensor {key!r} (offset {tensor.offset}, size {size}, stride "
          f"{tensor.stride}) reaches past the end of its {len(raw)}-byte storage")
    view = np.ndarray(size, dtype, buffer=raw, offset=tensor.offset * item,
                      strides=tuple(s * item for s in tensor.stride))
    out = view.copy(order="C")
    if swap:
      out.byteswap(inplace=True)  # complex numbers swap each part, as torch does
    if tensor.conj:
      np.conjugate(out, out=out)
    if tensor.neg:
      np.negative(out, out=out)
    return out
  return materialize


# ------------------------------------------------------------------ the state dict

# Training checkpoints hold the weights under one of these keys; DINO's hold both its
# "student" and its "teacher", whose weights the released backbones are.
_WRAPPERS = ("teacher", "state_dict", "model")


def _select_state_dict(obj, name) -> dict[str, _Tensor]:
  """The flat tensor dict in ``obj``, unwrapped and without shared prefixes."""
  if not isinstance(obj, dict):
    what = "a tensor" if isinstance(obj, _Tensor) else f"a {type(obj).__name__}"
    raise CheckpointFileError(f"{name}: holds {what}, not a state dict")
  chosen, wrapper = obj, None
  if not (obj and all(isinstance(v, _Tensor) for v in obj.values())):
    for key in _WRAPPERS:
      inner = obj.get(key)
      if isinstance(inner, dict) and any(isinstance(v, _Tensor) for v in inner.values()):
        chosen, wrapper = inner, key
        break
  state = {k: v for k, v in chosen.items() if isinstance(k, str) and isinstance(v, _Tensor)}
  if not state:
    keys = [k for k in obj][:20]
    raise CheckpointFileError(f"{name}: holds no arrays in a state dict: its top-level "
                              f"keys are {keys}")
  state = _strip(state, "module.")
  if wrapper == "teacher" and not all(k.startswith("backbone.") for k in state):
    # DINO's MultiCropWrapper: the backbone and, beside it, the projection head
    # used only in training, which is dropped.
    if all(k.startswith(("backbone.", "head.")) for k in state):
      state = {k: v for k, v in state.items() if k.startswith("backbone.")}
  return _strip(state, "backbone.")


def _strip(state, prefix):
  if all(k.startswith(prefix) for k in state):
    return {k[len(prefix):]: v for k, v in state.items()}
  return state
