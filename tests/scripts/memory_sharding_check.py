"""Runs in its own process (virtual CPU devices must be set before JAX starts).

Prints one JSON line comparing consecutive XBM steps (``msjax.memory.global_xbm_loss``)
on 8 virtual devices with the same steps on a 1-device mesh, the memory carried from
step to step on each: the loss parts, the gradient w.r.t. the batch, the memory after
every step, and the result shapes of the dot_generals in the 8-device step's HLO.
"""

import json
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from msjax import memory as xbm  # noqa: E402
from msjax import telemetry  # noqa: E402

# 4 rows per device; a memory of 56 (not a multiple of 32) wraps mid-batch; 2 warm-up steps.
BATCH, DIM, SIZE, START, NUM_STEPS, WEIGHT = 32, 8, 56, 2, 7, 0.5


def make_steps(seed):
  """P×K batches (8 classes × 4 of 12), one exact duplicate and one single-image class."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(12, DIM))
  steps = []
  for t in range(NUM_STEPS):
    labels = np.repeat(rng.choice(12, 8, replace=False), 4).astype(np.int32)
    emb = centres[labels] + 1.2 * rng.normal(size=(BATCH, DIM))
    if t == 3:
      emb[9] = emb[8]
      labels[-1] = 100
    steps.append((emb / np.linalg.norm(emb, axis=1, keepdims=True), labels))
  return steps


def xbm_step(mesh, name, memory_block_size):
  fn = xbm.sharded_xbm_loss(mesh, "batch", weight=WEIGHT, loss=name,
                            memory_block_size=memory_block_size)

  def total(emb, labels, memory, active):
    out = fn(emb, labels, memory, active)
    return out.total, out

  return jax.jit(jax.value_and_grad(total, has_aux=True))


def same_bits(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def run(name, memory_block_size, dtype, memory_dtype, steps):
  mesh8 = jax.make_mesh((8,), ("batch",))
  mesh1 = Mesh(np.array(jax.devices()[:1]), ("batch",))
  step8, step1 = xbm_step(mesh8, name, memory_block_size), xbm_step(mesh1, name,
                                                                     memory_block_size)
  shard, replicated = NamedSharding(mesh8, P("batch")), NamedSharding(mesh8, P())
  mem8 = jax.device_put(xbm.create(SIZE, DIM, memory_dtype), replicated)
  mem1 = jax.device_put(xbm.create(SIZE, DIM, memory_dtype), NamedSharding(mesh1, P()))
  out_steps, dot_shapes, filled, active_flags = [], None, [], []
  for t, (emb, labels) in enumerate(steps):
    emb = emb.astype(dtype)
    active = np.bool_(t >= START)
    args8 = (jax.device_put(emb, shard), jax.device_put(labels, shard), mem8, active)
    (total, out), grad = step8(*args8)
    (ref_total, ref), ref_grad = step1(jnp.asarray(emb), jnp.asarray(labels), mem1, active)
    if dot_shapes is None:
      hlo = step8.lower(*args8).as_text()
      dot_shapes = sorted(set(re.findall(
          r"dot_general.*?-> tensor<([0-9x]+)x(?:f64|f32|bf16)>", hlo)))
    mem8, mem1 = out.new_memory, ref.new_memory
    grad_sharding = str(grad.sharding.spec)
    grad, ref_grad = np.asarray(grad, np.float64), np.asarray(ref_grad, np.float64)
    out_steps.append(dict(
        step=t, active=bool(active), total=float(total), ref_total=float(ref_total),
        batch=float(out.batch), ref_batch=float(ref.batch), memory=float(out.memory),
        ref_memory=float(ref.memory), grad_err=float(np.abs(grad - ref_grad).max()),
        grad_scale=float(np.abs(ref_grad).max()),
        grad_sharding=grad_sharding,
        # Every device's copy of the replicated memory, not only the gathered value.
        memory_identical=all(same_bits(shard.data, b) for a, b in zip(mem8, mem1)
                             for shard in a.addressable_shards)))
    filled.append(int(mem1.filled))
    active_flags.append(bool(active))
  enqueued = BATCH * sum(active_flags)
  # The memory-pair telemetry of the last step, sharded and on one device.
  tele8 = telemetry.make_memory_telemetry_fn(mesh8, name, {})
  tele1 = telemetry.make_memory_telemetry_fn(mesh1, name, {})
  (scalars8, hists8), (scalars1, hists1) = jax.device_get(
      (tele8(args8[0], args8[1], mem8), tele1(jnp.asarray(emb), jnp.asarray(labels), mem1)))
  telemetry_diff = max(abs(float(scalars8[k]) - float(scalars1[k]))
                       / max(abs(float(scalars1[k])), 1e-30)
                       for k in scalars1 if np.isfinite(scalars1[k]))
  return dict(name=name, memory_block_size=memory_block_size, dtype=np.dtype(dtype).name,
              memory_dtype=str(jnp.dtype(memory_dtype)), batch=BATCH, memory_size=SIZE,
              devices=8, active=active_flags, filled=filled, wrapped=enqueued > SIZE,
              dot_shapes=dot_shapes, steps=out_steps, telemetry_rel_diff=telemetry_diff,
              telemetry_histograms_equal=all(np.array_equal(hists8[k], hists1[k])
                                             for k in hists1),
              telemetry_neg_pairs=int(sum(hists1["neg_sim"])),
              # Counted here with NumPy: anchors × filled slots of another label.
              expected_neg_pairs=int((np.asarray(labels)[:, None] != np.asarray(
                  mem1.labels)[None, :int(mem1.filled)]).sum()),
              telemetry_nan_keys=sorted(k for k in scalars1 if not np.isfinite(scalars1[k])))


def main():
  steps = make_steps(0)
  runs = []
  for name in ("ms", "contrastive"):
    for memory_block_size in (None, 3):
      runs.append(run(name, memory_block_size, np.float64, jnp.float64, steps))
  runs.append(run("ms", None, np.float32, jnp.bfloat16, steps))
  json.dump(dict(devices=len(jax.devices()), runs=runs), sys.stdout)


if __name__ == "__main__":
  main()
