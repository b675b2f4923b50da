"""Tests of msjax.checkpoint: round trips, retention, async saves, errors, preemption."""

from __future__ import annotations

import gc
import glob
import json
import os
import re
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from msjax.checkpoint import CheckpointError, Checkpointer, PreemptionWatcher

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "sigterm_check.py")


def one_device_sharding():
  """A replicated NamedSharding on a one-device mesh (what the trainer uses on 1 chip)."""
  return NamedSharding(Mesh(np.asarray(jax.devices()[:1]), ("data",)), PartitionSpec())


def make_state(seed=0, dim=8):
  """A training-state-like pytree: params, batch stats, adam state, step and two keys."""
  rng = np.random.default_rng(seed)
  params = {"backbone": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)),
                                                        jnp.float32)},
                         "bn": {"scale": jnp.asarray(rng.normal(size=4), jnp.bfloat16)}},
            "head": {"kernel": jnp.asarray(rng.normal(size=(4, dim)), jnp.float32),
                     "bias": jnp.zeros(dim, jnp.float32)}}
  opt_state = optax.adam(1e-3).init(params)
  # Non-zero moments and count, so a restore that reads the wrong thing shows.
  opt_state = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(), x.dtype)
                           if x.dtype != jnp.int32 else x + 7, opt_state)
  return {"params": params,
          "batch_stats": {"bn": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32)}},
          "opt_state": opt_state,
          "step": jnp.int32(123),
          "rng": jax.random.PRNGKey(seed + 1),
          "key": jax.random.key(seed + 2)}


def abstract_of(state, sharding):
  """The state's abstract tree (``jax.eval_shape``) with ``sharding`` on every leaf."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      jax.eval_shape(lambda: state))


def raw(x):
  """Bytes, dtype and shape of an array (key data for a typed key)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return ("key", str(x.dtype), raw(jax.random.key_data(x)))
  a = np.asarray(x)
  return (str(a.dtype), a.shape, a.tobytes())


def assert_bitwise_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert raw(g) == raw(w)


def steps_on_disk(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_round_trip_is_bitwise_with_the_requested_sharding(tmp_path):
  state = make_state()
  data_state = {"next_index": 17, "epoch": [1, 2], "name": "train"}
  metrics = {"val/recall@1": np.float32(0.625), "val/map@r": 0.25}
  sharding = one_device_sharding()
  with Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.save(10, state, data_state=data_state, metrics=metrics)
  with Checkpointer(tmp_path / "ckpt") as ckpt:  # a fresh process resuming
    got, got_data, got_metrics = ckpt.restore(abstract_state=abstract_of(state, sharding))
  assert_bitwise_equal(got, state)
  assert type(got["opt_state"][0]) is type(state["opt_state"][0])  # optax namedtuples
  for leaf in jax.tree.leaves(got):
    assert leaf.sharding == sharding
  assert got_data == data_state
  assert got_metrics == {"val/recall@1": 0.625, "val/map@r": 0.25}


def test_restore_without_data_state_or_metrics(tmp_path):
  state = {"w": jnp.arange(3, dtype=jnp.float32)}
  with Checkpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, state)
    got, data_state, metrics = ckpt.restore(1, abstract_state=jax.eval_shape(lambda: state))
  assert_bitwise_equal(got, state)
  assert data_state is None and metrics is None


def test_keeps_latest_n_and_the_best(tmp_path):
  state = {"w": jnp.zeros(2, jnp.float32)}
  recall = {1: 0.1, 2: 0.9, 3: 0.2, 4: 0.3, 5: 0.4, 6: 0.5, 7: 0.6, 8: 0.7}
  with Checkpointer(tmp_path, max_to_keep=3, best_metric="val/recall@1") as ckpt:
    for step in range(1, 9):
      ckpt.save(step, state, metrics={"val/recall@1": recall[step]})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 6, 7, 8]
    assert ckpt.best_step() == 2
    assert ckpt.latest_step() == 8
  assert steps_on_disk(tmp_path) == [2, 6, 7, 8]
  with Checkpointer(tmp_path, max_to_keep=3, best_metric="val/recall@1") as ckpt:
    assert (ckpt.all_steps(), ckpt.best_step()) == ([2, 6, 7, 8], 2)
    _, _, metrics = ckpt.restore(ckpt.best_step(), abstract_state=state)
    assert metrics == {"val/recall@1": 0.9}


def test_min_mode_and_checkpoints_without_the_metric(tmp_path):
  """The lowest loss is kept; checkpoints without the metric never count as best."""
  state = {"w": jnp.zeros(2, jnp.float32)}
  with Checkpointer(tmp_path, max_to_keep=2, best_metric="val/loss",
                    best_mode="min") as ckpt:
    ckpt.save(1, state)  # no metrics yet (e.g. saved on preemption before evaluating)
    assert ckpt.best_step() is None
    ckpt.save(2, state, metrics={"val/loss": 0.5})
    ckpt.save(3, state, metrics={"val/loss": 0.8, "other": 1})
    ckpt.save(4, state, metrics={"other": 2.0})
    ckpt.save(5, state, metrics={"val/loss": float("nan")})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]
    assert ckpt.best_step() == 2


