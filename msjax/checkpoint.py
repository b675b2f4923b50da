"""Checkpoints of the training state (Orbax) and graceful stops on preemption.

``Checkpointer`` saves and restores one training run's checkpoints under a work
directory (local or ``gs://``). Every step directory holds up to three items:

- ``state``: the pytree of jax Arrays (params, batch stats, optimizer state, step, rng),
  written by Orbax's ``StandardSave`` as sharded arrays: every process writes only the
  shards it owns, and a restore reads each shard straight into the placement the caller
  asks for.
- ``data``: the input iterator state (``iterator.get_state()``), as JSON.
- ``metrics``: metrics of the latest evaluation (``{"val/recall@1": 0.61}``), as JSON.

Retention is Orbax's: a ``preservation_policy`` that keeps a checkpoint when
``LatestN(max_to_keep)`` or ``BestN(n=1)`` on ``metrics[best_metric]`` keeps it, so the
best checkpoint survives even when it is older than the latest ``max_to_keep``.

``PreemptionWatcher`` turns SIGTERM (and SIGINT) into a request to stop that every process
agrees on, so the training loop can save at that step, wait for the write, and exit 0::

  with Checkpointer(workdir / "checkpoints", best_metric="val/recall@1") as ckpt, \\
       PreemptionWatcher() as watcher:
    for step in range(start, num_steps):
      state = train_step(state, batch)
      if watcher.should_stop(step):
        ckpt.save(step, state, data_state=it.get_state(), metrics=last_eval, force=True)
        break  # the with-block waits for the write; then exit with status 0
      if step % every == 0:
        ckpt.save(step, state, data_state=it.get_state(), metrics=last_eval)

Random keys: both raw ``jax.random.PRNGKey(0)`` (``uint32[2]``) and typed
``jax.random.key(0)`` keys can be saved. A typed key is stored as its key data and comes
back typed when the abstract state says so (``jax.eval_shape`` of a typed key does).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

__all__ = ["CheckpointError", "Checkpointer", "PreemptionWatcher"]

log = logging.getLogger(__name__)

STATE, DATA, METRICS = "state", "data", "metrics"  # item (sub-directory) names
_MISMATCH_HINT = ("This workdir was trained with a different config; use a new "
                  "--workdir or the same config.")


class _DropMessage(logging.Filter):
  """Drops log records whose message contains ``text``."""

  def __init__(self, text: str):
    super().__init__()
    self.text = text

  def filter(self, record: logging.LogRecord) -> bool:
    return self.text not in record.getMessage()


class CheckpointError(ValueError):
  """A checkpoint cannot be restored (or saved); the message says what to do. ``leaf``
  names the state's leaf (``flat_tree``'s key) where a restore's tree differed, if any."""

  def __init__(self, message: str, *, leaf: str | None = None):
    super().__init__(message)
    self.leaf = leaf


