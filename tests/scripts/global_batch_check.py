"""Runs in its own process (virtual CPU devices must be set before JAX starts).

Prints one JSON line comparing the sharded global-batch loss with the single-device loss.
"""

import functools
import json
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import msjax.losses as L  # noqa: E402


def main():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(16), 4).astype(np.int32)
  labels[-3:] = [100, 101, 102]  # single-image classes
  emb = rng.normal(size=(64, 16)) + 2 * rng.normal(size=(128, 16))[labels % 128]
  emb[5] = emb[6]  # an exact duplicate
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  mesh = jax.make_mesh((8,), ("batch",))
  shard = NamedSharding(mesh, P("batch"))
  emb_s, labels_s = jax.device_put(emb, shard), jax.device_put(labels, shard)
  results = []
  for name in L.NAMES:
    for self_pair in ("value", "index"):
      for block_size in (None, 3):
        fn = jax.shard_map(
            functools.partial(L.global_batch_loss, axis_name="batch", loss=name,
                              block_size=block_size, self_pair=self_pair),
            mesh=mesh, in_specs=(P("batch"), P("batch")), out_specs=P())
        step = jax.jit(jax.value_and_grad(fn))
        value, grad = step(emb_s, labels_s)
        ref_value, ref_grad = jax.value_and_grad(
            lambda e: L.get(name).loss(e @ e.T, labels, self_pair=self_pair))(emb)
        hlo = step.lower(emb_s, labels_s).as_text()
        dots = re.findall(r"dot_general.*?-> tensor<([0-9x]+)xf64>", hlo)
        results.append(dict(
            name=name, self_pair=self_pair, block_size=block_size,
            value=float(value), ref_value=float(ref_value),
            grad_err=float(np.abs(np.asarray(grad) - np.asarray(ref_grad)).max()),
            grad_scale=float(np.abs(np.asarray(ref_grad)).max()),
            grad_sharding=str(grad.sharding.spec), dot_shapes=sorted(set(dots))))
  json.dump(dict(devices=len(jax.devices()), results=results), sys.stdout)


if __name__ == "__main__":
  main()
