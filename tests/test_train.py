"""Training: sharded step == single-device step, multi-process, resume, the main job."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from tensorboard.util import tensor_util

from msjax import config as config_lib
from msjax import train
from msjax.data import DataError
from scripts_run import run_json_script

REPO = pathlib.Path(__file__).parents[1]
SCRIPTS = pathlib.Path(__file__).parent / "scripts"


def _config(name="synthetic"):
  return config_lib.load_config_file(REPO / "configs" / f"{name}.py")


def _tiny(c, steps=6):
  c.data.synthetic.update(num_train_classes=16, num_test_classes=8, images_per_class=4,
                          image_size=16)
  c.data.update(image_size=16, classes_per_batch=8, images_per_class=2, eval_batch_size=32)
  c.model.embedding_dim = 16
  c.train.update(num_steps=steps, log_every=1, checkpoint_every=0, eval_untrained=False)
  return c


def test_eight_devices_step_like_one_device():
  """Three steps on 8 virtual devices give one device's losses and parameters; the
  sharded step's temporaries shrink with the device count and hold no [B, B] array."""
  r = run_json_script("train_sharding_check.py", timeout=600)
  assert r["devices"] == 8
  np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=1e-5)
  # Adam normalises each update to about lr (1e-3 here), so float32 reduction-order
  # noise in near-zero gradients shows at a fraction of an update, never more.
  assert r["params_moved"] > 1e-3
  assert r["max_param_diff"] < 0.1 * r["params_moved"]
  assert r["temp_bytes_8"] < r["temp_bytes_1"] / 4
  assert not r["square_in_sharded_hlo"]


def test_a_vit_on_eight_devices_steps_like_one_device():
  """The same with ViT-Ti/16 on 32-pixel images (its position embedding resampled from
  14×14 to 2×2 inside the step): parameters agree to float32 rounding."""
  r = run_json_script("train_sharding_check.py", "ms", "vit_ti16", timeout=600)
  assert r["devices"] == 8
  np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=1e-5)
  assert r["params_moved"] > 0.1
  assert r["max_param_diff"] < 1e-4 * r["params_moved"]


def two_processes_and_one(*args):
  """Runs ``scripts/train_two_process.py`` as two jax.distributed processes and as one:
  ``([result of process 0, of process 1], result alone)``, each its last JSON line."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = str(SCRIPTS / "train_two_process.py")
  procs = [subprocess.Popen([sys.executable, script, str(i), str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
  alone = subprocess.run([sys.executable, script, "-1", "0", *args], capture_output=True,
                         text=True, timeout=600, check=True)
  return results, json.loads(alone.stdout.strip().splitlines()[-1])


def test_two_processes_agree_with_one():
  results, single = two_processes_and_one()
  assert [r["processes"] for r in results] == [2, 2]
  assert results[0]["losses"] == results[1]["losses"]
  assert results[0]["checksum"] == results[1]["checksum"]
  np.testing.assert_allclose(results[0]["losses"], single["losses"], rtol=1e-5)
  np.testing.assert_allclose(results[0]["checksum"], single["checksum"], rtol=1e-4,
                             atol=1e-4)


def _params(workdir, c):
  """The parameters of a workdir's latest checkpoint."""
  from msjax import checkpoint, sharding
  mesh = sharding.make_mesh()
  tx = train.build_optimizer(c.optim, c.train.num_steps)
  _, state = train.init_state(c, tx, mesh, seed=c.seed)
  with checkpoint.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    state, _ = train._restore(ckpt, state)
  return jax.device_get(state)


