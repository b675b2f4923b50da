"""The tfds source and builders on tiny generated copies of the four benchmarks.

Each benchmark's raw files (CUB_200_2011/, Cars-196's folders and .mat files,
Stanford_Online_Products/, In-Shop's Eval/ + Img/) are generated with every class but a
few images, written by ``prepare_tfds`` as genuine array_record TFDS datasets under the
real names and versions, and read back by ``load_tfds`` through the registered TFDS
builders. No network, no TensorFlow.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from msjax.data import tfds_build
from msjax.data.records import DataError
from msjax.data.tfds_source import TFDS_NAMES, TfdsImages, load_tfds, prepare_tfds


class Images:
  """Distinct solid-colour JPEGs; remembers what each encodes."""

  def __init__(self):
    self.by_bytes: dict[bytes, dict] = {}

  def jpeg(self, **meta) -> bytes:
    i = len(self.by_bytes)
    # Channel levels 17 apart: JPEG keeps solid colours within a few levels, so every
    # image has its own bytes and decodes back to its own colour.
    color = (17 * (i % 15), 17 * (i // 15 % 15), 17 * (i // 225 % 15))
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), color).save(buffer, format="JPEG", quality=95)
    data = buffer.getvalue()
    assert data not in self.by_bytes
    self.by_bytes[data] = dict(meta, color=color)
    return data


def _write(path, data: bytes | str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def _mask_png(width=16, height=12) -> bytes:
  buffer = io.BytesIO()
  Image.new("L", (width, height), 255).save(buffer, format="PNG")
  return buffer.getvalue()


def make_cub(root, images: Images):
  """All 200 classes; class c has 1 + c % 2 images, the TFDS flag alternating."""
  lines = {"images.txt": [], "train_test_split.txt": [], "bounding_boxes.txt": []}
  image_id = 0
  for c in range(1, 201):
    folder = f"{c:03d}.Bird_{c}"
    for k in range(1 + c % 2):
      image_id += 1
      rel = f"{folder}/Bird_{c}_{k:04d}.jpg"
      flag = image_id % 2
      _write(os.path.join(root, "CUB_200_2011", "images", rel),
             images.jpeg(dataset="cub", cls=c, tfds_split="train" if flag else "test"))
      _write(os.path.join(root, "segmentations", folder, f"Bird_{c}_{k:04d}.png"), _mask_png())
      lines["images.txt"].append(f"{image_id} {rel}")
      lines["train_test_split.txt"].append(f"{image_id} {flag}")
      lines["bounding_boxes.txt"].append(f"{image_id} 1.0 2.0 8.0 6.0")
  for name, rows in lines.items():
    _write(os.path.join(root, "CUB_200_2011", name), "\n".join(rows) + "\n")


def make_cars(root, images: Images):
  """All 196 classes, one image each in the official train and test halves; images
  nested one level deeper, as some mirrors ship them."""
  import scipy.io
  fields = [(k, "O") for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
  for split, mat in (("train", "devkit/cars_train_annos.mat"),
                     ("test", "cars_test_annos_withlabels.mat")):
    annotations = np.zeros((1, 196), dtype=fields)
    for c in range(1, 197):
      fname = f"{c:05d}.jpg"
      _write(os.path.join(root, f"cars_{split}", f"cars_{split}", fname),
             images.jpeg(dataset="cars", cls=c, tfds_split=split))
      annotations[0, c - 1] = tuple(np.array([[v]], np.uint16) for v in (1, 2, 8, 6, c)) + (
          np.array([fname]),)
    os.makedirs(os.path.dirname(os.path.join(root, mat)), exist_ok=True)
    scipy.io.savemat(os.path.join(root, mat), {"annotations": annotations})


SOP_CLASSES = {"train": (1, 2, 3, 11318), "test": (11319, 11320, 22634)}


def make_sop(root, images: Images):
  """Two images for a few classes at both ends of each half's class range."""
  folder = os.path.join(root, "Stanford_Online_Products")
  image_id = 0
  for split, classes in SOP_CLASSES.items():
    rows = ["image_id class_id super_class_id path"]
    for c in classes:
      for k in range(2):
        image_id += 1
        rel = f"bicycle_final/{c}_{k}.JPG"
        _write(os.path.join(folder, rel), images.jpeg(dataset="sop", cls=c))
        rows.append(f"{image_id} {c} {c % 12 + 1} {rel}")
    _write(os.path.join(folder, f"Ebay_{split}.txt"), "\n".join(rows) + "\n")


