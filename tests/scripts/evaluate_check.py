"""Runs in its own process (virtual CPU devices must be set before JAX starts).

Prints one JSON line: for each case, whether the rankings on 8 devices (one mesh axis,
and a 4×2 mesh) equal those on one device, and the metrics of each.
"""

import json
import pathlib
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from msjax import evaluate as E  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
import oracles  # noqa: E402

HLO = []


def _spy(make):
  """Records the compiled HLO of every ranking kernel that runs."""
  def wrapped(*a, **kw):
    fn = make(*a, **kw)

    def run(*args):
      HLO.append(fn.lower(*args).compile().as_text())
      return fn(*args)
    return run
  return wrapped


E._compiled_kernel = _spy(E._compiled_kernel)


def dot_shapes(text):
  return sorted({m.group(1) for m in re.finditer(r"= f\d+\[([\d,]*)\]\{[^}]*\} dot\(", text)})


def main():
  rng = np.random.default_rng(0)
  one = Mesh(np.asarray(jax.devices()[:1]), ("eval",))
  flat = Mesh(np.asarray(jax.devices()), ("eval",))
  grid = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "model"))
  cases = []
  for name, nq, ng, tile, group in [("symmetric", 203, None, 16, 4),
                                    ("symmetric_one_tile", 50, None, None, None),
                                    ("gallery", 150, 77, 16, 8),
                                    ("gallery_few_pairs", 20, 300, 64, 2)]:
    q = rng.integers(-2, 3, size=(nq, 6)).astype(np.float32)  # exact ties
    ql = rng.integers(0, 25, nq)
    ql[:7] = 1000 + np.arange(7)  # single-image classes
    g = gl = None
    if ng:
      g = rng.integers(-2, 3, size=(ng, 6)).astype(np.float32)
      gl = rng.integers(0, 27, ng)
    kw = dict(tile_size=tile, group_size=group)
    ref = E.retrieval_rankings(q, ql, g, gl, mesh=one, **kw)
    case = dict(name=name, metrics_one=E.metrics_from_rankings(ref), nq=nq, ng=ng or nq,
                tile=tile, oracle=oracles.retrieval(q, ql, g, gl)[0])
    for mesh_name, mesh in (("flat", flat), ("grid", grid)):
      got = E.retrieval_rankings(q, ql, g, gl, mesh=mesh, **kw)
      case[mesh_name] = all(np.array_equal(a, b) for a, b in zip(got, ref))
      case[f"metrics_{mesh_name}"] = E.metrics_from_rankings(got)
      case[f"dots_{mesh_name}"] = dot_shapes(HLO[-1])
    cases.append(case)
  print(json.dumps(dict(devices=jax.device_count(), cases=cases)))


if __name__ == "__main__":
  main()
