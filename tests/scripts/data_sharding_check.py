"""Runs in its own process (virtual CPU devices must be set before JAX starts).

Builds training batches on 8 devices (one mesh axis, and a 4×2 mesh) and prints one
JSON line: for each mesh, whether every device holds its contiguous slice of the batch
the pipeline produced, and the sharding's spec.
"""

import json
import pathlib
import sys
import tempfile

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from msjax.data import ImageTransform, PKSampler, benchmarks, pipeline  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
import data_fixtures as fx  # noqa: E402


def main():
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    split = benchmarks.load_cub(fx.make_cub(tmp, num_classes=16, sizes=4).root).train
    sampler = PKSampler(split.labels, 4, 4, seed=0)
    transform = ImageTransform(image_size=8, resize_to=10)
    host = [{k: np.array(v) for k, v in b.items()} for b in pipeline.train_dataset(
        split, sampler, transform, num_steps=2, seed=0)]
    devices = np.asarray(jax.devices())
    for name, mesh in {"flat": Mesh(devices, ("batch",)),
                       "4x2": Mesh(devices.reshape(4, 2), ("data", "replica"))}.items():
      batches = list(pipeline.GlobalBatches(
          pipeline.train_dataset(split, sampler, transform, num_steps=2, seed=0), mesh))
      ok = True
      for got, want in zip(batches, host, strict=True):
        for key in ("image", "label"):
          arr = got[key]
          ok &= arr.shape == want[key].shape and len(arr.addressable_shards) == 8
          for shard in arr.addressable_shards:
            ok &= np.array_equal(np.asarray(shard.data), want[key][shard.index])
            ok &= shard.data.shape[0] == want[key].shape[0] // 8
      out[name] = {"ok": bool(ok), "spec": str(batches[0]["image"].sharding.spec)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