# (item, status, count): items 4-5 in query and gallery, 6 gallery only, 7 query only.
INSHOP_ROWS = [(1, "train", 2), (2, "train", 2), (3, "train", 1), (4, "query", 2),
               (4, "gallery", 1), (5, "query", 1), (5, "gallery", 2), (6, "gallery", 1),
               (7, "query", 1)]


def make_inshop(root, images: Images, with_img_level: bool):
  """Eval/list_eval_partition.txt and images under Img/img/ or img/."""
  rows = []
  for item, status, count in INSHOP_ROWS:
    for k in range(count):
      name = f"img/WOMEN/Dresses/id_{item:08d}/{k:02d}_{status[0]}_front.jpg"
      path = os.path.join(root, "Img", name) if with_img_level else os.path.join(root, name)
      _write(path, images.jpeg(dataset="inshop", item=f"id_{item:08d}", status=status,
                               name=name))
      rows.append(f"{name} id_{item:08d} {status}")
  _write(os.path.join(root, "Eval", "list_eval_partition.txt"),
         f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Raw files for each benchmark, prepared once into one TFDS data_dir."""
  tfds.disable_progress_bar()
  base = tmp_path_factory.mktemp("tfds")
  images = Images()
  data_dir = str(base / "data")
  manual = {}
  for dataset, make in (("cub", make_cub), ("cars", make_cars), ("sop", make_sop)):
    manual[dataset] = str(base / "manual" / dataset)
    make(manual[dataset], images)
  manual["inshop"] = str(base / "manual" / "inshop")
  make_inshop(manual["inshop"], images, with_img_level=True)
  manual["inshop_flat"] = str(base / "manual" / "inshop_flat")
  make_inshop(manual["inshop_flat"], images, with_img_level=False)
  prepared = {d: prepare_tfds(d, data_dir, manual_dir=manual[d])
              for d in ("cub", "cars", "sop", "inshop")}
  flat_dir = str(base / "data_flat")
  prepared["inshop_flat"] = prepare_tfds("inshop", flat_dir, manual_dir=manual["inshop_flat"])
  return {"base": base, "data_dir": data_dir, "flat_dir": flat_dir, "manual": manual,
          "prepared": prepared, "images": images}


def _source_of(images: Images, split, i) -> dict:
  data = split.images.read(i)
  assert isinstance(data, bytes)
  return images.by_bytes[data]


def test_prepared_under_real_names_and_versions(built):
  versions = {"cub": "0.2.0", "cars": "2.1.0", "sop": "1.0.0", "inshop": "1.0.0"}
  for key, path in built["prepared"].items():
    dataset = "inshop" if key == "inshop_flat" else key
    data_dir = built["flat_dir"] if key == "inshop_flat" else built["data_dir"]
    assert path == os.path.join(data_dir, TFDS_NAMES[dataset], versions[dataset])
    assert any(".array_record-" in f for f in os.listdir(path))
  # The catalog builders (what tfds.data_source uses) read what was written.
  builder = tfds.builder("caltech_birds2011", data_dir=built["data_dir"])
  assert builder.is_prepared()
  assert {s: builder.info.splits[s].num_examples for s in ("train", "test")} == {
      "train": 150, "test": 150}
  builder = tfds.builder("inshop_clothes_retrieval", data_dir=built["data_dir"])
  assert {s: builder.info.splits[s].num_examples for s in ("train", "query", "gallery")} == {
      "train": 5, "query": 4, "gallery": 4}


def test_raw_parsing_agrees_with_tfds_decoding(built):
  """Labels and image bytes as read here equal TFDS's own decoding of the records."""
  ds = load_tfds("cars", built["data_dir"])
  decoded = tfds.data_source("cars196", split="train+test", data_dir=built["data_dir"],
                             download=False,
                             decoders={"image": tfds.decode.SkipDecoding()})
  for split in (ds.train, ds.test):
    for i in range(0, len(split), 7):
      record = decoded[int(split.images.indices[i])]
      assert record["image"] == split.images.read(i)
      assert split.class_names[split.labels[i]] == str(record["label"] + 1)
      meta = built["images"].by_bytes[record["image"]]
      assert record["id"] == f"{meta['cls']:05d}".encode()  # Text decodes to bytes


def test_prepare_splits_past_the_shuffle_memory_limit(built, tmp_path, monkeypatch):
  """A split bigger than TFDS's in-memory shuffle buffer (here: any split) is written
  without TensorFlow, which TFDS would otherwise need to spill it to disk."""
  import importlib.util
  from tensorflow_datasets.core import shuffle
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed; TFDS spills to disk as designed.")
  monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 0)
  prepare_tfds("sop", str(tmp_path), manual_dir=built["manual"]["sop"])
  assert shuffle.MAX_MEM_BUFFER_SIZE == 0  # restored
  ds = load_tfds("sop", str(tmp_path))
  assert (len(ds.train), len(ds.test)) == (8, 6)


