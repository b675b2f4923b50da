"""``python -m msjax.data check``: the report, and every problem named with a way out."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data_fixtures as fx
from msjax.data import DataError
from msjax.data.check import check_dataset

REPO = pathlib.Path(__file__).parents[1]


def _config(name, **data):
  from msjax.config import load_config_file
  c = load_config_file(REPO / "configs" / f"{name}.py")
  c.data.update(data)
  return c


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "msjax.data", *args], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=300, check=False)
  return out.returncode, out.stdout, out.stderr


def test_cli_reports_a_whole_dataset(tmp_path):
  fixture = fx.make_cub(str(tmp_path), num_classes=8, sizes=[3, 4, 5, 3, 2, 6, 3, 4])
  rc, out, err = _cli("check", "--config", "configs/cub.py",
                      f"--config.data.root={fixture.root}",
                      "--config.data.classes_per_batch=2", "--config.data.images_per_class=3")
  assert rc == 0, err
  report = json.loads(out)
  assert report["ok"] and not report["problems"]
  train, test = report["splits"]["train"], report["splits"]["test"]
  assert (train["images"], train["classes"]) == (15, 4)
  assert train["images_per_class"] == {"min": 3, "median": 3.5, "max": 5}
  assert (test["images"], test["classes"]) == (15, 4)
  assert train["missing_images"] == train["unreadable_images"] == 0
  # A tiny copy is not the published split, and check says so without failing.
  assert any("published split has 5864 / 100" in n for n in report["notes"])


def test_cli_fails_on_problems_and_names_them(tmp_path):
  fixture = fx.make_cub(str(tmp_path), num_classes=4, sizes=3)
  os.remove(fixture.paths("train")[1])
  with open(fixture.paths("test")[2], "wb") as f:
    f.write(b"<html>not found</html>")
  rc, out, err = _cli("check", "--config", "configs/cub.py",
                      f"--config.data.root={fixture.root}",
                      "--config.data.classes_per_batch=2", "--config.data.images_per_class=2")
  assert rc == 1
  report = json.loads(out)
  assert not report["ok"]
  assert report["splits"]["train"]["first_missing"] == [fixture.paths("train")[1]]
  assert fixture.paths("test")[2] in report["splits"]["test"]["first_unreadable"][0]
  assert "1 missing image" in err and "1 unreadable image" in err


def test_cli_missing_root_says_where_to_get_the_data(tmp_path):
  rc, out, err = _cli("check", "--config", "configs/sop.py",
                      f"--config.data.root={tmp_path / 'nowhere'}")
  assert rc == 1 and out == ""
  assert "does not exist" in err and "Stanford_Online_Products.zip" in err
  assert "Traceback" not in err
  rc, _, err = _cli("check")
  assert rc == 1 and "needs --config" in err
  rc, _, err = _cli("verify")
  assert rc == 1 and "usage: python -m msjax.data {check|prepare_tfds}" in err


def test_small_classes_fail_unless_padding_is_allowed(tmp_path):
  fixture = fx.make_cub(str(tmp_path), num_classes=8)  # sizes 2, 1, 3, 4, ...
  c = _config("cub", root=fixture.root, classes_per_batch=2, images_per_class=3)
  report = check_dataset(c.data)
  assert not report["ok"]
  (problem,) = report["problems"]
  assert "2 classes have fewer than data.images_per_class=3" in problem
  assert "pad_small_classes=True" in problem
  c.data.pad_small_classes = True
  report = check_dataset(c.data)
  assert report["ok"] and any("drawn with replacement" in n for n in report["notes"])


def test_too_few_classes_for_p(tmp_path):
  fixture = fx.make_cub(str(tmp_path), num_classes=4, sizes=3)
  report = check_dataset(_config("cub", root=fixture.root, classes_per_batch=16,
                                 images_per_class=2).data)
  assert report["problems"] == ["train: 2 classes, fewer than data.classes_per_batch=16."]


def test_decode_finds_a_truncated_jpeg_the_header_read_misses(tmp_path):
  fixture = fx.make_cub(str(tmp_path), num_classes=4, sizes=3)
  path = fixture.paths("train")[0]
  noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
  Image.fromarray(noise).save(path, "JPEG")  # big enough that half of it is scan data
  data = pathlib.Path(path).read_bytes()
  pathlib.Path(path).write_bytes(data[:len(data) // 2])
  c = _config("cub", root=fixture.root, classes_per_batch=2, images_per_class=2)
  assert check_dataset(c.data)["ok"]
  report = check_dataset(c.data, full_decode=True)
  assert report["splits"]["train"]["unreadable_images"] == 1
  assert path in report["splits"]["train"]["first_unreadable"][0]


def test_inshop_reports_query_and_gallery(tmp_path):
  fixture = fx.make_inshop(str(tmp_path), num_items=8, sizes=4)
  report = check_dataset(_config("inshop", root=fixture.root, classes_per_batch=2).data)
  assert set(report["splits"]) == {"train", "query", "gallery"}
  for split, (images, classes) in fixture.counts().items():
    assert (report["splits"][split]["images"], report["splits"][split]["classes"]) == (
        images, classes)


def test_validation_split_is_reported(tmp_path):
  fixture = fx.make_folder(str(tmp_path), num_classes=10, sizes=3)
  c = _config("cub", dataset="folder", root=str(tmp_path), train_fraction=0.6,
              val_fraction=0.34, classes_per_batch=2, images_per_class=2)
  report = check_dataset(c.data)
  assert report["ok"], report["problems"]
  assert {s: v["classes"] for s, v in report["splits"].items()} == {
      "train": 4, "val": 2, "test": 4}
  assert fixture.root


def test_config_mistakes_are_named():
  with pytest.raises(DataError, match="config.data.dataset='cubs'"):
    check_dataset(_config("cub", dataset="cubs").data)
  with pytest.raises(DataError, match="config.data.root is empty"):
    check_dataset(_config("cub").data)


def test_synthetic_default_checks_without_a_root():
  c = _config("synthetic")
  c.data.synthetic.update(num_train_classes=16, num_test_classes=4, images_per_class=5)
  report = check_dataset(c.data, full_decode=True)
  assert report["ok"], report["problems"]
  assert report["format"] is None
  assert {s: (v["images"], v["classes"]) for s, v in report["splits"].items()} == {
      "train": (80, 16), "test": (20, 4)}