def test_without_best_metric_only_the_latest_remain(tmp_path):
  state = {"w": jnp.zeros(2, jnp.float32)}
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    for step in range(1, 9):
      ckpt.save(step, state, metrics={"val/recall@1": 1.0 if step == 2 else 0.0})
    ckpt.wait()
    assert ckpt.best_step() is None
  assert steps_on_disk(tmp_path) == [6, 7, 8]


def test_keep_best_false_keeps_only_the_latest(tmp_path):
  state = {"w": jnp.zeros(2, jnp.float32)}
  with Checkpointer(tmp_path, max_to_keep=2, best_metric="m", keep_best=False) as ckpt:
    for step in range(1, 6):
      ckpt.save(step, state, metrics={"m": 1.0 if step == 1 else 0.0})
  assert steps_on_disk(tmp_path) == [4, 5]


def test_async_save_returns_after_the_host_copy(tmp_path):
  state = make_state(seed=3)
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(5, state, data_state={"i": 5})
    # The arrays are on the host once save returns: freeing them must not matter.
    for leaf in jax.tree.leaves(state):
      if not jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        leaf.delete()
    ckpt.wait()
    assert os.path.exists(tmp_path / "5" / "state" / "_METADATA")
    assert os.path.exists(tmp_path / "5" / "data")
    expected = make_state(seed=3)
    assert ckpt.save(6, make_state(seed=4))
    # Restoring right after a save waits for it.
    got6, _, _ = ckpt.restore(6, abstract_state=expected)
    got5, data_state, _ = ckpt.restore(5, abstract_state=abstract_of(
        expected, one_device_sharding()))
  assert_bitwise_equal(got6, make_state(seed=4))
  assert_bitwise_equal(got5, expected)
  assert data_state == {"i": 5}


def test_save_of_an_existing_step_is_skipped(tmp_path):
  """A preemption save right after the periodic save of the same step is a no-op."""
  state = {"w": jnp.zeros(2, jnp.float32)}
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.save(50, state)
    assert not ckpt.save(50, state, force=True)
    assert not ckpt.save(40, state)  # not after the latest step
    assert ckpt.save(40, state, force=True)
    assert ckpt.all_steps() == [40, 50]


def test_bad_json_is_refused_before_writing(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match="data_state must be JSON"):
      ckpt.save(1, {"w": jnp.zeros(2)}, data_state={"x": object()})
    assert ckpt.all_steps() == []


def test_restore_from_an_empty_directory(tmp_path):
  with Checkpointer(tmp_path / "empty") as ckpt:
    with pytest.raises(CheckpointError, match="no checkpoint in .*empty"):
      ckpt.restore(abstract_state={"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_restore_of_a_missing_step_lists_the_saved_ones(tmp_path):
  state = {"w": jnp.zeros(2, jnp.float32)}
  with Checkpointer(tmp_path) as ckpt:
    for step in (10, 20, 30):
      ckpt.save(step, state)
    with pytest.raises(CheckpointError, match=r"step 25 .* \[10, 20, 30\]"):
      ckpt.restore(25, abstract_state=state)


def test_shape_mismatch_names_the_key_path_and_both_shapes(tmp_path):
  """E.g. a run resumed with another embedding_dim."""
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, make_state(dim=8))
    ckpt.wait()
  before = sorted(glob.glob(str(tmp_path / "**"), recursive=True))
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError) as err:
      ckpt.restore(abstract_state=abstract_of(make_state(dim=16), one_device_sharding()))
  message = str(err.value)
  # The first differing leaf in the tree's order: the bias' adam moment.
  assert re.search(r"'opt_state/0/mu/head/bias' has shape \(8,\) float32 in the "
                   r"checkpoint but \(16,\) float32 in the state", message), message
  assert "different config" in message and "--workdir" in message
  assert sorted(glob.glob(str(tmp_path / "**"), recursive=True)) == before


def test_structure_mismatch_names_the_missing_key(tmp_path):
  state = {"params": {"a": jnp.zeros(2, jnp.float32)}}
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    bigger = {"params": {"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(3, jnp.float32)}}
    with pytest.raises(CheckpointError, match="'params/b' is in the state but not in"):
      ckpt.restore(abstract_state=bigger)
    with pytest.raises(CheckpointError, match="'params/a' is in the checkpoint but not"):
      ckpt.restore(abstract_state={"params": {}})
    with pytest.raises(CheckpointError, match="int32 in the state"):
      ckpt.restore(abstract_state={"params": {"a": jnp.zeros(2, jnp.int32)}})


# Orbax's reader leaves a callback for the closed event loop after tensorstore fails.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damaged", ["state/_METADATA", "state/manifest.ocdbt",
                                     "state/d/*", "data/metadata"])
