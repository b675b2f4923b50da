"""Runs in its own process (virtual CPU devices must be set before JAX starts).

Three training steps of a small config on a mesh of 8 devices and on 1 device, from the
same initial state and the same batches, then the compiled step at a larger batch on
both meshes: prints one JSON line with the largest parameter difference, the losses,
the per-device temporary memory of each compiled step, and whether any ``[B, B]`` array
appears in the sharded step's HLO.
"""

import json
import pathlib
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from msjax import sharding, train  # noqa: E402
from msjax import data as data_lib  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "configs"))
import synthetic  # noqa: E402


def config(p, k):
  c = synthetic.get_config()
  c.data.synthetic.update(num_train_classes=32, num_test_classes=4, images_per_class=4,
                          image_size=16)
  c.data.update(image_size=16, classes_per_batch=p, images_per_class=k)
  c.model.embedding_dim = 32
  return c


def run(c, mesh, batches):
  tx = train.build_optimizer(c.optim, 10)
  model, state = train.init_state(c, tx, mesh, seed=0)
  step = train.make_train_step(model, tx, mesh, c.loss)
  losses = []
  for b in batches:
    g = data_lib.to_global(b, mesh)
    state, metrics = step(state, g["image"], g["label"])
    losses.append(float(metrics["loss"]))
  return jax.device_get(state["params"]), losses


def memory(c, mesh, batch):
  tx = train.build_optimizer(c.optim, 10)
  model, state = train.init_state(c, tx, mesh, seed=0)
  step = train.make_train_step(model, tx, mesh, c.loss)
  images = jax.ShapeDtypeStruct((batch, 16, 16, 3), jnp.uint8,
                                sharding=sharding.batch_sharded(mesh))
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding.batch_sharded(mesh))
  lowered = step.lower(state, images, labels)
  mem = lowered.compile().memory_analysis()
  hlo = lowered.compile().as_text()
  square = bool(re.search(rf"\[{batch},{batch}\]", hlo))
  return int(mem.temp_size_in_bytes), square


def main():
  c = config(8, 2)
  ds = data_lib.load_dataset(c.data)
  batches = [{k: np.array(v) for k, v in b.items()} for b in data_lib.train_batches(
      ds.train, c.data, seed=0, num_steps=3, process_index=0, process_count=1)]
  eight = sharding.make_mesh()
  one = sharding.make_mesh(jax.devices()[:1])
  p8, l8 = run(c, eight, batches)
  p1, l1 = run(c, one, batches)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)))
  scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(p1))
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(
                  jax.device_get(train.init_state(c, train.build_optimizer(c.optim, 10),
                                                  one, seed=0)[1]["params"]))))
  big = config(256, 4)  # B = 1024
  temp8, square8 = memory(big, eight, 1024)
  temp1, _ = memory(big, one, 1024)
  print(json.dumps({"devices": jax.device_count(), "max_param_diff": diff,
                    "param_scale": scale, "params_moved": moved, "losses_8": l8,
                    "losses_1": l1, "temp_bytes_8": temp8, "temp_bytes_1": temp1,
                    "square_in_sharded_hlo": square8}))


if __name__ == "__main__":
  main()