def test_stop_and_resume_equals_an_uninterrupted_run(tmp_path):
  straight = _tiny(_config())
  straight.data.num_workers = 1  # the input workers' state is resumed too
  straight.train.telemetry = False  # telemetry only reads: training is the same without
  train.train_and_evaluate(straight, str(tmp_path / "straight"))
  split = _tiny(_config())
  split.data.num_workers = 1
  split.train.stop_at_step = 3
  assert train.train_and_evaluate(split, str(tmp_path / "split")) == {"stopped_at": 3}
  split.train.stop_at_step = 0
  final = train.train_and_evaluate(split, str(tmp_path / "split"))
  assert final["step"] == 6
  a, b = _params(tmp_path / "straight", straight), _params(tmp_path / "split", split)
  assert int(a["step"]) == int(b["step"]) == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  lines = [json.loads(line) for line in open(tmp_path / "split" / "metrics.jsonl")]
  assert [r["step"] for r in lines if "train/loss" in r] == [1, 2, 3, 4, 5, 6]
  from msjax import telemetry
  for r in lines:
    if "train/loss" in r:
      assert {f"gpw/{k}" for k in telemetry.KEYS} <= set(r)
      assert 0 <= r["gpw/neg_mined_fraction"] <= 1 and r["gpw/pos_weight_max"] > 0
  straight_lines = open(tmp_path / "straight" / "metrics.jsonl").read()
  assert "train/loss" in straight_lines and "gpw/" not in straight_lines
  # TensorBoard holds the JSONL's every tag and value, each step once across the resume,
  # and the GPW histograms of every logged step: 8 classes × 2 images give 16 positive
  # and 16 × 14 negative candidate pairs.
  from test_metric_writers import assert_tensorboard_matches_jsonl, event_files
  assert len(event_files(tmp_path / "split")) == 2
  acc = assert_tensorboard_matches_jsonl(tmp_path / "split")
  assert set(acc.Tags()["tensors"]) == {"config"} | {
      f"gpw/{k}" for k in telemetry.HISTOGRAM_BINS}
  for tag, pairs in (("gpw/pos_sim", 16), ("gpw/neg_sim", 16 * 14)):
    histograms = acc.Tensors(tag)
    assert [e.step for e in histograms] == [1, 2, 3, 4, 5, 6]
    for e in histograms:
      assert tensor_util.make_ndarray(e.tensor_proto)[:, 2].sum() == pairs
  assert [e.step for e in acc.Tensors("config")] == [0, 3]


