"""Runs in its own process (virtual CPU devices must be set before JAX starts).

The pair-weight telemetry of the same batches on a mesh of 8 devices and on 1 device: MS
on every kind of batch (P×K, single-image classes, duplicates, ties, no positives, no
negatives, nothing mined), triplet on P×K, and both proxy losses (sample-to-proxy pairs,
the proxies replicated) on P×K and single-image classes, plus whether the sharded
program holds a ``[B, B]`` array. Prints one
JSON line: ``{"devices", "cases": [{"kind", "loss", "sharded", "single"}], "square_in_hlo"}``.
"""

import json
import math
import pathlib
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402

from msjax import losses, sharding, telemetry  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
from batches import make_batch  # noqa: E402

# MS on every kind of batch; one other loss (triplet: integer weights, its own selection)
# shows the reduction is the loss's own. The other losses' numbers are checked against
# their GPW summaries on one device in test_telemetry.py.
HPARAMS = {"ms": dict(alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1, mining=True,
                      weighting="ms"),
           "triplet": {}}


def put(x, mesh):
  return jax.device_put(x, sharding.batch_sharded(mesh))


def plain(d):
  return {k: (None if math.isnan(float(v)) else float(v)) for k, v in d.items()}


def main():
  mesh8 = sharding.make_mesh()
  mesh1 = sharding.make_mesh(jax.devices()[:1])
  fns = {(loss, n): telemetry.make_telemetry_fn(mesh, loss, hp)  # one compile each
         for loss, hp in HPARAMS.items() for n, mesh in ((8, mesh8), (1, mesh1))}
  cases = []
  kinds = ["pk", "k1_mixed", "duplicates", "ties", "singletons", "one_class", "mined_out"]
  for kind in kinds:
    emb, labels = make_batch(kind, 8, 4, 16, seed=11, spread=2.0)
    emb = emb.astype(np.float32)
    for loss in HPARAMS:
      if kind != "pk" and loss != "ms":
        continue
      out = {}
      for name, n, mesh in (("sharded", 8, mesh8), ("single", 1, mesh1)):
        fn = fns[loss, n]
        scalars, histograms = jax.device_get(fn(put(emb, mesh), put(labels, mesh)))
        out[name] = plain(scalars)
        out[f"{name}_histograms"] = {k: v.tolist() for k, v in histograms.items()}
      cases.append({"kind": kind, "loss": loss, "emb": emb.tolist(),
                    "labels": labels.tolist(), **out})
  proxy_fns = {(loss, n): telemetry.make_proxy_telemetry_fn(mesh, loss, {})
               for loss in losses.PROXY_NAMES for n, mesh in ((8, mesh8), (1, mesh1))}
  for kind in ("pk", "k1_mixed"):
    emb, labels = make_batch(kind, 8, 4, 16, seed=12, spread=2.0)
    emb = emb.astype(np.float32)
    # Two classes more than the batch holds: proxies without a sample.
    proxies = np.random.default_rng(3).normal(size=(int(labels.max()) + 3, 16))
    for loss in losses.PROXY_NAMES:
      out = {}
      for name, n, mesh in (("sharded", 8, mesh8), ("single", 1, mesh1)):
        scalars, histograms = jax.device_get(proxy_fns[loss, n](
            put(emb, mesh), put(labels, mesh), proxies.astype(np.float32)))
        out[name] = plain(scalars)
        out[f"{name}_histograms"] = {k: v.tolist() for k, v in histograms.items()}
      cases.append({"kind": kind, "loss": loss, "emb": emb.tolist(),
                    "labels": labels.tolist(), **out})
  big = 256
  fn = fns["ms", 8]
  emb = np.zeros((big, 16), np.float32)
  labels = np.zeros((big,), np.int32)
  hlo = fn.lower(put(emb, mesh8), put(labels, mesh8)).compile().as_text()
  print(json.dumps({"devices": jax.device_count(), "cases": cases,
                    "square_in_hlo": f"[{big},{big}]" in hlo}))


if __name__ == "__main__":
  main()
