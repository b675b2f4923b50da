"""Pretrained weights: PyTorch state dicts to msjax's ``.npz`` files, and loading them.

msjax backbones name their submodules after the PyTorch modules whose weights they load
(``conv1``, ``layer1/0/bn1``, ``inception_3a_1x1_bn`` ...), so the PyTorch key of every
msjax variable follows from its path:

====================  ==========================  =====================================
msjax leaf            PyTorch key                 transform
====================  ==========================  =====================================
``.../kernel`` (4-D)  ``....weight``              OIHW -> HWIO
``.../kernel`` (2-D)  ``....weight``              [out, in] -> [in, out]
``.../scale``         ``....weight``              (BatchNorm)
``.../bias``          ``....bias``
``.../mean``          ``....running_mean``
``.../var``           ``....running_var``
``cls_token`` ...     ``cls_token`` ...           none (a ViT's ``cls_token``,
                                                  ``reg_token``, ``pos_embed`` and
                                                  LayerScale ``gamma`` keep their names)
====================  ==========================  =====================================

A converted file is a NumPy ``.npz`` with one array per msjax path (``"layer1/0/conv1/
kernel"``), ``__arch__`` naming the architecture it was converted for and, for weights
fetched by name, ``__source__`` (JSON: the name, address and SHA-256 of the download).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from msjax.models import vit

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var",
                  **{same: same for same in ("cls_token", "reg_token", "pos_embed", "gamma")}}
ARCH_KEY = "__arch__"
SOURCE_KEY = "__source__"


def flat_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  """``{"a/b/kernel": variable}`` for every parameter and batch statistic of ``model``."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
    out["/".join(str(p) for p in path)] = var
  return out


def torch_key(path: str) -> str:
  *mods, leaf = path.split("/")
  if leaf not in _LEAF_TO_TORCH:
    raise ValueError(f"msjax variable {path!r} has no PyTorch counterpart (leaf {leaf!r}).")
  return ".".join(mods + [_LEAF_TO_TORCH[leaf]])


def _key_differences(expected, given, noun) -> list[str]:
  """Lines naming what ``given`` lacks and what it has beyond ``expected`` (8 of each)."""
  lines = []
  for what, keys in (("missing", set(expected) - set(given)),
                     ("unexpected", set(given) - set(expected))):
    if keys:
      keys = sorted(keys)
      lines.append(f"{what} {len(keys)} {noun}: {', '.join(keys[:8])}"
                   + (" ..." if len(keys) > 8 else ""))
  return lines


def _from_torch(value: np.ndarray, path: str) -> np.ndarray:
  if path.endswith("/kernel"):
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:
      return value.T
  return value


def _to_torch_shape(shape, path) -> tuple[int, ...]:
  """An msjax variable's shape in PyTorch's layout (the inverse of ``_from_torch``)."""
  shape = tuple(shape)
  if path.endswith("/kernel") and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path.endswith("/kernel") and len(shape) == 2:
    return shape[::-1]
  return shape


def convert_state_dict(model: nnx.Module, state_dict: Mapping[str, object], *,
                       ignore_prefixes: Iterable[str] = ()) -> dict[str, np.ndarray]:
  """Maps a PyTorch state dict onto ``model``'s variables, checking it key by key.

  Args:
    model: an msjax backbone (its structure decides the expected keys).
    state_dict: PyTorch key -> tensor or array (``num_batches_tracked`` is ignored).
    ignore_prefixes: keys to leave out, e.g. the ImageNet classifier (``"fc."``).

  Returns:
    ``{msjax path: array}`` in msjax's layouts, ready for ``save_npz``.

  Raises:
    ValueError: naming every missing key, every unexpected key, and every shape that
      does not match (with both shapes).
  """
  ignore = tuple(ignore_prefixes)
  given = {k: v for k, v in state_dict.items()
           if not k.endswith("num_batches_tracked") and not k.startswith(ignore)}
  variables = flat_variables(model)
  expected = {torch_key(path): path for path in variables}
  problems = _key_differences(expected, given, "key(s)")
  out = {}
  for key, path in expected.items():
    if key not in given:
      continue
    value = given[key]
    value = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
    value = _from_torch(value.astype(np.float32), path)
    want = tuple(variables[path].shape)
    if value.shape != want:  # both in PyTorch's layout, as the checkpoint's author knows it
      problems.append(f"{key}: checkpoint shape {_to_torch_shape(value.shape, path)}, "
                      f"the architecture's {_to_torch_shape(want, path)}")
    out[path] = value
  if problems:
    raise ValueError("The state dict does not match the architecture:\n  "
                     + "\n  ".join(problems))
  return out


def save_npz(path, arrays: Mapping[str, np.ndarray], arch: str, source: dict | None = None):
  """Writes the converted arrays (local or ``gs://``), tagged with the architecture and,
  optionally, where they came from. The file appears whole or not at all: it is written
  under a temporary name in the same directory and renamed."""
  import json
  import uuid

  from etils import epath
  buf = io.BytesIO()
  tags = {ARCH_KEY: np.array(arch)}
  if source is not None:
    tags[SOURCE_KEY] = np.array(json.dumps(source))
  np.savez(buf, **tags, **arrays)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
  tmp.write_bytes(buf.getvalue())
  tmp.rename(path)


