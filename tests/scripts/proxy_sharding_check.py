"""Runs in its own process (virtual CPU devices must be set before JAX starts).

Prints one JSON line comparing the proxy losses (``proxy_loss_from_embeddings`` with
``axis_name``) inside ``jax.shard_map`` on 8 virtual devices, the samples' rows sharded
and the proxies replicated, with the same loss on one device: the value, and the
gradients w.r.t. the embeddings and the proxies, taken both ways a caller can take them:
``jax.grad`` of the ``shard_map`` (what ``msjax.train`` does) and ``jax.grad`` inside it
per device (the proxies' gradient summed over devices by the replicated input's
transpose). Also the result shapes of the dot_generals in the 8-device HLO.
"""

import functools
import json
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import msjax.losses as L  # noqa: E402

DEVICES, ROWS, DIM, NUM_PROXIES = 8, 4, 8, 12  # 4 rows per device, 32 in all
VARIANTS = [("proxy_anchor", {}), ("proxy_nca", {}),
            ("proxy_nca", dict(positive_in_denominator=True, scale=2.0))]


def make_batch(seed):
  """Rows of device d are ``4d .. 4d+3``. Classes 0-3 span several devices; classes 4-7
  sit on one device each (rows 16-23: two per device 4 and 5); 20-27 are single images.
  Proxies: classes 0-9 in a shuffled order, 8 and 9 with no sample in the batch, one
  exactly along a sample, one of class 2 masked out by ``proxy_valid``; a second proxy of
  class 0; and class 20, whose only proxy is masked (its sample has no positive)."""
  rng = np.random.default_rng(seed)
  labels = np.array([0, 1, 2, 3] * 4 + [4, 4, 5, 5, 6, 6, 7, 7] + list(range(20, 28)),
                    np.int32)
  centres = rng.normal(size=(30, DIM))
  emb = centres[labels] + 1.5 * rng.normal(size=(DEVICES * ROWS, DIM))
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  proxy_labels = np.concatenate([rng.permutation(10), [0, 20]]).astype(np.int32)
  proxies = rng.normal(size=(NUM_PROXIES, DIM)) * rng.uniform(0.1, 3.0, (NUM_PROXIES, 1))
  proxies[3] = 2.5 * emb[9]  # S = 1 with sample 9 (up to rounding), whatever its class
  valid = np.ones(NUM_PROXIES, bool)
  valid[list(proxy_labels).index(2)] = False
  valid[-1] = False
  return emb, labels, proxies, proxy_labels, valid


def main():
  emb, labels, proxies, proxy_labels, valid = make_batch(0)
  mesh = jax.make_mesh((DEVICES,), ("batch",))
  shard, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  emb_s, labels_s = jax.device_put(emb, shard), jax.device_put(labels, shard)
  proxies_r = jax.device_put(proxies, replicated)
  results = []
  for name, hparams in VARIANTS:
    for proxy_valid in (None, valid):
      kw = dict(loss=name, proxy_labels=proxy_labels, proxy_valid=proxy_valid, **hparams)
      local = functools.partial(L.proxy_loss_from_embeddings, axis_name="batch", **kw)

      # (a) the gradient of the shard_map, as msjax.train takes it.
      sharded = jax.shard_map(local, mesh=mesh, in_specs=(P("batch"), P("batch"), P()),
                              out_specs=P())
      outer = jax.jit(jax.value_and_grad(sharded, argnums=(0, 2)))

      # (b) the gradient inside the shard_map, per device.
      def per_device(e, y, p):
        value, (d_emb, d_proxies) = jax.value_and_grad(local, argnums=(0, 2))(e, y, p)
        return value, d_emb, d_proxies

      inner = jax.jit(jax.shard_map(per_device, mesh=mesh,
                                    in_specs=(P("batch"), P("batch"), P()),
                                    out_specs=(P(), P("batch"), P())))

      ref_value, (ref_emb, ref_proxies) = jax.value_and_grad(
          lambda e, p: L.proxy_loss_from_embeddings(e, labels, p, **kw), argnums=(0, 1))(
              jnp.asarray(emb), jnp.asarray(proxies))
      ref_emb, ref_proxies = np.asarray(ref_emb), np.asarray(ref_proxies)
      row = dict(name=name, hparams=hparams, masked=proxy_valid is not None,
                 ref_value=float(ref_value),
                 emb_scale=float(np.abs(ref_emb).max()),
                 proxies_scale=float(np.abs(ref_proxies).max()),
                 masked_proxies_grad=float(np.abs(ref_proxies[~valid]).max())
                 if proxy_valid is not None else None)
      for how, fn in (("outer", outer), ("inner", inner)):
        try:
          if how == "outer":
            value, (d_emb, d_proxies) = fn(emb_s, labels_s, proxies_r)
          else:
            value, d_emb, d_proxies = fn(emb_s, labels_s, proxies_r)
        except Exception as e:  # noqa: BLE001 -- the report names the failure
          row[how] = dict(error=f"{type(e).__name__}: {e}"[:3000])
          continue
        row[how] = dict(
            value=float(value),
            emb_err=float(np.abs(np.asarray(d_emb) - ref_emb).max()),
            proxies_err=float(np.abs(np.asarray(d_proxies) - ref_proxies).max()),
            emb_sharding=str(d_emb.sharding.spec))
        if proxy_valid is None:  # the HLO once per loss: the mask changes no shape
          hlo = fn.lower(emb_s, labels_s, proxies_r).as_text()
          row[how]["dot_shapes"] = sorted(set(re.findall(
              r"dot_general.*?-> tensor<([0-9x]+)xf64>", hlo)))
      results.append(row)
  json.dump(dict(devices=len(jax.devices()), results=results), sys.stdout)


if __name__ == "__main__":
  main()
