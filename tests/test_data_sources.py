"""The benchmark loaders and the folder source against faithful on-disk fixtures."""

from __future__ import annotations

import os
import pickle
import re
import shutil
import time

import numpy as np
import pytest
import scipy.io

import data_fixtures as F
from msjax.data import benchmarks, folder
from msjax.data.records import DataError

MAKERS = {"cub": F.make_cub, "cars": F.make_cars, "sop": F.make_sop,
          "inshop": F.make_inshop}


def check_matches(dataset, fx: F.Fixture):
  """Every split of ``dataset`` holds exactly the fixture's files, classes and labels."""
  splits = dataset.splits()
  assert set(splits) == set(fx.splits)
  for name, split in splits.items():
    assert split.name == name
    assert split.class_names == fx.class_names[name], name
    np.testing.assert_array_equal(split.labels, fx.labels(name))
    assert split.labels.dtype == np.int32
    assert [split.images.describe(i) for i in range(len(split))] == fx.paths(name)
    # The bytes read through the split are the file the metadata names.
    assert [F.image_id_of(split.images.read(i)) for i in range(len(split))] == \
        fx.image_ids(name)
  assert {s: (len(v), v.num_classes) for s, v in splits.items()} == fx.counts()


def check_protocol(dataset):
  """Labels are contiguous ``0..C-1`` and train shares no class with the evaluation."""
  evaluated = [dataset.test] + ([dataset.gallery] if dataset.gallery is not None else [])
  for split in [dataset.train] + evaluated:
    assert split.labels.min() >= 0 and split.labels.max() < split.num_classes
  # Train and plain test splits use every label; In-Shop's query and gallery together do.
  assert (dataset.train.class_sizes() > 0).all()
  used = np.zeros(dataset.test.num_classes, bool)
  for split in evaluated:
    used |= split.class_sizes() > 0
  assert used.all()
  for split in evaluated:
    assert not set(dataset.train.class_names) & set(split.class_names)


# --- the four benchmarks -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_loader_reads_fixture(tmp_path, name):
  fx = MAKERS[name](str(tmp_path))
  dataset = benchmarks.LOADERS[name](fx.root)
  assert dataset.name == name
  check_matches(dataset, fx)
  check_protocol(dataset)
  pickle.loads(pickle.dumps(dataset.train))  # Splits travel to worker processes.


@pytest.mark.parametrize("name", ["cub", "cars"])
def test_class_split_ignores_official_flag(tmp_path, name):
  # Shuffled rows: classes interleave, so the split must go by class id, not position.
  fx = MAKERS[name](str(tmp_path), num_classes=12, shuffle_seed=3)
  dataset = benchmarks.LOADERS[name](fx.root)
  check_matches(dataset, fx)
  # Ids sort as numbers: train is 1..6, test 7..12 (not "10" < "7").
  assert dataset.train.class_names == tuple(str(c) for c in range(1, 7))
  assert dataset.test.class_names == tuple(str(c) for c in range(7, 13))
  # The fixture flags both ways in every class; the loader keeps all images by class.
  if name == "cub":
    flags = dict(line.split() for line in
                 open(os.path.join(fx.root, "train_test_split.txt")))
    flag_of = {im.path: flags[str(im.image_id)] for s in fx.splits.values() for im in s}
  else:
    annots = scipy.io.loadmat(os.path.join(fx.root, "cars_annos.mat"))["annotations"]
    flag_of = {os.path.join(fx.root, str(a["relative_im_path"][0])): str(a["test"].item())
               for a in annots[0]}
  train_flags = {flag_of[p] for p in fx.paths("train")}
  test_flags = {flag_of[p] for p in fx.paths("test")}
  assert train_flags == test_flags == {"0", "1"}
  assert len(dataset.train) + len(dataset.test) == len(flag_of)