def load_npz(path) -> tuple[str | None, dict[str, np.ndarray]]:
  """Reads a converted file: ``(architecture, {path: array})``."""
  from etils import epath
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"Pretrained weights {path} not found. Convert the published PyTorch checkpoint "
        "with `python -m msjax.models.convert --arch ARCH --src FILE.pth --out "
        f"{path}` (see docs/models.md), or set model.pretrained to the converted file.")
  with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as data:
    arrays = {k: data[k] for k in data.files}
  arch = arrays.pop(ARCH_KEY, None)
  arrays.pop(SOURCE_KEY, None)
  return (str(arch) if arch is not None else None), arrays


def read_source(path) -> dict | None:
  """Where a converted file's weights came from (``save_npz(source=...)``), or ``None``."""
  import json

  from etils import epath
  with np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False) as data:
    return json.loads(str(data[SOURCE_KEY])) if SOURCE_KEY in data.files else None


def assign(model: nnx.Module, arrays: Mapping[str, np.ndarray], *, source: str = "weights"):
  """Sets every parameter and batch statistic of ``model`` from ``arrays`` (exact keys)."""
  variables = flat_variables(model)
  problems = _key_differences(variables, arrays, "parameter(s)")
  for path, var in variables.items():
    if path in arrays and tuple(arrays[path].shape) != tuple(var.shape):
      problems.append(f"{path}: {source} has shape {tuple(arrays[path].shape)}, the model "
                      f"{tuple(var.shape)}")
  if problems:
    raise ValueError(f"{source} do not fit the model:\n  " + "\n  ".join(problems))
  for path, var in variables.items():
    var.set_value(jnp.asarray(np.asarray(arrays[path]), var.dtype))


def load_pretrained(model: nnx.Module, path, arch: str):
  """Loads a converted ``.npz`` into ``model``, checking the architecture and shapes."""
  file_arch, arrays = load_npz(path)
  if file_arch is not None and file_arch != arch:
    raise ValueError(f"{path} holds {file_arch!r} weights but the backbone is {arch!r}; "
                     f"convert the {arch} checkpoint or change model.backbone.")
  assign(model, arrays, source=str(path))


def _init_values(key, specs):
  """Fresh values for ``initialise``: one random draw for every kernel, all at once."""
  import jax
  kernels = [(i, shape) for i, (leaf, shape, _) in enumerate(specs) if leaf == "kernel"]
  sizes = [int(np.prod(shape)) for _, shape in kernels]
  draws = jax.random.normal(key, (sum(sizes),), jnp.float32)
  out, start = [], 0
  by_index = {}
  for (i, shape), size in zip(kernels, sizes):
    # Kaiming normal, fan_out, gain sqrt(2) (torchvision's conv and the head's linear):
    # fan_out is H*W*O for an HWIO kernel and O for an [in, out] one.
    fan_out = int(np.prod(shape)) // shape[-2]
    by_index[i] = draws[start:start + size].reshape(shape) * np.sqrt(2.0 / fan_out)
    start += size
  tokens = [i for i, (leaf, _, _) in enumerate(specs)
            if leaf in ("cls_token", "reg_token", "pos_embed")]
  token_keys = jax.random.split(jax.random.fold_in(key, 1), max(len(tokens), 1))
  for i, (leaf, shape, dtype) in enumerate(specs):
    if i in by_index:
      value = by_index[i]
    elif i in tokens:  # a ViT's tokens and position embedding: N(0, 0.02²), as timm's
      value = 0.02 * jax.random.normal(token_keys[tokens.index(i)], shape)
    elif leaf == "gamma":  # LayerScale: DINOv2's init_values
      value = jnp.full(shape, vit.LAYER_SCALE_INIT)
    elif leaf in ("scale", "var"):
      value = jnp.ones(shape)
    else:  # bias, mean
      value = jnp.zeros(shape)
    out.append(value.astype(dtype))
  return out


def initialise(model: nnx.Module, key):
  """Gives every parameter and BatchNorm statistic of ``model`` (built abstract, with
  ``nnx.eval_shape``) its initial value in one compiled call: Kaiming-normal fan_out
  kernels, zero biases, BatchNorm and LayerNorm scale 1, bias 0, mean 0, variance 1; a
  ViT's tokens and position embedding N(0, 0.02²), LayerScale 1e-5."""
  import jax
  variables = flat_variables(model)
  specs = tuple((path.rsplit("/", 1)[-1], tuple(v.shape), jnp.dtype(v.dtype).name)
                for path, v in variables.items())
  values = jax.jit(_init_values, static_argnums=1)(key, specs)
  for var, value in zip(variables.values(), values):
    var.set_value(value)
