"""Serializes a trained model's embedding function with ``jax.export``.

    python -m msjax.export --workdir runs/cub-20261129-1200 --out exported/cub
        [--step N | --best] [--platforms cpu,cuda,tpu] [--overwrite]

restores the workdir's checkpoint (the latest; ``--best``: the best by the config's
``eval.best_metric``) the way evaluation does, and writes to ``--out``:

- ``embedder.jax``: the embedding function, ``(params, images uint8 [batch, H, W, 3]) ->
  float32 [batch, D]`` with unit rows, as serialized StableHLO (``jax.export``) with a
  symbolic batch dimension, lowered for every requested platform. ``H = W =
  config.data.image_size``; the input normalisation of the backbone runs inside it.
- ``params.npz``: the parameters and BatchNorm statistics the function takes, one array
  per ``params.``/``rest.`` path.
- ``manifest.json``: shapes, dtypes, platforms, the checkpoint step and its metrics, the
  source workdir, the model config, the preprocessing the images need, versions.
- ``load_embedder.py``: a copy of ``msjax/load_embedder.py``, which runs the function with
  NumPy and JAX only (``load(DIR)`` here is the same code).

The parameters are an argument stored beside the function, not constants folded into
it: the serialized module stays a few kB whatever the model (BN-Inception's 10 M
parameters would add 40 MB of constants to the module and to every compilation of it),
and ``params.npz`` can be read, checked or swapped with NumPy alone.

The directory is written under a temporary name beside ``--out`` and renamed at the end,
so a failure leaves nothing behind (a killed process at most a hidden ``.NAME.tmp-*``
sibling); an existing non-empty ``--out`` is refused unless ``--overwrite`` is given and
it holds an earlier export.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from msjax import load_embedder

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")  # the names jax.export lowers for
FORMAT = "msjax-embedder"
FORMAT_VERSION = 1
LOADER = "load_embedder.py"
load = load_embedder.load  # load(DIR) -> embed(images uint8 [N, H, W, 3]) -> [N, D]


class ExportError(ValueError):
  """A workdir, checkpoint, output directory or platform that cannot be exported; the
  message says what to change."""


def parse_platforms(text: str | None) -> tuple[str, ...]:
  """``"cpu,cuda"`` → ``("cpu", "cuda")``; None → ``default_platforms()``."""
  if text is None:
    return default_platforms()
  names = tuple(dict.fromkeys(p.strip().lower() for p in text.split(",") if p.strip()))
  unknown = [p for p in names if p not in PLATFORMS]
  if unknown or not names:
    what = unknown[0] if unknown else "empty"
    raise ExportError(f"--platforms {text!r}: {what} is not a platform jax.export lowers "
                      f"for; choose from {','.join(PLATFORMS)} (GPUs are cuda or rocm).")
  return names


def default_platforms() -> tuple[str, ...]:
  """CPU, where anything runs, plus the accelerator this process runs on (if any)."""
  here = jax.export.default_export_platform()
  return ("cpu",) if here == "cpu" else ("cpu", here)


# ---------------------------------------------------------------------------- restoring


# What restoring reads from the run's config.json.
_CONFIG_FIELDS = ("model.backbone", "model.embedding_dim", "data.image_size",
                  "data.resize_to", "eval.split", "eval.best_metric", "train.num_steps")


@dataclasses.dataclass
class Restored:
  """A restored checkpoint, as the embedding function needs it."""

  config: Any  # ml_collections.ConfigDict, the run's config.json
  model: Any  # msjax.train.Model
  variables: dict  # {"params": ..., "rest": ...} of NumPy arrays
  mesh: Any  # the one-device mesh the function is exported for
  step: int
  selected_by: str  # "latest", "step", or "best <metric>"
  metrics: dict | None  # the evaluation saved with it


def restore(workdir, *, step: int | None = None, best: bool = False) -> Restored:
  """The parameters and BatchNorm statistics of ``workdir``'s checkpoint: ``step``, the
  best by ``<eval.split>/<eval.best_metric>`` when ``best``, else the latest.

  Restored by ``analysis.load_run`` without the dataset (the images may live on another
  machine), as evaluation restores it; the checkpoints are opened read-only, so a run
  that is still training can be exported. Every check that can fail on a user's input
  runs first, so a failure costs no model build.
  """
  from etils import epath

  from msjax import analysis, checkpoint, models, sharding, train
  path = epath.Path(workdir)
  if not path.is_dir():
    raise ExportError(f"--workdir {workdir} does not exist (or is not a directory); pass "
                      "the --workdir a training run used.")
  try:
    config = analysis.load_config(path)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from None
  for field in _CONFIG_FIELDS:
    section, key = field.split(".")
    if key not in config.get(section, {}):
      raise ExportError(f"{path / 'config.json'} has no {field}: it was not written by "
                        "python -m msjax.main (or by an older msjax); pass the --workdir "
                        "of a training run.")
  if config.model.backbone not in models.BACKBONES:
    raise ExportError(f"{path / 'config.json'}: model.backbone={config.model.backbone!r} "
                      f"is not one this msjax knows ({sorted(models.BACKBONES)}).")
  metric = f"{config.eval.split}/{config.eval.best_metric}"
  selected_by = f"best {metric}" if best else "latest" if step is None else "step"
  try:
    step, metrics = checkpoint.select_step(path, best_metric=metric, step=step, best=best)
  except checkpoint.CheckpointError as e:
    raise ExportError(str(e)) from None
  run = analysis.load_run(workdir, step=step, load_data=False)
  # The embedder only: a proxy loss's class proxies stay with the training run.
  variables = jax.device_get({"params": train.model_params(run.state["params"]),
                              "rest": run.state["rest"]})
  for name, leaf in train.flat_tree(variables).items():
    if np.asarray(leaf).dtype.kind not in "fiub":  # npz holds plain arrays only
      raise ExportError(f"{name} is a {np.asarray(leaf).dtype} array; only numeric "
                        "arrays can be exported.")
  # One device: the export is not sharded, so it runs wherever one device does.
  mesh = sharding.make_mesh(jax.devices()[:1])
  return Restored(run.config, run.model, variables, mesh, run.step, selected_by, metrics)


# ---------------------------------------------------------------------------- exporting


def export_function(restored: Restored, platforms) -> jax.export.Exported:
  """``jax.export`` of ``(flat params, images uint8 [batch, H, W, 3]) -> [batch, D]``.

  The body is the evaluation's own ``train.make_embed_fn`` (normalise into the
  backbone's convention, eval-mode model, float32 unit rows); the parameters come in as a
  flat ``{"params.backbone...": array}`` dict, the layout of ``params.npz``.
  """
  from msjax import train
  embed = train.make_embed_fn(restored.model, restored.mesh)

  def embed_flat(flat, images):
    return embed(train.unflat_tree(flat, restored.variables), images)

  size = int(restored.config.data.image_size)
  flat = train.flat_tree(restored.variables)
  params = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
            for k, v in flat.items()}
  images = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"batch, {size}, {size}, 3"),
                                jnp.uint8)
  # The same module whatever the caller's x64 setting (the tests run with it on).
  with jax.enable_x64(False):
    lowered = jax.export.export(jax.jit(embed_flat), platforms=tuple(platforms))
    return lowered(params, images)


def manifest(restored: Restored, exported: jax.export.Exported, workdir) -> dict:
  """What ``manifest.json`` says about an export."""
  from msjax import models
  c = restored.config
  out = exported.out_avals[0]
  flat = _flat_arrays(restored)
  return {
      "format": FORMAT, "format_version": FORMAT_VERSION,
      "input": {"shape": [None, c.data.image_size, c.data.image_size, 3],
                "dtype": "uint8", "layout": "NHWC, RGB, 0-255; any batch size"},
      "output": {"shape": [None, int(out.shape[1])], "dtype": str(out.dtype),
                 "l2_normalised": True},
      "preprocessing": {
          "eval": (f"resize the short side to {c.data.resize_to} (bilinear), then center "
                   f"crop {c.data.image_size}" if c.data.resize_to else
                   f"images of {c.data.image_size}x{c.data.image_size}, not resized"),
          "resize_to": int(c.data.resize_to), "image_size": int(c.data.image_size),
          "normalisation": f"{restored.model.convention}, inside the exported function"},
      "platforms": list(exported.platforms),
      "checkpoint": {"step": restored.step, "selected_by": restored.selected_by,
                     "metrics": restored.metrics},
      "workdir": _absolute(workdir),
      "model": {"backbone": c.model.backbone, "embedding_dim": int(c.model.embedding_dim),
                "pooling": c.model.pooling or models.DEFAULT_POOLING[c.model.backbone],
                "dtype": c.model.dtype,
                "num_parameters": int(sum(np.size(v) for v in flat.values()))},
      "jax_version": jax.__version__,
      "calling_convention_version": exported.calling_convention_version,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  }


def export_embedder(workdir, out, *, step: int | None = None, best: bool = False,
                    platforms=None, overwrite: bool = False) -> dict:
  """Writes ``workdir``'s embedder to the directory ``out`` (see the module docstring);
  returns the manifest.

  Everything is checked, restored and lowered before anything is written; ``out`` then
  appears in one rename. Raises ``ExportError`` (or ``checkpoint.CheckpointError``, or
  ``train.ConfigError``) with nothing written.
  """
  platforms = default_platforms() if platforms is None else tuple(platforms)
  parse_platforms(",".join(platforms))
  out = _check_out(out, overwrite)
  restored = restore(workdir, step=step, best=best)
  exported = export_function(restored, platforms)
  info = manifest(restored, exported, workdir)
  try:
    _write_atomically(out, {
        load_embedder.EXPORTED: exported.serialize(),
        load_embedder.PARAMS: lambda path: np.savez(path, **_flat_arrays(restored)),
        load_embedder.MANIFEST: json.dumps(info, indent=2) + "\n",
        LOADER: lambda path: shutil.copyfile(load_embedder.__file__, path)})
  except OSError as e:
    raise ExportError(f"could not write {out} ({type(e).__name__}: {e}); nothing was "
                      "written (an earlier export there is unchanged).") from e
  return info


def _flat_arrays(restored: Restored) -> dict[str, np.ndarray]:
  from msjax import train
  return {k: np.asarray(v) for k, v in train.flat_tree(restored.variables).items()}


def _absolute(path) -> str:
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def _is_export(directory: str) -> bool:
  try:
    with open(os.path.join(directory, load_embedder.MANIFEST), encoding="utf-8") as f:
      return json.load(f).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def _check_out(out, overwrite: bool) -> str:
  """``out`` as an absolute local path, if it may be written."""
  out = os.fspath(out)
  if "://" in out:
    raise ExportError(f"--out {out}: export to a local directory, then copy it (e.g. "
                      "gsutil cp -r); a rename is atomic only on a local file system.")
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise ExportError(f"--out {out} is a file; pass a directory path.")
  if os.path.isdir(out) and os.listdir(out):
    if not overwrite:
      raise ExportError(f"--out {out} exists and is not empty; pass an empty or new "
                        "directory, or --overwrite to replace an earlier export.")
    if not _is_export(out):
      # --overwrite deletes; only what this command wrote may be deleted.
      raise ExportError(f"--out {out} is not an earlier export (no msjax "
                        f"{load_embedder.MANIFEST}); --overwrite replaces only those. Pass "
                        "another directory.")
  return out


def _write_atomically(out: str, files: dict) -> None:
  """Writes ``files`` (name → bytes, text, or a function of the path) into a temporary
  sibling of ``out``, then renames it to ``out`` (replacing an earlier export there)."""
  parent, name = os.path.split(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
  old = None
  try:
    for file, content in files.items():
      path = os.path.join(tmp, file)
      if callable(content):
        content(path)
      else:
        with open(path, "wb") as f:
          f.write(content.encode() if isinstance(content, str) else content)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; an export is meant to be shared
    if os.path.isdir(out) and os.listdir(out):
      old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
      os.rename(out, os.path.join(old, name))
    os.replace(tmp, out)  # an empty out is replaced too
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.exists(out):
      os.rename(os.path.join(old, name), out)  # put the earlier export back
      shutil.rmtree(old, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------- the command


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m msjax.export",
      description="Serialize a trained model's embedding function (jax.export); it then "
                  "runs with NumPy and JAX only. See docs/export.md.")
  p.add_argument("--workdir", required=True, help="the training run's --workdir")
  p.add_argument("--out", required=True, help="the directory to write (new or empty)")
  which = p.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, help="the checkpoint step (default: the latest)")
  which.add_argument("--best", action="store_true",
                     help="the best checkpoint by the config's eval.best_metric")
  p.add_argument("--platforms", help=f"comma-separated, from {','.join(PLATFORMS)} "
                 f"(default: {','.join(default_platforms())}: cpu and this machine's)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an earlier export in --out")
  args = p.parse_args(argv)

  from absl import logging as absl_logging

  from msjax.checkpoint import CheckpointError
  from msjax.train import ConfigError
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax logs every restore
  try:
    info = export_embedder(args.workdir, args.out, step=args.step, best=args.best,
                           platforms=parse_platforms(args.platforms),
                           overwrite=args.overwrite)
  except (ExportError, CheckpointError, ConfigError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
    return 1
  out = os.path.abspath(args.out)
  sizes = ", ".join(f"{f} {_size(os.path.getsize(os.path.join(out, f)))}"
                    for f in (load_embedder.EXPORTED, load_embedder.PARAMS))
  m, c = info["model"], info["checkpoint"]
  print(f"Exported step {c['step']} ({c['selected_by']}) "
        f"of {args.workdir}: {m['backbone']}, uint8 {info['input']['shape'][1:]} -> "
        f"float32 [{m['embedding_dim']}], for {','.join(info['platforms'])}.\n"
        f"{out}: {sizes}. Run it without msjax: python {os.path.join(out, LOADER)}")
  return 0


def _size(n: int) -> str:
  for unit in ("B", "kB", "MB"):
    if n < 1000:
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1000
  return f"{n:.1f} GB"


if __name__ == "__main__":
  sys.exit(main())