def test_cars_mat_has_published_structure(tmp_path):
  F.make_cars(str(tmp_path), num_classes=4)
  mat = scipy.io.loadmat(os.path.join(tmp_path, "cars_annos.mat"))
  annots = mat["annotations"]
  assert annots.shape == (1, sum(F.default_sizes(4)))
  assert annots.dtype.names == ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2",
                                "bbox_y2", "class", "test")
  assert annots[0, 0]["relative_im_path"][0] == "car_ims/000001.jpg"
  assert annots[0, 0]["class"].shape == (1, 1)
  assert mat["class_names"].shape == (1, 4)


def test_sop_uneven_sizes_and_shuffled_rows(tmp_path):
  fx = F.make_sop(str(tmp_path), num_classes=7, sizes=[1, 5, 1, 2, 3, 1, 4],
                  train_classes=3, shuffle_seed=0)
  dataset = benchmarks.load_sop(fx.root)
  check_matches(dataset, fx)
  assert dataset.train.class_names == ("1", "2", "3")
  np.testing.assert_array_equal(dataset.train.class_sizes(), [1, 5, 1])


@pytest.mark.parametrize("with_img_level", [True, False])
def test_inshop_partition_and_shared_labels(tmp_path, with_img_level):
  fx = F.make_inshop(str(tmp_path), num_items=10, with_img_level=with_img_level,
                     gallery_only_items=1)
  dataset = benchmarks.load_inshop(fx.root)
  check_matches(dataset, fx)
  check_protocol(dataset)
  query, gallery = dataset.test, dataset.gallery
  assert (query.name, gallery.name) == ("query", "gallery")
  # Exactly the file's partition.
  lines = open(os.path.join(fx.root, "Eval", "list_eval_partition.txt")).read().split("\n")
  status = {name: s for name, _, s in (ln.split() for ln in lines[2:] if ln)}
  image_root = os.path.join(fx.root, "Img") if with_img_level else fx.root
  for split in dataset.splits().values():
    for i in range(len(split)):
      rel = os.path.relpath(split.images.describe(i), image_root)
      assert status.pop(rel) == split.name
  assert not status
  # One vocabulary: an item has the same label in query and gallery.
  assert query.class_names == gallery.class_names
  q_items = {query.class_names[l]: l for l in query.labels}
  g_items = {gallery.class_names[l]: l for l in gallery.labels}
  both = set(q_items) & set(g_items)
  assert both and all(q_items[item] == g_items[item] for item in both)
  assert set(g_items) - set(q_items)  # The gallery-only item is still labelled.


def test_lenient_roots(tmp_path):
  cub = F.make_cub(str(tmp_path / "cub"), num_classes=4)
  for root in (tmp_path / "cub", cub.root):
    check_matches(benchmarks.load_cub(root), cub)  # os.PathLike accepted too.
  sop = F.make_sop(str(tmp_path / "sop"), num_classes=4)
  for root in (str(tmp_path / "sop"), sop.root):
    check_matches(benchmarks.load_sop(root), sop)
  cars = F.make_cars(str(tmp_path / "cars" / "stanford_cars"), num_classes=4)
  for root in (str(tmp_path / "cars"), cars.root):
    check_matches(benchmarks.load_cars(root), cars)
  inshop = F.make_inshop(str(tmp_path / "inshop" / "In-shop Clothes"), num_items=4)
  for root in (str(tmp_path / "inshop"), inshop.root):
    check_matches(benchmarks.load_inshop(root), inshop)


def test_published_tables_cover_every_loader():
  assert set(benchmarks.PUBLISHED_COUNTS) == set(benchmarks.LOADERS)
  assert set(benchmarks.WHERE_TO_GET) == set(benchmarks.LOADERS)
  assert benchmarks.PUBLISHED_COUNTS["cub"] == {"train": (5864, 100), "test": (5924, 100)}
  assert set(benchmarks.PUBLISHED_COUNTS["inshop"]) == {"train", "query", "gallery"}


