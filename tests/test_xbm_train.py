"""Training with a cross-batch memory: resume, two processes, config mistakes, telemetry."""

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from msjax import checkpoint, losses, train
from test_train import _config, _params, _tiny, two_processes_and_one

REPO = pathlib.Path(__file__).parents[1]


def _xbm(steps=6, size=40, start_step=1, **xbm):
  """The tiny synthetic run (global batch 16) with a memory that wraps: 40 is not a
  multiple of 16, so slots are overwritten out of batch alignment."""
  c = _tiny(_config(), steps=steps)
  c.xbm.update(enabled=True, size=size, start_step=start_step, **xbm)
  return c


def _labels_fed(c):
  """The labels of every training batch of ``c``, in the order the loop feeds them."""
  from msjax import data as data_lib
  batches = data_lib.train_batches(data_lib.load_dataset(c.data).train, c.data,
                                   seed=c.seed, num_steps=c.train.num_steps)
  return [np.asarray(b["label"]) for b in batches]


def test_stop_and_resume_with_memory_equals_an_uninterrupted_run(tmp_path):
  """Stopped after step 3 and resumed, the run ends bit-identical to a straight one,
  memory included; the memory then holds exactly the last 40 enqueued labels."""
  straight = _xbm()
  straight.train.telemetry = False
  train.train_and_evaluate(straight, str(tmp_path / "straight"))
  split = _xbm()
  split.train.stop_at_step = 3
  assert train.train_and_evaluate(split, str(tmp_path / "split")) == {"stopped_at": 3}
  split.train.stop_at_step = 0
  assert train.train_and_evaluate(split, str(tmp_path / "split"))["step"] == 6
  a, b = _params(tmp_path / "straight", straight), _params(tmp_path / "split", split)
  assert set(a) == {"params", "rest", "opt_state", "step", "memory"}
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  # Steps 2..6 enqueued 5 × 16 = 80 entries into 40 slots: the last 40, in ring order.
  memory = b["memory"]
  assert int(memory.filled) == 40 and int(memory.pointer) == 80 % 40
  fed = np.concatenate(_labels_fed(split)[1:])
  np.testing.assert_array_equal(memory.labels, fed[-40:])
  lines = [json.loads(x) for x in open(tmp_path / "split" / "metrics.jsonl")]
  losses_logged = [r for r in lines if "train/loss" in r]
  assert [r["step"] for r in losses_logged] == [1, 2, 3, 4, 5, 6]
  for r in losses_logged:
    assert r["train/loss"] == pytest.approx(r["train/batch_loss"] + r["train/memory_loss"],
                                            rel=1e-6)
    assert (r["train/memory_loss"] == 0) == (r["step"] == 1)  # joins after start_step
    # Memory pairs are reported apart from batch pairs, once the memory has joined.
    assert ("gpw_memory/neg_mined_fraction" in r) == (r["step"] > 1)
    assert "gpw/neg_mined_fraction" in r


def test_first_memory_step_sees_only_the_batch(tmp_path):
  """At the step where the memory joins it holds just the batch's own copies, so the
  memory term equals the batch term (self pairs dropped by index), and its telemetry
  counts the batch's pairs: 16 positives and 16 × 14 negatives."""
  c = _xbm(steps=2, size=48, start_step=1)
  train.train_and_evaluate(c, str(tmp_path))
  rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "metrics.jsonl"))
          if "train/loss" in r}
  assert rows[2]["train/memory_loss"] == pytest.approx(rows[2]["train/batch_loss"],
                                                       rel=1e-6)
  for key in ("neg_mined_fraction", "pos_mined_fraction", "empty_anchor_fraction",
              "neg_weight_max", "pos_weight_max"):
    assert rows[2][f"gpw_memory/{key}"] == pytest.approx(rows[2][f"gpw/{key}"], rel=1e-5)
  from test_metric_writers import assert_tensorboard_matches_jsonl
  from tensorboard.util import tensor_util
  acc = assert_tensorboard_matches_jsonl(tmp_path)
  for tag, pairs in (("gpw_memory/pos_sim", 16), ("gpw_memory/neg_sim", 16 * 14)):
    (event,) = acc.Tensors(tag)
    assert event.step == 2
    assert tensor_util.make_ndarray(event.tensor_proto)[:, 2].sum() == pairs


def _main(workdir, *overrides):
  return [sys.executable, "-m", "msjax.main", "--config", str(REPO / "configs/synthetic.py"),
          "--workdir", str(workdir),
          "--config.data.synthetic.num_train_classes=16",
          "--config.data.synthetic.num_test_classes=8",
          "--config.data.synthetic.images_per_class=4",
          "--config.data.synthetic.image_size=16", "--config.data.image_size=16",
          "--config.data.classes_per_batch=8", "--config.data.images_per_class=2",
          "--config.data.eval_batch_size=32", "--config.model.embedding_dim=16",
          "--config.train.eval_untrained=False", "--config.train.log_every=1",
          "--config.train.telemetry=False", "--config.xbm.enabled=True",
          "--config.xbm.size=40", "--config.xbm.start_step=2", *overrides]