def test_prepare_again_keeps_the_dataset(built):
  path = built["prepared"]["sop"]
  stamp = os.path.getmtime(os.path.join(path, "dataset_info.json"))
  assert prepare_tfds("sop", built["data_dir"], manual_dir=built["manual"]["sop"]) == path
  assert os.path.getmtime(os.path.join(path, "dataset_info.json")) == stamp


@pytest.mark.parametrize("dataset,num_classes", [("cub", 200), ("cars", 196)])
def test_cub_cars_resplit_by_class(built, dataset, num_classes):
  ds = load_tfds(dataset, built["data_dir"])
  half = num_classes // 2
  assert ds.gallery is None and ds.val is None
  assert ds.train.class_names == tuple(str(c) for c in range(1, half + 1))
  assert ds.test.class_names == tuple(str(c) for c in range(half + 1, num_classes + 1))
  sizes = {"cub": lambda c: 1 + c % 2, "cars": lambda c: 2}[dataset]
  assert len(ds.train) == sum(sizes(c) for c in range(1, half + 1))
  assert len(ds.test) == sum(sizes(c) for c in range(half + 1, num_classes + 1))
  seen, tfds_splits = set(), {"train": set(), "test": set()}
  for split in (ds.train, ds.test):
    assert split.labels.dtype == np.int32
    assert set(split.labels.tolist()) == set(range(split.num_classes))  # contiguous
    for i in range(len(split)):
      meta = _source_of(built["images"], split, i)
      assert meta["dataset"] == dataset
      assert split.class_names[split.labels[i]] == str(meta["cls"])
      seen.add(split.images.read(i))
      tfds_splits[split.name].add(meta["tfds_split"])
  assert len(seen) == len(ds.train) + len(ds.test)  # disjoint, and every image once
  # Both protocol halves draw from TFDS's train and test splits alike.
  assert tfds_splits == {"train": {"train", "test"}, "test": {"train", "test"}}


def test_sop_keeps_tfds_splits(built):
  ds = load_tfds("sop", built["data_dir"])
  for split in (ds.train, ds.test):
    classes = SOP_CLASSES[split.name]
    assert split.class_names == tuple(str(c) for c in classes)
    assert len(split) == 2 * len(classes)
    assert np.array_equal(split.class_sizes(), np.full(len(classes), 2))
    for i in range(len(split)):
      assert split.class_names[split.labels[i]] == str(
          _source_of(built["images"], split, i)["cls"])
  assert not set(ds.train.class_names) & set(ds.test.class_names)


def _partition(manual_dir):
  with open(os.path.join(manual_dir, "Eval", "list_eval_partition.txt")) as f:
    lines = f.read().splitlines()
  assert int(lines[0]) == len(lines) - 2
  return [tuple(line.split()) for line in lines[2:]]


@pytest.mark.parametrize("layout", ["inshop", "inshop_flat"])
def test_inshop_splits_follow_partition_file(built, layout):
  data_dir = built["data_dir"] if layout == "inshop" else built["flat_dir"]
  ds = load_tfds("inshop", data_dir)
  rows = _partition(built["manual"][layout])
  splits = {"train": ds.train, "query": ds.test, "gallery": ds.gallery}
  assert ds.splits().keys() == {"train", "query", "gallery"}
  for status, split in splits.items():
    expected = sorted((name, item) for name, item, s in rows if s == status)
    got = []
    for i in range(len(split)):
      meta = _source_of(built["images"], split, i)
      assert meta["status"] == status
      assert split.class_names[split.labels[i]] == meta["item"]
      got.append((meta["name"], meta["item"]))
    assert sorted(got) == expected
    assert set(split.labels.tolist()) <= set(range(split.num_classes))
  assert ds.train.class_names == ("id_00000001", "id_00000002", "id_00000003")
  # One numbering for query and gallery: the union of their items.
  union = ("id_00000004", "id_00000005", "id_00000006", "id_00000007")
  assert ds.test.class_names == ds.gallery.class_names == union
  assert sorted(ds.test.labels.tolist()) == [0, 0, 1, 3]
  assert sorted(ds.gallery.labels.tolist()) == [0, 1, 1, 2]


