"""The grain pipelines: right images, deterministic, resumable, sliced across processes."""

import json
import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import data_fixtures as fx
from msjax.data import (ImageReadError, ImageTransform, PKSampler, benchmarks, eval_dataset,
                        pipeline, train_dataset)

TRAIN = ImageTransform(image_size=8, resize_to=10)
EVAL = ImageTransform(image_size=8, resize_to=10, train=False)


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
  root = tmp_path_factory.mktemp("cub")
  fixture = fx.make_cub(str(root), num_classes=16, sizes=[3, 1, 4, 5] * 4, shuffle_seed=1)
  return fixture, benchmarks.load_cub(fixture.root)


def _batches(dataset):
  out = [{k: np.array(v) for k, v in b.items()} for b in dataset]  # copy out of shm
  return out


def _train(split, *, workers=0, start=0, steps=6, process=(0, 1), seed=5, p=4, k=3):
  sampler = PKSampler(split.labels, p, k, seed=seed)
  return train_dataset(split, sampler, TRAIN, num_steps=steps, seed=seed, start_step=start,
                       num_workers=workers, process_index=process[0],
                       process_count=process[1])


def test_train_batches_hold_the_sampled_images(cub):
  fixture, ds = cub
  split = ds.train
  sampler = PKSampler(split.labels, 4, 3, seed=5)
  ids = fixture.image_ids("train")
  for step, batch in enumerate(_batches(_train(split))):
    np.testing.assert_array_equal(batch["index"], sampler.batch(step))
    np.testing.assert_array_equal(batch["label"], split.labels[batch["index"]])
    assert batch["image"].shape == (12, 8, 8, 3) and batch["image"].dtype == np.uint8
    # Each fixture image is a flat colour naming its file: crops keep it.
    assert [fx.image_id_of(im) for im in batch["image"]] == [ids[i] for i in batch["index"]]


def test_workers_do_not_change_the_batches(cub):
  split = cub[1].train
  inline = _batches(_train(split))
  for a, b in zip(inline, _batches(_train(split, workers=2)), strict=True):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(inline[0]["image"], inline[1]["image"])


def test_resume_from_iterator_state_and_from_step(cub):
  split = cub[1].train
  straight = _batches(_train(split))  # workers change nothing (test above)
  it = iter(_train(split, workers=2))
  head = [np.array(next(it)["image"]) for _ in range(2)]
  state = it.get_state()
  resumed = iter(_train(split, workers=2))
  resumed.set_state(json.loads(json.dumps(state)))  # checkpoints store it as JSON
  tail = [np.array(b["image"]) for b in resumed]
  from_step = [b["image"] for b in _batches(_train(split, start=2))]
  expected = [b["image"] for b in straight]
  assert len(head) + len(tail) == len(expected) == 6 and len(from_step) == 4
  for got in (head + tail, expected[:2] + from_step):
    for a, b in zip(got, expected, strict=True):
      np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_form_the_global_batch(cub, processes):
  """Augmentation is keyed by position in the global batch, not by process."""
  split = cub[1].train
  whole = _batches(_train(split, p=4, k=4, steps=3))
  parts = [_batches(_train(split, p=4, k=4, steps=3, process=(i, processes)))
           for i in range(processes)]
  for step in range(3):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(
          np.concatenate([parts[i][step][key] for i in range(processes)]), whole[step][key])


def test_eval_every_image_once_in_order(cub):
  fixture, ds = cub
  split = ds.test
  n = len(split)
  batches = _batches(eval_dataset(split, EVAL, batch_size=8, num_workers=2))
  assert len(batches) == -(-n // 8)
  mask = np.concatenate([b["mask"] for b in batches])
  index = np.concatenate([b["index"] for b in batches])
  np.testing.assert_array_equal(index[mask], np.arange(n))
  assert (index[~mask] == -1).all() and mask.sum() == n and len(mask) % 8 == 0
  labels = np.concatenate([b["label"] for b in batches])
  np.testing.assert_array_equal(labels[mask], split.labels)
  assert (labels[~mask] == -1).all()
  images = np.concatenate([b["image"] for b in batches])
  assert [fx.image_id_of(im) for im in images[mask]] == fixture.image_ids("test")
  assert not images[~mask].any()


def test_eval_process_slices(cub):
  split = cub[1].test
  whole = _batches(eval_dataset(split, EVAL, batch_size=8, process_index=0,
                                process_count=1))
  parts = [_batches(eval_dataset(split, EVAL, batch_size=8, process_index=i,
                                 process_count=2)) for i in range(2)]
  for b, whole_b in enumerate(whole):
    for key in whole_b:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][b][key], parts[1][b][key]]), whole_b[key])