def test_sop_sized_metadata_loads_fast(tmp_path):
  base = tmp_path / "Stanford_Online_Products"
  (base / "bicycle_final").mkdir(parents=True)
  for file, n, first in (("Ebay_train.txt", 59551, 1), ("Ebay_test.txt", 60502, 20000)):
    rows = [f"{i + 1} {first + i // 5} 1 bicycle_final/{i}_{first}.JPG" for i in range(n)]
    (base / file).write_text("image_id class_id super_class_id path\n" + "\n".join(rows))
  start = time.perf_counter()
  dataset = benchmarks.load_sop(str(tmp_path))
  elapsed = time.perf_counter() - start
  assert (len(dataset.train), len(dataset.test)) == (59551, 60502)
  assert elapsed < 10.0, f"{elapsed:.1f} s: loading must not touch every image."


# --- benchmark errors ----------------------------------------------------------------


def rewrite(path, edit):
  """Replaces the lines of a text file by ``edit(lines)``."""
  with open(path) as f:
    lines = f.read().splitlines()
  with open(path, "w") as f:
    f.write("\n".join(edit(lines)) + "\n")


def raises(match, fn, *args):
  with pytest.raises(DataError, match=match) as info:
    fn(*args)
  return str(info.value)


@pytest.mark.parametrize("name,url", [
    ("cub", "data.caltech.edu"), ("cars", "car_dataset.html"),
    ("sop", "Stanford_Online_Products.zip"), ("inshop", "InShopRetrieval.html")])
def test_missing_root_says_where_to_get(tmp_path, name, url):
  message = raises("does not exist", benchmarks.LOADERS[name], str(tmp_path / "nope"))
  assert url in message and str(tmp_path / "nope") in message
  message = raises("not found in", benchmarks.LOADERS[name], str(tmp_path))
  assert url in message


def test_cub_errors(tmp_path):
  fx = F.make_cub(str(tmp_path / "a"), num_classes=4)
  images = os.path.join(fx.root, "images.txt")
  labels = os.path.join(fx.root, "image_class_labels.txt")
  backup = {p: open(p).read() for p in (images, labels)}

  def restore():
    for p, text in backup.items():
      with open(p, "w") as f:
        f.write(text)

  rewrite(images, lambda ls: ls[:2] + [ls[2] + " extra"] + ls[3:])
  raises(re.escape(f"{images}:3: expected 2 fields"), benchmarks.load_cub, fx.root)
  restore()
  rewrite(labels, lambda ls: ls[:1] + ["2 seven"] + ls[2:])
  raises(re.escape(f"{labels}:2: class_id must be an integer"), benchmarks.load_cub,
         fx.root)
  restore()
  rewrite(images, lambda ls: ls[:3] + ls[4:])  # Drops image 4 from images.txt only.
  raises(re.escape(f"{labels}:4: image id 4 has no entry in {images}"),
         benchmarks.load_cub, fx.root)
  restore()
  rewrite(labels, lambda ls: ls[:-1])
  raises(r"1 image id\(s\) of .* have no class", benchmarks.load_cub, fx.root)
  restore()
  rewrite(images, lambda ls: ls + [ls[0]])
  raises(re.escape(f"{images}:{len(backup[images].splitlines()) + 1}: image id 1 is "
                   "listed twice"), benchmarks.load_cub, fx.root)
  restore()
  rewrite(labels, lambda ls: [ln.split()[0] + " 1" for ln in ls])
  raises("1 class", benchmarks.load_cub, fx.root)
  restore()
  for p in (images, labels):
    rewrite(p, lambda ls: [])
  raises(re.escape(f"{images} lists no images"), benchmarks.load_cub, fx.root)
  restore()
  os.remove(labels)
  raises(re.escape(f"metadata file {labels} is missing"), benchmarks.load_cub, fx.root)
  restore()
  shutil.rmtree(os.path.join(fx.root, "images"))
  raises("images not found: .*images.txt lists", benchmarks.load_cub, fx.root)