def test_main_job_on_the_synthetic_default(tmp_path):
  """``python -m msjax.main`` end to end, shortened: it learns, and leaves its records."""
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "msjax.main", "--config", "configs/synthetic.py",
       f"--workdir={workdir}", "--config.train.num_steps=60", "--config.train.log_every=20",
       "--config.train.checkpoint_every=30",
       "--config.data.synthetic.num_train_classes=64",
       "--config.data.synthetic.num_test_classes=32",
       "--config.data.synthetic.images_per_class=16"],
      cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["step"] == 60 and final["num_queries"] == 32 * 16
  assert {"recall@1", "recall@8", "map@r", "r_precision", "precision@1"} <= set(final)
  text = out.stdout
  untrained = float(text.split("untrained network: ")[1].split("%")[0])
  raw = float(text.split("raw pixels: ")[1].split("%")[0])
  trained = float(text.split("trained (60 steps): ")[1].split("%")[0])
  assert trained == pytest.approx(100 * final["recall@1"], abs=0.06)
  assert trained > 1.5 * max(untrained, raw)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["30", "60"]
  logged = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in logged if "train/loss" in r] == [20, 40, 60]
  assert [r["step"] for r in logged if "gpw/neg_sim_q50" in r] == [20, 40, 60]
  from test_metric_writers import assert_tensorboard_matches_jsonl
  tags = assert_tensorboard_matches_jsonl(workdir).Tags()
  assert {"train/loss", "gpw/neg_weight_max", "gpw/empty_anchor_fraction",
          "untrained/recall@1", "test/recall@1"} <= set(tags["scalars"])
  assert {"gpw/neg_sim", "gpw/pos_weight_log10", "config"} <= set(tags["tensors"])
  from msjax import plot  # its command line is tested in test_plot.py
  assert plot.render_workdir(workdir) == [str(workdir / "figures" / "gpw_telemetry.png")]
  assert (workdir / "figures" / "gpw_telemetry.png").stat().st_size > 10_000
  again = subprocess.run(
      [sys.executable, "-m", "msjax.main", "--config", "configs/synthetic.py",
       f"--workdir={workdir}", "--mode=eval", "--config.data.synthetic.num_train_classes=64",
       "--config.data.synthetic.num_test_classes=32",
       "--config.data.synthetic.images_per_class=16"],
      cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  evaluated = json.loads((workdir / "eval_metrics.json").read_text())
  assert evaluated == pytest.approx(final)


def test_config_mistakes_fail_before_compiling(tmp_path):
  c = _tiny(_config())
  c.data.classes_per_batch = 7  # 7 × 2 = 14 images
  with pytest.raises(train.ConfigError, match="multiple of 1|does not split"):
    train.check_config(c, num_devices=4, process_count=1)
  c = _tiny(_config())
  c.loss.name = "arcface"
  with pytest.raises(train.ConfigError, match="config.loss.name='arcface'"):
    train.train_and_evaluate(c, str(tmp_path / "a"))
  c = _tiny(_config())
  c.model.pretrained = str(tmp_path / "missing.npz")
  with pytest.raises(train.ConfigError, match="python -m msjax.models.convert"):
    train.train_and_evaluate(c, str(tmp_path / "b"))
  c = _config("cub")
  c.data.root = str(tmp_path / "no_cub")
  with pytest.raises(DataError, match="does not exist"):
    train.train_and_evaluate(c, str(tmp_path / "c"))
  assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_resuming_with_another_config_names_the_mismatch(tmp_path):
  from msjax.checkpoint import CheckpointError
  c = _tiny(_config(), steps=2)
  train.train_and_evaluate(c, str(tmp_path))
  c.model.embedding_dim = 8
  c.train.num_steps = 4
  with pytest.raises(CheckpointError, match="different config"):
    train.train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("name,devices", [("cub", 16), ("cars", 16), ("sop", 8),
                                          ("inshop", 16), ("synthetic", 16), ("cub_vit", 4),
                                          ("cars_vit", 4), ("sop_vit", 4), ("inshop_vit", 4)])
def test_every_config_fits_its_slices(name, devices):
  """Each config runs on 1 to ``devices`` devices (SOP's published batch of 1,000 stops at
  8, the ViT recipes' 180 at 4; their docstrings say how to go beyond)."""
  c = _config(name)
  n = 1
  while n <= devices:
    train.check_config(c, num_devices=n, process_count=min(n, 4))
    n *= 2
  assert train.loss_kwargs(c.loss)["alpha"] == 2.0
  if devices < 16:
    with pytest.raises(train.ConfigError, match=f"multiple of {2 * devices}"):
      train.check_config(c, num_devices=2 * devices, process_count=4)


BENCHMARK_CONFIGS = ("cub", "cars", "sop", "inshop", "sop_xbm", "inshop_xbm",
                     "cub_proxy_anchor", "cub_vit", "cars_vit", "sop_vit", "inshop_vit")


@pytest.mark.parametrize("name", BENCHMARK_CONFIGS)
def test_benchmark_configs_start_from_their_published_weights(name):
  """The headline command trains the published recipe: each benchmark config names the
  weights its backbone needs, and the ViT recipes are the MS loss on DINO ViT-S/16 at
  224 pixels in bfloat16."""
  from msjax.models import pretrained
  c = _config(name)
  assert pretrained.PUBLISHED[c.model.pretrained].arch == c.model.backbone
  assert train.describe_start(c).startswith(
      f"{c.model.backbone} starts from pretrained weights {c.model.pretrained} (http")
  if name.endswith("_vit"):
    assert (c.model.backbone, c.model.pretrained, c.loss.name, c.data.image_size,
            c.model.dtype) == ("vit_s16", "vit_s16_dino", "ms", 224, "bfloat16")
  # From random weights, a benchmark run says so first thing, and names the weights.
  c.model.pretrained = ""
  line = train.describe_start(c)
  assert line.startswith(f"WARNING: {c.model.backbone} starts from RANDOM weights")
  assert f"--config.model.pretrained={pretrained.names_for(c.model.backbone)[0]}" in line
  assert not train.describe_start(_config("synthetic")).startswith("WARNING")