class Checkpointer:
  """Saves, prunes and restores the checkpoints of one training run.

  Call every method on every process of a multi-process run (Orbax synchronizes the
  processes and writes shared files from one of them). Not thread-safe.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               best_metric: str | None = None,
               best_mode: Literal["max", "min"] = "max", keep_best: bool = True,
               async_save: bool = True, read_only: bool = False):
    """Opens (creating it if needed) the checkpoint directory.

    Args:
      directory: where the step directories go, local or ``gs://...``.
      max_to_keep: how many of the latest checkpoints to keep (at least 1).
      best_metric: key of ``metrics`` that ranks checkpoints (e.g. ``"val/recall@1"``);
        None: no ranking, ``best_step()`` is None.
      best_mode: ``"max"`` if a larger ``metrics[best_metric]`` is better, else ``"min"``.
      keep_best: also keep the best checkpoint when it is older than the latest
        ``max_to_keep`` (needs ``best_metric``).
      async_save: ``save`` returns once the arrays are copied to host memory and the
        files are written in a background thread; False writes before returning.
      read_only: only read (restore, list, rank): nothing is created, and the temporary
        directories of unfinished saves are left alone, because a training run may be
        writing one right now (exporting or evaluating a run while it trains).
        ``save`` is then an error.
    """
    if max_to_keep < 1:
      raise CheckpointError(f"max_to_keep must be at least 1, got {max_to_keep}.")
    if best_mode not in ("max", "min"):
      raise CheckpointError(f"best_mode must be 'max' or 'min', got {best_mode!r}.")
    self.best_metric = best_metric
    self.best_mode = best_mode
    path = os.fspath(directory)
    # Orbax wants absolute paths; gs:// and other URIs are left alone.
    self.directory = epath.Path(path if "://" in path else os.path.abspath(path))

    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
    if best_metric is not None and keep_best:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=self._rank, reverse=(best_mode == "min"), n=1,
          # A checkpoint without the metric (saved before any evaluation, or with a
          # NaN) ranks below every real value (see _rank), and one without a metrics
          # file at all is not a candidate: LatestN alone decides on those.
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        # Orbax writes the "metrics" item only when best_fn is set, and ranks by it in
        # best_step(); retention is decided by the preservation_policy alone.
        best_fn=self._rank, best_mode=best_mode,
        enable_async_checkpointing=async_save,
        # Half-written step directories of a killed save are never restorable; drop
        # them so they don't accumulate (finished checkpoints are not touched).
        cleanup_tmp_directories=not read_only,
        create=not read_only, read_only=read_only,
        # Orbax warns about every saving option a read-only manager ignores.
        **({"save_interval_steps": 0} if read_only else {}))
    self.read_only = read_only
    # Naming each item's handler up front lets a fresh process read a checkpoint's
    # metadata (to check it against the state) before anything was saved.
    registry = ocp.handlers.create_default_handler_registry(**{
        STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler()})
    # A read-only manager logs that its directory is read-only, which is what was asked.
    notice = _DropMessage("is read only")
    logging.getLogger("absl").addFilter(notice)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            handler_registry=registry)
    finally:
      logging.getLogger("absl").removeFilter(notice)

  # ----------------------------------------------------------------------------------
  # Saving.

  def save(self, step: int, state: Any, *, data_state: Mapping[str, Any] | None = None,
           metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """Saves ``state`` (and the iterator state and metrics) as checkpoint ``step``.

    With ``async_save`` this returns once the arrays are copied off the devices (the
    caller may then donate or overwrite them); the files are written in the background
    and a later ``save``, ``wait``, ``restore`` or ``close`` waits for them. Older
    checkpoints that retention no longer keeps are deleted after the write commits.

    Args:
      step: the training step; the directory is ``<directory>/<step>``.
      state: pytree of jax Arrays (numpy arrays and Python scalars also work).
      data_state: JSON-serializable input iterator state, or None.
      metrics: JSON-serializable metrics of the latest evaluation, or None. Ranks the
        checkpoint by ``metrics[best_metric]``.
      force: save even if ``step`` is not after the latest saved step.

    Returns:
      True if a checkpoint was started; False if ``step`` is already saved (e.g. a
      preemption save right after a periodic one) or, without ``force``, not after the
      latest saved step.
    """
    if self.read_only:
      raise CheckpointError(f"{self.directory} was opened read-only; open it with "
                            "read_only=False to save.")
    step = int(step)
    if step in self._manager.all_steps():
      log.info("checkpoint %d already exists in %s; not saving again", step,
               self.directory)
      return False
    items = {STATE: ocp.args.StandardSave(state)}
    if data_state is not None:
      items[DATA] = ocp.args.JsonSave(_checked_json("data_state", data_state))
    # Always some metrics: Orbax warns on every save without them once best_fn is set
    # (and it always is, see __init__); an empty dict reads back as None.
    metrics = _checked_json("metrics", _to_python(dict(metrics or {})))
    return self._manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                              force=force)

  def wait(self) -> None:
    """Blocks until every started save is written (raises a failed write's error)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and deletions, then releases Orbax's resources."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # ----------------------------------------------------------------------------------
  # What is on disk.

  def all_steps(self) -> list[int]:
    """The saved (committed) steps, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The highest saved step, or None if there is none."""
    return self._manager.latest_step()

  def best_step(self) -> int | None:
    """The saved step with the best ``metrics[best_metric]`` (the latest among ties).

    None without ``best_metric`` or when no saved checkpoint has that metric. Only
    checkpoints still on disk count: with ``keep_best=False`` a better one may have been
    deleted.
    """
    if self.best_metric is None:
      return None
    step = self._manager.best_step()
    if step is None or not math.isfinite(self._rank(self._manager.metrics(step))):
      return None  # no checkpoint carries the metric (ranked below every real value)
    return step

  def step_dir(self, step: int) -> epath.Path:
    """The directory of checkpoint ``step``."""
    return self.directory / str(int(step))

  def metrics(self, step: int) -> dict[str, Any] | None:
    """The metrics saved with checkpoint ``step`` (None if it has none)."""
    return self._manager.metrics(int(step)) or None

  # ----------------------------------------------------------------------------------
  # Restoring.

  def saved_shape(self, name: str, step: int | None = None) -> tuple[int, ...] | None:
    """The shape of leaf ``name`` (``flat_tree``'s key) saved at ``step`` (default: the
    latest), read from the metadata; None when there is no checkpoint or no such leaf."""
    steps = self.all_steps()
    if not steps:
      return None
    try:
      saved = self._manager.item_metadata(steps[-1] if step is None else int(step))
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged step.
      raise self._unreadable(self.step_dir(steps[-1] if step is None else int(step)),
                             steps, e) from e
    tree = saved[STATE] if STATE in saved else None
    leaves = {_path_name(p): leaf for p, leaf in
              jax.tree_util.tree_flatten_with_path(getattr(tree, "tree", tree))[0]}
    return tuple(leaves[name].shape) if name in leaves else None

  def restore(self, step: int | None = None, *, abstract_state: Any
              ) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """Reads checkpoint ``step`` (default: the latest) into the layout of ``abstract_state``.

    Waits for pending saves first, then checks the saved tree against
    ``abstract_state`` (from its metadata, without reading arrays) and reads every
    array directly into the sharding its abstract leaf names; each process reads only
    the shards it holds. Nothing on disk is changed, whether the restore succeeds or not.

    Args:
      step: the step to restore; None restores ``latest_step()``.
      abstract_state: the state's pytree with ``jax.ShapeDtypeStruct`` leaves carrying
        ``sharding`` (e.g. ``jax.eval_shape(init)`` with shardings added); arrays come
        back with these shapes, dtypes, shardings and this pytree structure. Concrete
        jax Arrays are accepted too (their shape, dtype and sharding are used). On one
        process a leaf without a sharding goes to the first device.

    Returns:
      ``(state, data_state, metrics)``; ``data_state`` and ``metrics`` are None if the
      checkpoint has none.

    Raises:
      CheckpointError: the directory has no checkpoint, ``step`` is not saved, the
        checkpoint's tree, shapes or dtypes differ from ``abstract_state``, or the step
        directory cannot be read (missing or damaged files).
    """
    self.wait()
    steps = self.all_steps()
    if not steps:
      raise CheckpointError(
          f"There is no checkpoint in {self.directory} to restore. Start without "
          "restoring (train from scratch), or point to the directory of the run to "
          "resume.")
    if step is None:
      step = steps[-1]
    step = int(step)
    if step not in steps:
      raise CheckpointError(
          f"There is no checkpoint for step {step} in {self.directory}; the saved "
          f"steps are {steps}. Pass one of them, or None for the latest.")
    step_dir = self.step_dir(step)
    abstract_state = _with_shardings(abstract_state)

    try:
      saved = self._manager.item_metadata(step)
      saved_tree = saved[STATE] if STATE in saved else None
    except Exception as e:  # noqa: BLE001 - any read failure means a damaged step.
      raise self._unreadable(step_dir, steps, e) from e
    if saved_tree is None:
      raise self._unreadable(step_dir, steps, FileNotFoundError(
          f"no readable '{STATE}' item (its metadata is missing)"))
    _check_matches(getattr(saved_tree, "tree", saved_tree), abstract_state, step_dir)

    items = {STATE: ocp.args.StandardRestore(abstract_state)}
    if (step_dir / DATA).exists():
      items[DATA] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      metrics = self.metrics(step)
    except Exception as e:  # noqa: BLE001 - reported with the step directory.
      raise self._unreadable(step_dir, steps, e) from e
    data_state = restored[DATA] if DATA in items else None
    return restored[STATE], data_state, metrics

  # ----------------------------------------------------------------------------------
  # Helpers.

  def _rank(self, metrics: Any) -> float:
    """The ranking value of a checkpoint's metrics; missing or NaN ranks worst."""
    worst = -math.inf if self.best_mode == "max" else math.inf
    if self.best_metric is None or not isinstance(metrics, Mapping):
      return worst
    try:
      value = float(metrics[self.best_metric])
    except (KeyError, TypeError, ValueError):
      return worst
    return worst if math.isnan(value) else value

  @staticmethod
  def _unreadable(step_dir: epath.Path, steps: list[int],
                  error: BaseException) -> CheckpointError:
    """The error for a step directory that cannot be read back."""
    others = [s for s in steps if str(s) != step_dir.name]
    # Tensorstore appends its whole JSON spec to an error; the first part says enough.
    detail = f"{type(error).__name__}: {error}".split(" [tensorstore_spec=")[0]
    if len(detail) > 600:
      detail = detail[:600] + " ..."
    return CheckpointError(
        f"Could not read the checkpoint in {step_dir}; files in it are missing or "
        f"damaged ({detail}). Nothing was changed on disk. Restore another step "
        f"(saved: {others}), or move this step directory away and restore the latest.")


def select_step(workdir, *, best_metric: str, step: int | None = None,
                best: bool = False) -> tuple[int, dict[str, Any] | None]:
  """``(step, its metrics)`` of the checkpoint a user asked for in ``workdir``: ``step``,
  the best by ``best_metric`` (``best``), or else the latest.

  The checkpoints are opened read-only: the run may still be training, and its save in
  progress must not be taken for a killed one and cleaned up. A ``CheckpointError`` says
  what is there instead: no checkpoint yet, no such step, or none ranked by the metric.
  """
  if step is not None and best:
    raise CheckpointError("pass --step or --best, not both.")
  directory = epath.Path(workdir) / "checkpoints"
  none_yet = CheckpointError(
      f"{workdir} has no checkpoint yet: train first (python -m msjax.main --config ... "
      f"--workdir {workdir}), or pass the workdir of a run that saved one.")
  if not directory.is_dir():
    raise none_yet  # checked before opening, which would create it
  with Checkpointer(directory, best_metric=best_metric, read_only=True) as ckpt:
    saved = ckpt.all_steps()
    if not saved:
      raise none_yet
    if best:
      step = ckpt.best_step()
      if step is None:
        raise CheckpointError(
            f"no checkpoint in {directory} was saved with the metric {best_metric} (the "
            f"saved steps are {saved}); pass --step N, or neither --step nor --best for "
            "the latest.")
    elif step is None:
      step = saved[-1]
    elif step not in saved:
      raise CheckpointError(f"--step {step}: {directory} has no such checkpoint; the saved "
                            f"steps are {saved}. Pass one of them, or no --step for the "
                            "latest.")
    return step, ckpt.metrics(step)


def _checked_json(what: str, value: Any) -> Any:
  """``value`` if ``json.dumps`` accepts it; else a CheckpointError before any writing."""
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{what} must be JSON-serializable (dicts, lists, str, "
                          f"numbers): {e}") from e
  return value


def _to_python(tree: Any) -> Any:
  """Numpy and jax scalars in a metrics dict as Python numbers, so JSON accepts them."""
  def leaf(x):
    if isinstance(x, (jax.Array, np.ndarray, np.generic)) and np.ndim(x) == 0:
      return np.asarray(x).item()
    return x
  return jax.tree.map(leaf, tree)


def _with_shardings(abstract_state: Any) -> Any:
  """Abstract leaves with a sharding each (jax Arrays are turned into abstract ones)."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      if jax.process_count() > 1:
        raise CheckpointError(
            "abstract_state has a leaf without a sharding; on several processes every "
            "leaf needs one (e.g. a replicated NamedSharding on the mesh).")
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(leaf, abstract_state)


def _path_name(path) -> str:
  """A key path as ``a/0/b``, the same for a dict, a namedtuple and Orbax's metadata."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _stored_shape_dtype(x: Any) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype an abstract leaf has on disk (a typed key is saved as key data)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return tuple(x.shape), np.dtype(x.dtype)


def _check_matches(saved_tree: Any, abstract_state: Any, step_dir: epath.Path) -> None:
  """Raises a CheckpointError naming the first leaf where the saved tree differs."""
  saved = {_path_name(p): leaf for p, leaf in
           jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
  wanted = {_path_name(p): leaf for p, leaf in
            jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
  head = (f"The checkpoint in {step_dir} does not match the state being restored "
          "into:")
  for name, leaf in wanted.items():
    if name not in saved:
      raise CheckpointError(f"{head} '{name}' is in the state but not in the "
                            f"checkpoint. {_MISMATCH_HINT}", leaf=name)
    shape, dtype = _stored_shape_dtype(leaf)
    have_shape = tuple(getattr(saved[name], "shape", ()) or ())
    have_dtype = getattr(saved[name], "dtype", None)
    if have_shape != shape or (have_dtype is not None
                               and np.dtype(have_dtype) != dtype):
      raise CheckpointError(
          f"{head} '{name}' has shape {have_shape} {have_dtype} in the checkpoint but "
          f"{shape} {dtype} in the state. {_MISMATCH_HINT}", leaf=name)
  extra = [name for name in saved if name not in wanted]
  if extra:
    raise CheckpointError(f"{head} '{extra[0]}' is in the checkpoint but not in the "
                          f"state. {_MISMATCH_HINT}", leaf=extra[0])


class PreemptionWatcher:
  """Turns SIGTERM/SIGINT into one agreed step at which every process stops.

  - One process: a signal handler sets a flag; ``should_stop`` returns it.
  - Several processes with JAX's preemption service (``jax.distributed.initialize``
    with ``jax_enable_preemption_service``, the default): JAX's own notifier catches
    SIGTERM on any process and ``should_stop(step)`` is
    ``multihost_utils.reached_preemption_sync_point(step)``, true on every process at
    the same step. No Python SIGTERM handler is installed (it would replace JAX's);
    SIGINT is forwarded to it as a SIGTERM of this process.
  - Several processes without the service: the flag of every process is gathered every
    ``sync_every`` steps (one small cross-process collective), and all stop when any has
    it.

  Call ``should_stop`` on every process once per step, with the same increasing step.
  Construct and close it on the main thread (Python only runs signal handlers there).
  """

  def __init__(self, *, sigint: bool = True, sync_every: int = 10):
    """Installs the signal handlers.

    Args:
      sigint: also treat SIGINT (Ctrl-C) as a request to stop; a second SIGINT raises
        KeyboardInterrupt at once.
      sync_every: only for several processes without JAX's preemption service: how
        often (in steps) the processes compare their flags.
    """
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("PreemptionWatcher must be created on the main thread, "
                         "where Python runs signal handlers.")
    self._flag = threading.Event()
    self._sync_every = max(1, int(sync_every))
    self._jax_service = (jax.process_count() > 1
                         and bool(jax.config.jax_enable_preemption_service))
    self._previous: dict[int, Any] = {}
    if not self._jax_service:
      self._install(signal.SIGTERM, self._on_sigterm)
    if sigint:
      self._install(signal.SIGINT, self._on_sigint)

  @property
  def signal_received(self) -> bool:
    """Whether this process got SIGTERM/SIGINT (not yet agreed with other processes)."""
    return self._flag.is_set()

  def should_stop(self, step: int) -> bool:
    """True when every process should save at ``step`` and exit (the same on all)."""
    if self._jax_service:
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    if jax.process_count() == 1:
      return self._flag.is_set()
    if int(step) % self._sync_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self._flag.is_set()))
    return bool(np.any(flags))

  def close(self) -> None:
    """Puts back the signal handlers that were installed before."""
    while self._previous:
      signum, handler = self._previous.popitem()
      signal.signal(signum, handler)

  def __enter__(self) -> PreemptionWatcher:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _install(self, signum: int, handler) -> None:
    """Installs ``handler`` for ``signum``, remembering the previous one."""
    previous = signal.signal(signum, handler)
    # A handler set outside Python (None) cannot be put back; the default is closest.
    self._previous[signum] = signal.SIG_DFL if previous is None else previous

  def _on_sigterm(self, signum, frame) -> None:
    """Records the request; the loop stops at its next ``should_stop``."""
    del signum, frame
    self._flag.set()

  def _on_sigint(self, signum, frame) -> None:
    """First Ctrl-C: stop gracefully (as SIGTERM would); second: interrupt now."""
    del frame
    if self._flag.is_set():
      raise KeyboardInterrupt
    self._flag.set()
    if self._jax_service:
      # JAX's preemption notifier only listens to SIGTERM; hand the request to it so
      # that all processes agree on the step.
      os.kill(os.getpid(), signal.SIGTERM)
    log.warning("Got signal %d: saving a checkpoint and stopping at the next step "
                "(press Ctrl-C again to stop at once).", signum)