def test_cars_errors(tmp_path):
  fx = F.make_cars(str(tmp_path / "a"), num_classes=4)
  mat = os.path.join(fx.root, "cars_annos.mat")
  good = scipy.io.loadmat(mat)
  scipy.io.savemat(mat, {"class_names": good["class_names"]})
  raises(re.escape(f"{mat} has no 'annotations' variable"), benchmarks.load_cars, fx.root)
  annots = good["annotations"]
  fields = [f for f in annots.dtype.names if f != "class"]
  stripped = np.empty(annots.shape, dtype=[(f, object) for f in fields])
  for f in fields:
    stripped[f] = annots[f]
  scipy.io.savemat(mat, {"annotations": stripped})
  raises(re.escape(f"{mat}: 'annotations' lacks the field(s) class"),
         benchmarks.load_cars, fx.root)
  broken = annots.copy()
  broken[0, 2]["class"] = np.array(["x"])
  scipy.io.savemat(mat, {"annotations": broken})
  raises(re.escape(f"{mat}: annotations(3).class is 'x'"), benchmarks.load_cars, fx.root)
  with open(mat, "wb") as f:
    f.write(b"not a mat file at all" * 10)
  raises(re.escape(f"{mat} is not a readable MATLAB file"), benchmarks.load_cars,
         fx.root)
  scipy.io.savemat(mat, {"annotations": annots})
  shutil.rmtree(os.path.join(fx.root, "car_ims"))
  raises("images not found: .*cars_annos.mat lists car_ims/", benchmarks.load_cars,
         fx.root)
  # Two dataset folders under one parent: ambiguous, so the user must choose.
  F.make_cars(str(tmp_path / "b"), num_classes=4)
  raises("several folders", benchmarks.load_cars, str(tmp_path))


def test_sop_errors(tmp_path):
  fx = F.make_sop(str(tmp_path), num_classes=4)
  train = os.path.join(fx.root, "Ebay_train.txt")
  test = os.path.join(fx.root, "Ebay_test.txt")
  text = open(train).read()
  rewrite(train, lambda ls: ls[1:])
  raises(re.escape(f"{train}:1: expected the header 'image_id class_id super_class_id "
                   "path'"), benchmarks.load_sop, fx.root)
  rewrite(train, lambda ls: [text.splitlines()[0]] + ls[:1] + ["3 x 1 a.JPG"])
  raises(re.escape(f"{train}:3: class_id must be an integer"), benchmarks.load_sop,
         fx.root)
  rewrite(train, lambda ls: ls[:2] + ["3 1 1"])
  raises(re.escape(f"{train}:3: expected 4 fields"), benchmarks.load_sop, fx.root)
  rewrite(train, lambda ls: ls[:1])
  raises(re.escape(f"{train} lists no images"), benchmarks.load_sop, fx.root)
  with open(train, "w") as f:
    f.write(text)
  test_text = open(test).read()
  rewrite(test, lambda ls: ls + [text.splitlines()[1]])
  raises("share 1 class id", benchmarks.load_sop, fx.root)
  os.remove(test)
  raises(re.escape(f"metadata file {test} is missing"), benchmarks.load_sop, fx.root)
  with open(test, "w") as f:
    f.write(test_text)
  benchmarks.load_sop(fx.root)