def test_images_decode_to_generated_pixels(built):
  for dataset in ("cub", "inshop"):
    ds = load_tfds(dataset, built["data_dir"])
    for split in ds.splits().values():
      for i in range(0, len(split), max(1, len(split) // 5)):
        data = split.images.read(i)
        with Image.open(io.BytesIO(data)) as im:
          assert im.format == "JPEG"
          pixels = np.asarray(im.convert("RGB"), np.int32)
        assert pixels.shape == (12, 16, 3)
        color = built["images"].by_bytes[data]["color"]
        np.testing.assert_allclose(pixels, np.broadcast_to(color, pixels.shape), atol=4)


def test_tfds_images_pickle_cheaply_and_reopen(built):
  ds = load_tfds("cub", built["data_dir"])
  images = ds.train.images
  assert isinstance(images, TfdsImages)
  assert (images.name, images.version, images.split) == ("caltech_birds2011", "0.2.0",
                                                          "train+test")
  first = images.read(0)  # opens the data source in this process
  blob = pickle.dumps(images)
  assert len(blob) < 1000 + images.indices.nbytes
  assert b"ArrayRecord" not in blob
  clone = pickle.loads(blob)
  assert "_opened" not in clone.__dict__
  assert clone.read(0) == first and clone.read(len(clone) - 1) == images.read(len(images) - 1)
  assert np.array_equal(clone.indices, images.indices)
  # A reader opened in another process is not reused.
  clone.__dict__["_opened"] = (-1, None)
  assert clone.read(1) == images.read(1)
  index = int(images.indices[3])
  assert images.describe(3) == (f"tfds:caltech_birds2011/train+test[{index}] "
                                f"({built['data_dir']})")


def test_tfds_images_read_in_a_fresh_process(built, tmp_path):
  """A worker process unpickles the images and opens the dataset itself (In-Shop's
  builder is registered by the import that unpickling does)."""
  ds = load_tfds("inshop", built["data_dir"])
  (tmp_path / "images.pkl").write_bytes(pickle.dumps(ds.gallery.images))
  script = ("import pickle, sys; images = pickle.load(open(sys.argv[1], 'rb')); "
            "sys.stdout.buffer.write(b''.join(images.read(i) for i in range(len(images))))")
  out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "images.pkl")],
                       capture_output=True, check=True, timeout=120).stdout
  assert out == b"".join(ds.gallery.images.read(i) for i in range(len(ds.gallery)))


# ------------------------------------------------------------------------------ errors


