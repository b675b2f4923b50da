"""One of two processes (``python data_two_process.py PROCESS_ID PORT DIR``).

Two processes with two virtual CPU devices each join through ``jax.distributed``; each
feeds only its slice of every P×K batch, ``GlobalBatches`` assembles one global array
over the four devices, and a jitted reduction over the whole array must see exactly the
batch one process alone produces. Process 0 prints one JSON line.
"""

import json
import pathlib
import sys

import jax

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

process_id, port, root = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from msjax.data import ImageTransform, PKSampler, benchmarks, pipeline  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))


@jax.jit
def fingerprint(images, labels):
  """Per-position sums: any misplaced or missing slice changes them."""
  return (jnp.sum(images.astype(jnp.int32), axis=(1, 2, 3)),
          labels * 1000 + jnp.arange(labels.shape[0]))


def main():
  split = benchmarks.load_cub(root).train
  sampler = PKSampler(split.labels, 4, 4, seed=3)
  transform = ImageTransform(image_size=8, resize_to=10)
  mesh = Mesh(np.asarray(jax.devices()), ("batch",))
  ours = pipeline.GlobalBatches(pipeline.train_dataset(
      split, sampler, transform, num_steps=3, seed=3), mesh)
  alone = pipeline.train_dataset(split, sampler, transform, num_steps=3, seed=3,
                                 process_index=0, process_count=1)
  ok, local_sizes = True, []
  for got, want in zip(ours, alone, strict=True):
    sums, keys = fingerprint(got["image"], got["label"])
    local_sizes.append(sum(s.data.shape[0] for s in got["image"].addressable_shards))
    # Every process sees the reduction over the global array, whoever loaded what.
    full_sums = np.asarray(jax.experimental.multihost_utils.process_allgather(sums,
                                                                              tiled=True))
    full_keys = np.asarray(jax.experimental.multihost_utils.process_allgather(keys,
                                                                              tiled=True))
    ok &= np.array_equal(full_sums, want["image"].astype(np.int64).sum(axis=(1, 2, 3)))
    ok &= np.array_equal(full_keys, want["label"] * 1000 + np.arange(16))
  if jax.process_index() == 0:
    print(json.dumps({"ok": bool(ok), "devices": jax.device_count(),
                      "local_devices": jax.local_device_count(),
                      "local_rows": local_sizes}))
  jax.distributed.shutdown()


if __name__ == "__main__":
  import jax.experimental.multihost_utils  # noqa: F401,E402
  main()