def test_inshop_errors(tmp_path):
  fx = F.make_inshop(str(tmp_path), num_items=6)
  path = os.path.join(fx.root, "Eval", "list_eval_partition.txt")
  text = open(path).read()

  def restore():
    with open(path, "w") as f:
      f.write(text)

  rewrite(path, lambda ls: ls[:3] + [ls[3].replace("train", "val")] + ls[4:])
  raises(re.escape(f"{path}:4: evaluation_status must be one of train, query, gallery, "
                   "got 'val'"), benchmarks.load_inshop, fx.root)
  restore()
  rewrite(path, lambda ls: ls[:1] + ls[2:])
  raises(re.escape(f"{path}:2: expected the header"), benchmarks.load_inshop, fx.root)
  restore()
  rewrite(path, lambda ls: ls[1:])
  raises(re.escape(f"{path}:1: expected the number of images"), benchmarks.load_inshop,
         fx.root)
  restore()
  rewrite(path, lambda ls: ls[:-1])
  raises(re.escape(f"{path}:1 declares"), benchmarks.load_inshop, fx.root)
  restore()
  rewrite(path, lambda ls: ls[:4] + [ls[4] + " extra"] + ls[5:])
  raises(re.escape(f"{path}:5: expected 3 fields"), benchmarks.load_inshop, fx.root)
  restore()
  rewrite(path, lambda ls: [str(sum("gallery" not in ln for ln in ls[2:]))] + ls[1:2]
          + [ln for ln in ls[2:] if "gallery" not in ln])
  raises("lists no 'gallery' images", benchmarks.load_inshop, fx.root)
  restore()
  first_test = next(ln for ln in text.splitlines() if ln.endswith("query"))
  rewrite(path, lambda ls: [str(int(ls[0]) + 1)] + ls[1:] + [
      first_test.replace("query", "train").replace("01_1_front", "09_1_front")])
  raises("have both 'train' and query/gallery images", benchmarks.load_inshop, fx.root)
  restore()
  shutil.rmtree(os.path.join(fx.root, "Img"))
  raises("images not found: .*neither", benchmarks.load_inshop, fx.root)


# --- folder source -------------------------------------------------------------------


@pytest.mark.parametrize("depth,num_classes,fraction", [
    (2, 6, 0.5), (2, 11, 0.7), (1, 3, 0.34), (3, 5, 0.5)])
def test_folder_reads_fixture(tmp_path, depth, num_classes, fraction):
  fx = F.make_folder(str(tmp_path), num_classes=num_classes, depth=depth,
                     train_fraction=fraction)
  dataset = folder.load_folder(str(tmp_path), train_fraction=fraction)
  assert dataset.name == "folder"
  check_matches(dataset, fx)
  check_protocol(dataset)
  assert len(dataset.train.class_names) == round(num_classes * fraction)
  names = dataset.train.class_names + dataset.test.class_names
  assert list(names) == sorted(names, key=lambda p: p.split("/"))
  assert all(n.count("/") == depth - 1 for n in names)


def test_folder_sorting_and_hidden_files(tmp_path):
  F.make_folder(str(tmp_path), num_classes=12, sizes=3, depth=2)
  dataset = folder.load_folder(str(tmp_path))
  names = dataset.train.class_names + dataset.test.class_names
  # "char10" sorts before "char2"; hidden and non-image entries are never classes.
  assert names[:3] == ("alphabet0/char1", "alphabet0/char11", "alphabet0/char3")
  assert len(names) == 12
  first = [dataset.train.images.describe(i) for i in range(3)]
  assert [os.path.basename(p) for p in first] == ["img1.png", "img2.JPG", "img3.jpeg"]
  every = [s.images.describe(i) for s in (dataset.train, dataset.test)
           for i in range(len(s))]
  assert not any("/." in p for p in every)


def test_folder_errors(tmp_path):
  raises("does not exist", folder.load_folder, str(tmp_path / "nope"))
  (tmp_path / "docs").mkdir()
  (tmp_path / "docs" / "a.txt").write_text("x")
  F.write_image(str(tmp_path / ".hidden" / "c" / "1.png"), 1)
  raises("no class directories found under", folder.load_folder, str(tmp_path))
  F.make_folder(str(tmp_path), num_classes=6)
  for fraction in (0.0, 1.0, 0.05, 0.95):
    raises(r"leaves \d+ for train and \d+ for test", folder.load_folder, str(tmp_path),
           fraction)
  raises(r"must lie in \[0, 1\]", folder.load_folder, str(tmp_path), 1.5)
  raises(r"must lie in \[0, 1\]", folder.load_folder, str(tmp_path), -0.1)