def test_load_missing_data_dir(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    load_tfds("cub", str(tmp_path / "nowhere"))


def test_load_unknown_dataset(tmp_path):
  with pytest.raises(DataError, match="unknown TFDS dataset 'mnist'"):
    load_tfds("mnist", str(tmp_path))


@pytest.mark.parametrize("dataset", ["cub", "cars", "sop", "inshop"])
def test_load_unprepared_says_how_to_prepare(tmp_path, dataset):
  with pytest.raises(DataError) as info:
    load_tfds(dataset, str(tmp_path))
  message = str(info.value)
  assert f"{TFDS_NAMES[dataset]} " in message and "is not prepared" in message
  assert (f"python -m msjax.data prepare_tfds --dataset {dataset} --data_dir {tmp_path} "
          "--manual_dir DIR") in message
  if dataset in ("cub", "sop"):
    assert f"tfds build {TFDS_NAMES[dataset]} --data_dir={tmp_path} " \
           "--file_format=array_record" in message
  else:
    assert "cannot download" in message
  if dataset == "cars":
    assert "no longer serve" in message and "cars_train_annos.mat" in message
  if dataset == "inshop":
    assert "Eval/list_eval_partition.txt" in message


def test_load_other_version_names_it(built, tmp_path):
  shutil.copytree(built["prepared"]["sop"], tmp_path / "stanford_online_products" / "0.9.0")
  with pytest.raises(DataError, match="holds 0.9.0; this TFDS reads 1.0.0"):
    load_tfds("sop", str(tmp_path))


def test_load_non_array_record_format(built, tmp_path):
  path = tmp_path / "stanford_online_products" / "1.0.0"
  shutil.copytree(built["prepared"]["sop"], path)
  info = json.loads((path / "dataset_info.json").read_text())
  info["fileFormat"] = "tfrecord"
  info.pop("alternativeFileFormats", None)
  (path / "dataset_info.json").write_text(json.dumps(info))
  with pytest.raises(DataError, match="holds stanford_online_products as tfrecord.*"
                     "needs array_record"):
    load_tfds("sop", str(tmp_path))
  # prepare_tfds refuses to leave it there too.
  with pytest.raises(DataError, match="delete that folder"):
    prepare_tfds("sop", str(tmp_path), manual_dir=built["manual"]["sop"])


def test_prepare_unknown_dataset(tmp_path):
  with pytest.raises(DataError, match="unknown TFDS dataset"):
    prepare_tfds("imagenet", str(tmp_path))


@pytest.mark.parametrize("dataset", ["cars", "inshop"])
def test_prepare_needs_manual_dir(tmp_path, dataset):
  with pytest.raises(DataError, match=f"preparing {TFDS_NAMES[dataset]} needs manual_dir"):
    prepare_tfds(dataset, str(tmp_path))


@pytest.mark.parametrize("dataset", ["cub", "cars", "sop", "inshop"])
def test_prepare_missing_manual_dir(tmp_path, dataset):
  with pytest.raises(DataError, match="manual_dir .*nowhere does not exist"):
    prepare_tfds(dataset, str(tmp_path / "data"), manual_dir=str(tmp_path / "nowhere"))


@pytest.mark.parametrize("dataset,match", [
    ("cub", "no CUB_200_2011/images.txt"),
    ("cars", "Cars-196 files missing .*cars_train, cars_test, train_annos, test_annos"),
    ("sop", "no Stanford_Online_Products/Ebay_train.txt"),
    ("inshop", "In-Shop partition file .*list_eval_partition.txt not found"),
])
def test_prepare_empty_manual_dir(tmp_path, dataset, match):
  (tmp_path / "manual").mkdir()
  with pytest.raises(DataError, match=match):
    prepare_tfds(dataset, str(tmp_path / "data"), manual_dir=str(tmp_path / "manual"))
  assert not (tmp_path / "data").exists()  # nothing half-written


def test_prepare_cub_without_segmentations(tmp_path):
  make_cub(str(tmp_path / "manual"), Images())
  shutil.rmtree(tmp_path / "manual" / "segmentations")
  with pytest.raises(DataError, match="no segmentations/ folder"):
    prepare_tfds("cub", str(tmp_path / "data"), manual_dir=str(tmp_path / "manual"))


def test_prepare_download_needs_tensorflow(tmp_path):
  import importlib.util
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed; the catalog builder would download.")
  with pytest.raises(DataError, match="needs tensorflow.*pass manual_dir"):
    prepare_tfds("cub", str(tmp_path))


def test_inshop_partition_errors(tmp_path):
  make_inshop(str(tmp_path), Images(), with_img_level=True)
  partition = tmp_path / "Eval" / "list_eval_partition.txt"
  lines = partition.read_text().splitlines()
  root, rows = tfds_build.read_inshop_partition(str(tmp_path))
  assert root == str(tmp_path / "Img") and rows == [tuple(line.split()) for line in lines[2:]]

  partition.write_text("\n".join(["99"] + lines[1:]) + "\n")
  with pytest.raises(DataError, match="announces 99 images but 13 rows"):
    tfds_build.read_inshop_partition(str(tmp_path))
  partition.write_text("\n".join(lines[:2] + [lines[2] + " extra"] + lines[3:]) + "\n")
  with pytest.raises(DataError, match="line 3: expected"):
    tfds_build.read_inshop_partition(str(tmp_path))
  partition.write_text("\n".join(lines) + "\n")
  shutil.rmtree(tmp_path / "Img")
  with pytest.raises(DataError, match="neither at .*Img/img/.* nor at"):
    prepare_tfds("inshop", str(tmp_path / "data"), manual_dir=str(tmp_path))
