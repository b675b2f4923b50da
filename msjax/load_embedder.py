"""Runs an embedder exported by ``python -m msjax.export`` with NumPy and JAX only.

``python -m msjax.export`` copies this file into the directory it writes, so the model
runs where msjax is not installed (msjax itself loads through it too:
``msjax.export.load``)::

    from load_embedder import load
    embed = load("exported/")     # the directory this file was copied into
    emb = embed(images)           # uint8 [N, H, W, 3] RGB -> float32 [N, D], unit rows

    python exported/load_embedder.py [--images in.npy] [--out out.npy]

The function is ``embedder.jax`` (``jax.export`` serialized StableHLO, any batch size),
its weights are ``params.npz``, and ``manifest.json`` describes both. Each new batch size
compiles once; feed fixed-size batches (pad the last) to embed many images quickly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import numpy as np

MANIFEST, EXPORTED, PARAMS = "manifest.json", "embedder.jax", "params.npz"


class Embedder:
  """``embed(images uint8 [N, H, W, 3]) -> float32 [N, D]``, L2-normalised rows."""

  def __init__(self, directory):
    paths = {name: os.path.join(directory, name) for name in (MANIFEST, EXPORTED, PARAMS)}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{missing[0]} does not exist: {directory} is not a "
                              "directory written by python -m msjax.export.")
    with open(paths[MANIFEST], encoding="utf-8") as f:
      self.manifest = json.load(f)
    with open(paths[EXPORTED], "rb") as f:
      self.exported = jax.export.deserialize(bytearray(f.read()))
    here = jax.export.default_export_platform()
    if here not in self.exported.platforms:
      raise RuntimeError(
          f"{directory} was exported for {', '.join(self.exported.platforms)}, but JAX "
          f"runs on {here} here. Export again with --platforms "
          f"{','.join((*self.exported.platforms, here))}, or set JAX_PLATFORMS=cpu.")
    with np.load(paths[PARAMS], allow_pickle=False) as z:
      # On the device once, not at every call.
      self.params = jax.device_put({k: z[k] for k in z.files})
    self.image_shape = tuple(self.manifest["input"]["shape"][1:])  # (H, W, 3)
    self.embedding_dim = int(self.manifest["output"]["shape"][1])
    self._embed = jax.jit(self.exported.call)

  def __call__(self, images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
      h, w, _ = self.image_shape
      raise ValueError(
          f"expected uint8 images of shape [N, {h}, {w}, 3] (RGB, 0-255; resized and "
          f"center-cropped as manifest.json's 'preprocessing' says), got {images.dtype} "
          f"{list(images.shape)}.")
    if not len(images):  # the exported batch dimension is at least 1
      return np.zeros((0, self.embedding_dim), np.float32)
    return np.asarray(self._embed(self.params, images))


def load(directory) -> Embedder:
  """The embedder exported to ``directory``."""
  return Embedder(os.fspath(directory))


def main(argv=None) -> int:
  """Embeds ``--images`` (default: 4 random images) and prints what came out."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  here = os.path.dirname(os.path.abspath(__file__))
  p.add_argument("directory", nargs="?", default=here,
                 help="the export directory (default: the one this file is in)")
  p.add_argument("--images", help=".npy file of uint8 images [N, H, W, 3]")
  p.add_argument("--out", help=".npy file to write the float32 [N, D] embeddings to")
  args = p.parse_args(argv)
  try:
    embed = load(args.directory)
    if args.images:
      images = np.load(args.images, allow_pickle=False)
    else:
      rng = np.random.default_rng(0)
      images = rng.integers(0, 256, (4, *embed.image_shape), np.uint8)
    emb = embed(images)
  # ImportError: a JAX without flatbuffers cannot deserialize.
  except (OSError, ValueError, RuntimeError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.out:
    np.save(args.out, emb)
  norms = np.linalg.norm(emb, axis=1)
  print(f"{len(emb)} images -> {emb.dtype} embeddings {list(emb.shape)}, norms "
        f"{norms.min(initial=1):.6f}-{norms.max(initial=1):.6f}"
        + (f"; wrote {args.out}" if args.out else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