def test_damaged_checkpoint_names_the_step_directory(tmp_path, damaged):
  state = make_state()
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, data_state={"i": 1})
    ckpt.save(2, state, data_state={"i": 2})
  files = glob.glob(str(tmp_path / "2" / damaged))
  assert files
  for f in files:
    os.remove(f)
  left = sorted(glob.glob(str(tmp_path / "**"), recursive=True))
  abstract = abstract_of(state, one_device_sharding())
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "2")) + r".*saved: \[1\]"):
      ckpt.restore(abstract_state=abstract)
    got, data_state, _ = ckpt.restore(1, abstract_state=abstract)  # the other is fine
  assert_bitwise_equal(got, state)
  assert data_state == {"i": 1}
  assert sorted(glob.glob(str(tmp_path / "**"), recursive=True)) == left


def test_watcher_flags_sigterm_and_restores_the_handler():
  before = signal.getsignal(signal.SIGTERM)
  with PreemptionWatcher(sigint=False) as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert watcher.should_stop(2) and watcher.signal_received
  assert signal.getsignal(signal.SIGTERM) == before


def test_watcher_sigint_twice_interrupts():
  before = signal.getsignal(signal.SIGINT)
  # Python runs signal handlers at the next bytecode boundary, which can fall inside a
  # garbage-collector callback (hypothesis installs one), where a KeyboardInterrupt
  # would be swallowed; no collection may run while the signals are delivered.
  gc.disable()
  try:
    with PreemptionWatcher() as watcher:
      os.kill(os.getpid(), signal.SIGINT)
      assert watcher.should_stop(1)
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
  finally:
    gc.enable()
  assert signal.getsignal(signal.SIGINT) == before


def _restore_stopped_step(directory, stopped_at):
  """Restores the step a preempted run stopped at; returns its state and data state."""
  sharding = one_device_sharding()
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding),
              "w": jax.ShapeDtypeStruct((6,), jnp.float32, sharding=sharding)}
  with Checkpointer(directory) as ckpt:
    assert ckpt.latest_step() == stopped_at
    state, data_state, _ = ckpt.restore(abstract_state=abstract)
  assert int(state["step"]) == stopped_at
  np.testing.assert_array_equal(state["w"], np.arange(6, dtype=np.float32) + stopped_at)
  assert data_state == {"step": stopped_at}


def _wait_ready(proc):
  """Reads the script's stdout until it prints 'ready'."""
  for line in proc.stdout:
    if line.strip() == "ready":
      return
  raise AssertionError(f"the script ended before it was ready (exit {proc.wait()})")


def test_sigterm_saves_the_current_step_and_exits_0(tmp_path):
  directory = str(tmp_path / "ckpt")
  with open(tmp_path / "stderr.txt", "w") as err:
    proc = subprocess.Popen([sys.executable, SCRIPT, directory], stdout=subprocess.PIPE,
                            stderr=err, text=True)
    try:
      _wait_ready(proc)
      proc.send_signal(signal.SIGTERM)
      out, _ = proc.communicate(timeout=120)
    finally:
      proc.kill()
  assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()[-3000:]
  stopped_at = json.loads(out.strip().splitlines()[-1])["stopped_at"]
  assert 5 <= stopped_at < 50  # the step the signal came at, not a periodic save
  _restore_stopped_step(directory, stopped_at)


@pytest.mark.parametrize("service", [True, False], ids=["jax_service", "allgather"])
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(tmp_path, service):
  """With JAX's preemption service or by gathering the flags every 10 steps, the two
  processes agree on the step and save it together."""
  directory = str(tmp_path / "ckpt")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  errs = [open(tmp_path / f"stderr{i}.txt", "w") for i in range(2)]
  extra = [] if service else ["noservice"]
  procs = [subprocess.Popen([sys.executable, SCRIPT, directory, str(i), str(port)] + extra,
                            stdout=subprocess.PIPE, stderr=errs[i], text=True)
           for i in range(2)]
  try:
    _wait_ready(procs[1])
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p, e in zip(procs, errs):
      p.kill()
      e.close()
  for i, p in enumerate(procs):
    assert p.returncode == 0, (tmp_path / f"stderr{i}.txt").read_text()[-3000:]
  stops = [json.loads(o.strip().splitlines()[-1]) for o in outs]
  assert {s["process"] for s in stops} == {0, 1}
  assert stops[0]["stopped_at"] == stops[1]["stopped_at"]
  if not service:
    assert stops[0]["stopped_at"] % 10 == 0  # PreemptionWatcher's sync_every
  _restore_stopped_step(directory, stops[0]["stopped_at"])


def test_invalid_arguments(tmp_path):
  with pytest.raises(CheckpointError, match="max_to_keep"):
    Checkpointer(tmp_path, max_to_keep=0)
  with pytest.raises(CheckpointError, match="best_mode"):
    Checkpointer(tmp_path, best_mode="largest")