def test_unreadable_and_missing_images_are_named(tmp_path):
  fixture = fx.make_cub(str(tmp_path), num_classes=4, sizes=3)
  paths = fixture.paths("train")
  with open(paths[0], "wb") as f:
    f.write(b"garbage")
  os.remove(paths[1])
  os.remove(fixture.paths("test")[0])
  dataset = benchmarks.load_cub(fixture.root)
  split = dataset.train
  sampler = PKSampler(split.labels, 2, 3, seed=0)
  with pytest.raises(ImageReadError, match=r"\.jpg") as info:
    list(train_dataset(split, sampler, TRAIN, num_steps=4, seed=0, num_workers=2))
  assert paths[0] in str(info.value) or paths[1] in str(info.value)
  with pytest.raises(ImageReadError, match="cannot read image .*No such file"):
    list(eval_dataset(dataset.test, EVAL, batch_size=4))


def test_bad_pipeline_arguments(cub):
  split = cub[1].train
  with pytest.raises(ValueError, match="does not split evenly"):
    _train(split, p=3, k=3, process=(0, 2))
  with pytest.raises(ValueError, match="train=False"):
    eval_dataset(split, TRAIN, batch_size=4)


def test_global_batches_on_a_one_device_mesh(cub):
  split = cub[1].train
  mesh = Mesh(np.asarray(jax.devices()[:1]), ("batch",))
  it = pipeline.GlobalBatches(_train(split, steps=3), mesh)
  first = next(it)
  assert set(first) == {"image", "label"}
  assert isinstance(first["image"], jax.Array) and first["image"].shape == (12, 8, 8, 3)
  expected = _batches(_train(split, steps=3))
  np.testing.assert_array_equal(np.asarray(first["image"]), expected[0]["image"])
  state = it.get_state()
  it.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(it)["label"]), expected[1]["label"])


def test_global_batches_on_8_devices():
  """Each of 8 devices (flat and 4×2 meshes) holds its contiguous slice of the batch."""
  from scripts_run import run_json_script
  result = run_json_script("data_sharding_check.py", timeout=300)
  assert result == {"flat": {"ok": True, "spec": "P('batch',)"},
                    "4x2": {"ok": True, "spec": "P(('data', 'replica'),)"}}


def test_synthetic_config_batches_are_whole_images_or_their_flips():
  """configs/synthetic.py crops the whole image: a training image is the rendered one
  or its mirror image, and evaluation returns it untouched."""
  import pathlib

  from msjax import data
  from msjax.config import load_config_file
  d = load_config_file(pathlib.Path(__file__).parents[1] / "configs" / "synthetic.py").data
  d.synthetic.update(num_train_classes=16, num_test_classes=4, images_per_class=4)
  ds = data.load_dataset(d)
  flips = 0
  for batch in _batches(data.train_batches(ds.train, d, seed=0, num_steps=2)):
    assert batch["image"].shape == (64, 32, 32, 3)
    for image, i in zip(batch["image"], batch["index"]):
      raw = ds.train.images.read(int(i))
      flipped = np.array_equal(image, raw[:, ::-1])
      assert flipped or np.array_equal(image, raw)
      flips += flipped
  assert 30 < flips < 98
  (batch,) = _batches(data.eval_batches(ds.test, d))
  np.testing.assert_array_equal(batch["image"][:16],
                                np.stack([ds.test.images.read(i) for i in range(16)]))


def test_two_processes_form_the_global_batch(tmp_path):
  """Two jax.distributed processes each load half of every batch; the global array they
  assemble is exactly the batch one process alone produces."""
  import socket
  import subprocess
  import sys

  root = fx.make_cub(str(tmp_path), num_classes=16, sizes=4).root
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = os.path.join(os.path.dirname(__file__), "scripts", "data_two_process.py")
  procs = [subprocess.Popen([sys.executable, script, str(i), str(port), root],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  result = json.loads(outs[0][0].strip().splitlines()[-1])
  assert result == {"ok": True, "devices": 4, "local_devices": 2, "local_rows": [8, 8, 8]}
