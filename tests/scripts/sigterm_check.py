"""A fake training loop that stops cleanly on SIGTERM: saves at that step, exits 0.

  python sigterm_check.py DIR                   one process
  python sigterm_check.py DIR PROCESS_ID PORT   one of two jax.distributed processes
  python sigterm_check.py DIR PROCESS_ID PORT noservice
                                                the same without JAX's preemption service

Each step takes 0.05 s and a checkpoint is saved every 50 steps. At step 5 the script
prints ``ready``; after the signal it saves at the step where ``PreemptionWatcher`` says
to stop (the same step on both processes), waits for the write and prints one JSON line
``{"process": i, "stopped_at": step}``. Without a signal it gives up after 30 s (exit 3).
"""

import json
import sys
import time

import jax

two_processes = len(sys.argv) > 2
if two_processes:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if sys.argv[4:] == ["noservice"]:
    jax.config.update("jax_enable_preemption_service", False)
  jax.distributed.initialize(f"localhost:{sys.argv[3]}", num_processes=2,
                             process_id=int(sys.argv[2]), initialization_timeout=120)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from msjax.checkpoint import Checkpointer, PreemptionWatcher  # noqa: E402

MAX_STEPS = 600


def replicated(value, sharding):
  """A global array holding ``value`` on every device of ``sharding`` (any process)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def main():
  directory = sys.argv[1]
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, PartitionSpec())
  state = {"w": replicated(np.arange(6, dtype=np.float32), sharding),
           "step": replicated(np.int32(0), sharding)}
  bump = jax.jit(lambda s: {"w": s["w"] + 1, "step": s["step"] + 1},
                 out_shardings=sharding)
  with Checkpointer(directory, max_to_keep=2) as ckpt, PreemptionWatcher() as watcher:
    for step in range(1, MAX_STEPS + 1):
      state = bump(state)
      time.sleep(0.05)
      if step == 5:
        print("ready", flush=True)
      if watcher.should_stop(step):
        ckpt.save(step, state, data_state={"step": step}, force=True)
        ckpt.wait()
        break
      if step % 50 == 0:
        ckpt.save(step, state, data_state={"step": step})
    else:
      sys.exit(3)
  print(json.dumps({"process": jax.process_index(), "stopped_at": step}), flush=True)
  if two_processes:
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
