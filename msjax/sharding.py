"""The device mesh, array placement, and multi-host start-up.

One mesh axis, ``"batch"``, spans every device of every process: the global P×K batch is
split along it, parameters and optimiser state are replicated (an FSDP axis can be added
later without touching the step). Each process feeds its own contiguous slice of the
batch (``msjax.data.GlobalBatches``).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"

# Environment variables that mean "this is one process of several" on the platforms
# jax.distributed.initialize() detects by itself (Cloud TPU VM slices, SLURM, Open MPI).
_MULTI_PROCESS_HINTS = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _several_processes_hinted() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return True
  return any(int(os.environ.get(k, "1") or 1) > 1 for k in _MULTI_PROCESS_HINTS[1:])


# What a launcher sets when the platform cannot say (GPU hosts, or a TPU slice's processes
# simulated on one machine by ``launch/tpu.py train --local-processes N``).
COORDINATOR_ENV = ("MSJAX_COORDINATOR_ADDRESS", "MSJAX_NUM_PROCESSES", "MSJAX_PROCESS_ID")


def _on_cloud_tpu_vm() -> bool:
  """Whether this host has Google TPU chips on its PCI bus (a Cloud TPU VM), asked the
  way JAX itself asks, without the network. On a TPU VM, ``jax.distributed.initialize()``
  learns the slice's hosts from the VM's metadata."""
  try:
    from jax._src import hardware_utils
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # noqa: BLE001 - a JAX without this helper: rely on the hints
    return False


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins the processes of a multi-host run; a no-op for a single process.

  The coordinator comes from the arguments (``--coordinator_address`` etc.), else from
  ``MSJAX_COORDINATOR_ADDRESS``, ``MSJAX_NUM_PROCESSES`` and ``MSJAX_PROCESS_ID``. Without
  either, on a Cloud TPU VM (one host or a slice of many), under SLURM or Open MPI,
  ``jax.distributed.initialize()`` finds its peers itself, so ``python -m msjax.main``
  needs no extra flags there.
  """
  if not coordinator_address and os.environ.get(COORDINATOR_ENV[0]):
    address, count, index = (os.environ.get(k, "") for k in COORDINATOR_ENV)
    if not (count.isdigit() and index.isdigit()):
      raise ValueError(f"{COORDINATOR_ENV[0]}={address} needs {COORDINATOR_ENV[1]} and "
                       f"{COORDINATOR_ENV[2]} as integers, got {count!r} and {index!r}.")
    coordinator_address, num_processes, process_id = address, int(count), int(index)
  if coordinator_address or _several_processes_hinted():
    # CPU processes exchange collectives through gloo; the setting is inert elsewhere.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _several_processes_hinted() or _on_cloud_tpu_vm():
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  """A one-axis mesh (``"batch"``) over ``devices`` (default: every device)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh, batch_axis=None) -> NamedSharding:
  """Leading dimension split over ``batch_axis`` (default: every axis of ``mesh``, which
  for ``make_mesh``'s mesh is ``"batch"``)."""
  axis = tuple(mesh.axis_names) if batch_axis is None else batch_axis
  return NamedSharding(mesh, PartitionSpec(axis))


def replicate(tree, mesh: Mesh):
  """Places every array of ``tree`` on every device of ``mesh`` (multi-host safe)."""
  sharding = replicated(mesh)

  def put(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    host = np.asarray(jax.device_get(x))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

  return jax.tree.map(put, tree)