STEPS = ["--config.train.num_steps=60", "--config.train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The workdir of the 60-step command run straight through (shared by both signals)."""
  workdir = tmp_path_factory.mktemp("xbm") / "straight"
  subprocess.run(_main(workdir, *STEPS), check=True, capture_output=True, timeout=600)
  return workdir


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_killed_or_preempted_run_resumes_bit_identically(tmp_path, uninterrupted, sig):
  """``python -m msjax.main`` stopped by SIGTERM (it checkpoints and exits) or killed
  with -9 after a checkpoint resumes to the same parameters and memory as a run that
  was never interrupted."""
  steps = STEPS
  proc = subprocess.Popen(_main(tmp_path / "split", *steps), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 300
    while not (tmp_path / "split/checkpoints/4").exists():
      assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
      time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    out, _ = proc.communicate(timeout=300)
  finally:
    proc.kill()
  if sig == "SIGTERM":
    assert proc.returncode == 0 and "Stopping at step" in out, out
  else:
    assert proc.returncode == -signal.SIGKILL
  stopped = checkpoint.Checkpointer(tmp_path / "split/checkpoints", read_only=True)
  assert stopped.latest_step() < 60, "the run finished before the signal: nothing tested"
  stopped.close()
  subprocess.run(_main(tmp_path / "split", *steps), check=True, capture_output=True,
                 timeout=600)
  c = _xbm(steps=60, start_step=2)
  a, b = _params(uninterrupted, c), _params(tmp_path / "split", c)
  assert int(a["step"]) == int(b["step"]) == 60
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_two_processes_share_one_memory():
  """Two jax.distributed processes, each feeding half of every batch, end with the same
  losses, parameters and memory as each other and as one process alone."""
  results, single = two_processes_and_one("xbm")
  assert [r["processes"] for r in results] == [2, 2]
  assert results[0]["memory"] == results[1]["memory"]
  assert results[0]["losses"] == results[1]["losses"]
  # Three steps of 16 into 24 slots, joining at step 2: 32 written, the pointer at 8.
  assert single["memory"]["filled"] == 24 and single["memory"]["pointer"] == 8
  assert results[0]["memory"]["labels"] == single["memory"]["labels"]
  assert results[0]["memory"]["pointer"] == single["memory"]["pointer"]
  np.testing.assert_allclose(results[0]["losses"], single["losses"], rtol=1e-5)
  np.testing.assert_allclose(results[0]["memory"]["embeddings"],
                             single["memory"]["embeddings"], rtol=1e-4)
  assert single["losses"][1] > single["losses"][0] * 1.5  # the memory term joined


@pytest.mark.parametrize("field,value,message", [
    ("size", 8, "config.xbm.size=8 is smaller than the global batch of 16"),
    ("start_step", 6, "config.xbm.start_step=6 must be in [0, config.train.num_steps=6)"),
    ("weight", 0.0, "config.xbm.weight=0.0 must be > 0"),
    ("dtype", "float16", "config.xbm.dtype='float16'"),
    ("block_size", -1, "config.xbm.block_size=-1"),
])
def test_memory_mistakes_fail_before_compiling(tmp_path, field, value, message):
  c = _xbm()
  c.xbm[field] = value
  with pytest.raises(train.ConfigError) as e:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert message in str(e.value)
  assert not (tmp_path / "run").exists()  # nothing was started, nothing written


def test_a_loss_without_a_rectangular_form_cannot_take_a_memory(tmp_path, monkeypatch):
  """The registry says which losses take references other than the batch; a loss that
  does not (as a proxy loss will not) is refused with the losses that can."""
  entry = losses.registry._REGISTRY["lifted"]
  monkeypatch.setitem(losses.registry._REGISTRY, "lifted",
                      dataclasses.replace(entry, rectangular=False))
  c = _xbm()
  c.loss.name = "lifted"
  with pytest.raises(train.ConfigError, match="cannot take a cross-batch memory"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  c.xbm.enabled = False
  train.check_config(c, 1, 1)  # without the memory the same loss is fine


def test_resuming_with_another_memory_size_names_it(tmp_path):
  c = _xbm(steps=4)
  c.train.stop_at_step = 2
  train.train_and_evaluate(c, str(tmp_path))
  saved = sorted(os.listdir(tmp_path / "checkpoints"))
  c.xbm.size = 64
  with pytest.raises(checkpoint.CheckpointError) as e:
    train.train_and_evaluate(c, str(tmp_path))
  assert "'memory.embeddings'" in str(e.value) and "config.xbm.size" in str(e.value)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == saved  # nothing lost
  c.xbm.size = 40
  assert train.train_and_evaluate(c, str(tmp_path))["step"] == 4


@pytest.mark.parametrize("name", ["sop_xbm", "inshop_xbm"])
def test_memory_configs_follow_the_recipe_and_fit_their_slices(name):
  """The XBM recipes: contrastive loss with margin 0.5, ResNet-50 at 512-d, 16 × 4 images,
  a memory that joins after 1,000 steps; they run on 1 to 64 devices."""
  c = _config(name)
  assert train.xbm_enabled(c) and c.xbm.start_step == 1000 and c.xbm.weight == 1.0
  assert c.loss.name == "contrastive" and train.loss_kwargs(c.loss)["lam"] == 0.5
  assert (c.model.backbone, c.model.embedding_dim) == ("resnet50", 512)
  batch = c.data.classes_per_batch * c.data.images_per_class
  assert batch == 64 and c.xbm.size >= batch
  for n in (1, 2, 4, 8, 16, 32, 64):
    train.check_config(c, num_devices=n, process_count=min(n, 8))
