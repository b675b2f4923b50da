"""Runs in its own process (virtual CPU devices must be set before JAX starts).

Three training steps of a small config on a mesh of 8 devices and on 1 device, from the
same initial state and the same batches, then the compiled step at a larger batch on
both meshes: prints one JSON line with the largest parameter difference, the losses,
the per-device temporary memory of each compiled step, and whether any ``[B, B]`` array
appears in the sharded step's HLO.

``train_sharding_check.py LOSS`` trains with another registry loss; a proxy loss trains
its proxies at ×100 the learning rate on random batches, and the larger-batch part is
skipped (its block is ``[B, C]``, not ``[B, B]``). ``train_sharding_check.py LOSS
BACKBONE`` trains another backbone (a ViT on 32-pixel images: a 2×2 patch grid, its
position embedding resampled from 14×14), also without the larger-batch part.
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


def config(p, k, backbone="small_cnn"):
  c = synthetic.get_config()
  size = 16 if backbone == "small_cnn" else 32
  c.data.synthetic.update(num_train_classes=32, num_test_classes=4, images_per_class=4,
                          image_size=size)
  c.data.update(image_size=size, classes_per_batch=p, images_per_class=k)
  c.model.backbone = backbone
  c.model.embedding_dim = 32
  return c


def run(c, mesh, batches, num_proxies):
  tx = train.build_optimizer(c.optim, 10, proxies=num_proxies is not None)
  model, state = train.init_state(c, tx, mesh, seed=0, num_proxies=num_proxies)
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
  backbone = sys.argv[2] if len(sys.argv) > 2 else "small_cnn"
  c = config(8, 2, backbone)
  c.loss.name = sys.argv[1] if len(sys.argv) > 1 else "ms"
  proxy = c.loss.name in train.losses.PROXY_NAMES
  if proxy:
    c.data.sampler = "random"
    c.optim.proxy_lr_mult = 100.0
  if backbone != "small_cnn":
    # Adam normalises near-zero gradients to steps of about lr, which turns float32
    # reduction-order noise into visible parameter differences; with eps = 1 its steps
    # follow the gradients linearly, so the parameters compare the gradients themselves.
    c.optim.update(lr=1.0, eps=1.0, weight_decay=0.0)
  ds = data_lib.load_dataset(c.data)
  num_proxies = ds.train.num_classes if proxy else None
  batches = [{k: np.array(v) for k, v in b.items()} for b in data_lib.train_batches(
      ds.train, c.data, seed=0, num_steps=3, process_index=0, process_count=1)]
  eight = sharding.make_mesh()
  one = sharding.make_mesh(jax.devices()[:1])
  p8, l8 = run(c, eight, batches, num_proxies)
  p1, l1 = run(c, one, batches, num_proxies)
  diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)))
  scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree.leaves(p1))
  tx = train.build_optimizer(c.optim, 10, proxies=proxy)
  initial = jax.device_get(train.init_state(c, tx, one, seed=0,
                                            num_proxies=num_proxies)[1]["params"])
  moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
              for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(initial)))
  result = {"devices": jax.device_count(), "max_param_diff": diff, "param_scale": scale,
            "params_moved": moved, "losses_8": l8, "losses_1": l1}
  if backbone != "small_cnn":
    print(json.dumps(result))
    return
  if proxy:
    result["proxies_moved"] = float(np.max(np.abs(p1["proxies"] - initial["proxies"])))
    result["proxies_diff"] = float(np.max(np.abs(p8["proxies"] - p1["proxies"])))
    print(json.dumps(result))
    return
  big = config(256, 4)  # B = 1024
  temp8, square8 = memory(big, eight, 1024)
  temp1, _ = memory(big, one, 1024)
  print(json.dumps({**result, "temp_bytes_8": temp8, "temp_bytes_1": temp1,
                    "square_in_sharded_hlo": square8}))


if __name__ == "__main__":
  main()
