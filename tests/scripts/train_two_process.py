"""One of two processes (``python train_two_process.py PROCESS_ID PORT [xbm]``), or, with
``PROCESS_ID = -1``, the same run in one process.

Joins through ``msjax.sharding.initialize`` (the path ``python -m msjax.main`` takes with
``--coordinator_address``), runs two training steps of a small synthetic config with
each process feeding its half of every batch, and prints one JSON line: the losses and
a checksum of every parameter. With ``xbm``, three steps with a cross-batch memory of 24
entries that joins at the second step and wraps at the third, and the memory's checksum.
"""

import json
import pathlib
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port = int(sys.argv[1]), sys.argv[2]
with_xbm = sys.argv[3:] == ["xbm"]

from msjax import sharding, train  # noqa: E402
from msjax import data as data_lib  # noqa: E402

if process_id >= 0:
  sharding.initialize(f"localhost:{port}", 2, process_id)

sys.path.insert(0, str(pathlib.Path(__file__).parents[2] / "configs"))
import synthetic  # noqa: E402
import numpy as np  # noqa: E402


def main():
  c = synthetic.get_config()
  c.data.synthetic.update(num_train_classes=16, num_test_classes=4, images_per_class=4,
                          image_size=16)
  c.data.update(image_size=16, classes_per_batch=8, images_per_class=2)
  c.model.embedding_dim = 16
  steps = 3 if with_xbm else 2
  c.xbm.update(enabled=with_xbm, size=24, start_step=1)
  mesh = sharding.make_mesh()
  tx = train.build_optimizer(c.optim, steps)
  model, state = train.init_state(c, tx, mesh, seed=0)
  step = train.make_train_step(model, tx, mesh, c.loss, c.xbm if with_xbm else None)
  ds = data_lib.load_dataset(c.data)
  batches = data_lib.GlobalBatches(
      data_lib.train_batches(ds.train, c.data, seed=0, num_steps=steps), mesh)
  losses = []
  for batch in batches:
    state, metrics = step(state, batch["image"], batch["label"])
    losses.append(float(metrics["loss"]))
  params = jax.tree.leaves(state["params"])
  checksum = [float(np.asarray(jax.device_get(p.addressable_data(0)), np.float64).sum())
              for p in params]
  out = {"process": jax.process_index(), "processes": jax.process_count(),
         "losses": losses, "checksum": checksum}
  if with_xbm:
    memory = jax.device_get(state["memory"]._replace(
        embeddings=state["memory"].embeddings.addressable_data(0),
        labels=state["memory"].labels.addressable_data(0)))
    out["memory"] = {"embeddings": float(np.asarray(memory.embeddings, np.float64).sum()),
                     "labels": np.asarray(memory.labels).tolist(),
                     "pointer": int(memory.pointer), "filled": int(memory.filled)}
  print(json.dumps(out))
  if process_id >= 0:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
