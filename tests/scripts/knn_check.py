"""Runs in its own process (virtual CPU devices must be set before JAX starts).

Prints one JSON line: msjax.knn.top_k's neighbours on 8 devices (one mesh axis, and a
4×2 mesh) and on one device, for a few problems, and whether the compiled 8-device program
holds an array as large as the whole similarity matrix.
"""

import json

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from msjax import knn  # noqa: E402


def lattice(rng, n, d):
  """Embeddings whose inner products are exact in float32: many exact ties."""
  return (rng.integers(-2, 3, (n, d)) / 4.0).astype(np.float32)


def main():
  rng = np.random.default_rng(3)
  devices = np.asarray(jax.devices())
  meshes = {"one": Mesh(devices[:1], ("eval",)), "eight": Mesh(devices, ("eval",)),
            "four_by_two": Mesh(devices.reshape(4, 2), ("a", "b"))}
  cases = []
  for nq, ng, d, k, tile in [(37, 203, 6, 7, 16), (9, 64, 3, 64, 8), (130, 40, 5, 3, 32)]:
    q, g = lattice(rng, nq, d), lattice(rng, ng, d)
    g[11] = g[4]        # an exact duplicate in the collection
    q[2] = g[20]        # a query that is in the collection
    out = {name: knn.top_k(q, g, k, tile_size=tile, mesh=mesh)
           for name, mesh in meshes.items()}
    cases.append({"q": q.tolist(), "g": g.tolist(), "k": k,
                  **{f"{name}_indices": n.indices.tolist() for name, n in out.items()},
                  **{f"{name}_sims": n.similarities.tolist() for name, n in out.items()}})
  nq, ng = 64, 4096
  compiled = knn._compiled_top_k(meshes["eight"], "eval", devices=8, tile=64, group=8,
                                 k=5, cols=ng, num_gallery=ng,
                                 precision=jax.lax.Precision.HIGHEST)
  args = (np.zeros((nq, 8), np.float32), np.zeros((ng, 8), np.float32),
          np.zeros((64, 8), np.float32), knn.pair_schedule(1, ng // 64, False, 8))
  hlo = compiled.lower(*args).compile().as_text()
  print(json.dumps({"devices": jax.device_count(), "cases": cases,
                    "full_matrix_in_hlo": f"[{nq},{ng}]" in hlo}))


if __name__ == "__main__":
  main()
