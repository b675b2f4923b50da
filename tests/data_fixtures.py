"""Tiny, faithful copies of the dataset layouts msjax reads, written for tests.

Each ``make_*`` writes one layout under a directory — the real metadata files in their
real formats (plain-text listings, the MATLAB v5 ``cars_annos.mat``), and small real
image files — and returns a ``Fixture`` describing what a correct loader must return:
every split's images in order, with their class names and expected labels.

Every image's pixels are a function of its *image id* (1, 2, ... over the whole
fixture, in metadata order): a flat colour that ``image_id_of`` maps back to the id
after decoding, even through JPEG, so a test can check which file a split index reads.
Sizes vary with the id too (``image_size``), so resizing code sees several shapes.

Class sizes are ``sizes`` (one count per class, or one count for all); the default,
``default_sizes``, is uneven and includes single-image classes.
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

# --- images --------------------------------------------------------------------------

_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".gif": "GIF",
            ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}
MAX_IMAGE_ID = 4095  # 12 bits: three channels of 16 levels each.


def image_color(image_id: int) -> tuple[int, int, int]:
  """The flat RGB colour of image ``image_id``: its id in base 16, one digit a channel.

  Levels sit 16 apart (8, 24, ..., 248), far beyond JPEG's error on a flat colour.
  """
  if not 0 <= image_id <= MAX_IMAGE_ID:
    raise ValueError(f"image ids must lie in [0, {MAX_IMAGE_ID}]; got {image_id}.")
  return tuple(8 + 16 * ((image_id >> (4 * k)) & 15) for k in range(3))


def image_size(image_id: int) -> tuple[int, int]:
  """``(width, height)`` of image ``image_id``: small, and varying with the id."""
  return 12 + 3 * (image_id % 5), 10 + 2 * (image_id % 4)


def image_array(image_id: int) -> np.ndarray:
  """The ``uint8 [H, W, 3]`` pixels written for ``image_id`` (before any JPEG loss)."""
  w, h = image_size(image_id)
  return np.broadcast_to(np.asarray(image_color(image_id), np.uint8), (h, w, 3)).copy()


def write_image(path: str, image_id: int, grayscale: bool = False) -> None:
  """Writes image ``image_id`` to ``path`` in the format its extension names.

  ``grayscale`` writes a one-channel (mode ``L``) image, as a few CUB and SOP files
  are; its grey level is the colour's luminance, which ``image_id_of`` cannot invert.
  """
  fmt = _FORMATS[os.path.splitext(path)[1].lower()]
  img = Image.fromarray(image_array(image_id))
  if grayscale:
    img = img.convert("L")
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  options = {"JPEG": {"quality": 95}, "WEBP": {"lossless": True}}.get(fmt, {})
  img.save(path, format=fmt, **options)


def image_id_of(data: bytes | np.ndarray) -> int:
  """The id of a colour fixture image, from its encoded bytes or decoded pixels."""
  if isinstance(data, (bytes, bytearray)):
    with Image.open(io.BytesIO(data)) as img:
      data = np.asarray(img.convert("RGB"))
  mean = np.asarray(data, np.float64).reshape(-1, 3).mean(axis=0)
  digits = np.clip(np.round((mean - 8) / 16), 0, 15).astype(int)
  return int(digits[0] + 16 * digits[1] + 256 * digits[2])


# --- what a loader must return -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FixtureImage:
  """One image: its file (absolute path), pixel id and class as the loader names it."""

  path: str
  image_id: int
  class_name: str


@dataclasses.dataclass(frozen=True)
class Fixture:
  """A written layout and the ``Dataset`` a correct loader returns for it.

  Attributes:
    name: the loader's name (``"cub"``, ``"cars"``, ``"sop"``, ``"inshop"``,
      ``"folder"``).
    root: the dataset folder to pass to the loader (also the place the files are).
    splits: split name (``"train"``, ``"test"``, or ``"train"``, ``"query"``,
      ``"gallery"`` for In-Shop) -> its images in the order the loader returns them.
    class_names: split name -> the expected ``Split.class_names`` (label ``c`` is
      ``class_names[c]``); In-Shop's query and gallery share one vocabulary.
  """

  name: str
  root: str
  splits: dict[str, tuple[FixtureImage, ...]]
  class_names: dict[str, tuple[str, ...]]

  def labels(self, split: str) -> np.ndarray:
    """The expected ``int32`` labels of ``split``."""
    index = {c: k for k, c in enumerate(self.class_names[split])}
    return np.asarray([index[im.class_name] for im in self.splits[split]], np.int32)

  def paths(self, split: str) -> list[str]:
    """The absolute file paths of ``split``, in order."""
    return [im.path for im in self.splits[split]]

  def image_ids(self, split: str) -> list[int]:
    return [im.image_id for im in self.splits[split]]

  def counts(self) -> dict[str, tuple[int, int]]:
    """Split -> (images, classes), shaped like ``benchmarks.PUBLISHED_COUNTS``."""
    return {s: (len(ims), len(self.class_names[s])) for s, ims in self.splits.items()}


def default_sizes(num_classes: int) -> list[int]:
  """Uneven class sizes 2, 1, 3, 4, 2, 1, 3, 4, ...: single-image classes included."""
  return [(2, 1, 3, 4)[c % 4] for c in range(num_classes)]


def _sizes(num_classes: int, sizes: int | Sequence[int] | None) -> list[int]:
  if sizes is None:
    return default_sizes(num_classes)
  if isinstance(sizes, int):
    return [sizes] * num_classes
  sizes = list(sizes)
  if len(sizes) != num_classes or min(sizes) < 1:
    raise ValueError(f"sizes must hold {num_classes} counts >= 1; got {sizes}.")
  return sizes


def _order(n: int, shuffle_seed: int | None) -> np.ndarray:
  return (np.arange(n) if shuffle_seed is None
          else np.random.default_rng(shuffle_seed).permutation(n))


def _write_text(path: str, lines: Iterable[str]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.writelines(line + "\n" for line in lines)


def _by_class_order(images: list[FixtureImage], order_key) -> tuple[str, ...]:
  return tuple(sorted({im.class_name for im in images}, key=order_key))


# --- the benchmarks ------------------------------------------------------------------


def make_cub(directory: str, num_classes: int = 12, sizes=None,
             shuffle_seed: int | None = None, grayscale: Iterable[int] = ()) -> Fixture:
  """Writes ``directory/CUB_200_2011/`` as ``CUB_200_2011.tgz`` unpacks.

  Files: ``images.txt`` (``<image id> <class folder>/<file>.jpg``),
  ``image_class_labels.txt`` (``<image id> <class 1..C>``), ``classes.txt``
  (``<class> 001.Name``), ``train_test_split.txt`` (``<image id> <0|1>``, alternating
  within each class, so both halves hold images of both flags, as the real file does),
  ``bounding_boxes.txt`` and ``images/<class folder>/*.jpg``. Rows are grouped by class
  as published, or in a fixed shuffled order with ``shuffle_seed``. ``grayscale``:
  image ids written as one-channel JPEGs. Expected: classes ``1..C//2`` train, the rest
  test, each in ``images.txt`` order.
  """
  base = os.path.join(directory, "CUB_200_2011")
  grayscale = set(grayscale)
  folders = [f"{c:03d}.Bird_{chr(65 + c % 26)}{c}" for c in range(1, num_classes + 1)]
  rows = []  # (image id, relative path, class id, training flag)
  for c, size in enumerate(_sizes(num_classes, sizes), start=1):
    for k in range(size):
      image_id = len(rows) + 1
      rel = f"{folders[c - 1]}/{folders[c - 1][4:]}_{k + 1:04d}_{700000 + image_id}.jpg"
      rows.append((image_id, rel, c, k % 2))
  rows = [rows[i] for i in _order(len(rows), shuffle_seed)]
  for image_id, rel, _, _ in rows:
    write_image(os.path.join(base, "images", rel), image_id, image_id in grayscale)
  _write_text(os.path.join(base, "images.txt"), (f"{i} {rel}" for i, rel, _, _ in rows))
  _write_text(os.path.join(base, "image_class_labels.txt"),
              (f"{i} {c}" for i, _, c, _ in rows))
  _write_text(os.path.join(base, "train_test_split.txt"),
              (f"{i} {flag}" for i, _, _, flag in rows))
  _write_text(os.path.join(base, "bounding_boxes.txt"),
              (f"{i} 1.0 2.0 {image_size(i)[0] - 2}.0 {image_size(i)[1] - 3}.0"
               for i, _, _, _ in rows))
  _write_text(os.path.join(base, "classes.txt"),
              (f"{c} {folders[c - 1]}" for c in range(1, num_classes + 1)))
  return _class_split_fixture("cub", base, os.path.join(base, "images"), rows,
                              num_classes)


def _class_split_fixture(name, root, image_root, rows, num_classes) -> Fixture:
  """Expected splits of the class-id protocol: ids ``1..C//2`` train, the rest test."""
  half = num_classes // 2
  splits = {"train": [], "test": []}
  for image_id, rel, c, _ in rows:
    splits["train" if c <= half else "test"].append(
        FixtureImage(os.path.join(image_root, rel), image_id, str(c)))
  return Fixture(name, root, {s: tuple(v) for s, v in splits.items()},
                 {s: _by_class_order(v, int) for s, v in splits.items()})


def make_cars(directory: str, num_classes: int = 12, sizes=None,
              shuffle_seed: int | None = None, grayscale: Iterable[int] = ()) -> Fixture:
  """Writes ``directory/{cars_annos.mat, car_ims/000001.jpg, ...}`` as published.

  ``cars_annos.mat`` is a MATLAB v5 file (``scipy.io.savemat``) holding, like the real
  one, a ``1 × N`` struct array ``annotations`` with fields ``relative_im_path``
  (``car_ims/000001.jpg``), ``bbox_x1``, ``bbox_y1``, ``bbox_x2``, ``bbox_y2``,
  ``class`` (1..C) and ``test`` (0/1, alternating within each class), and a ``1 × C``
  cell array ``class_names``. Images are numbered in annotation order; annotations are
  grouped by class, or in a fixed shuffled order with ``shuffle_seed``. Expected:
  classes ``1..C//2`` train, the rest test, in annotation order.
  """
  import scipy.io

  grayscale = set(grayscale)
  classes = [c for c, size in enumerate(_sizes(num_classes, sizes), start=1)
             for _ in range(size)]
  classes = [classes[i] for i in _order(len(classes), shuffle_seed)]
  fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class",
            "test")
  annotations = np.empty((1, len(classes)), dtype=[(f, object) for f in fields])
  rows = []
  seen = {}
  class_dtype = np.uint8 if num_classes < 256 else np.uint16
  for i, c in enumerate(classes):
    image_id = i + 1
    rel = f"car_ims/{image_id:06d}.jpg"
    flag = seen.get(c, 0) % 2
    seen[c] = seen.get(c, 0) + 1
    w, h = image_size(image_id)
    # MATLAB stores every scalar as a 1 × 1 matrix and a string as a 1 × n char array.
    annotations[0, i] = (np.array([rel]), np.array([[1]], np.uint16),
                         np.array([[2]], np.uint16), np.array([[w - 1]], np.uint16),
                         np.array([[h - 1]], np.uint16), np.array([[c]], class_dtype),
                         np.array([[flag]], np.uint8))
    write_image(os.path.join(directory, rel), image_id, image_id in grayscale)
    rows.append((image_id, rel, c, flag))
  class_names = np.empty((1, num_classes), dtype=object)
  for c in range(num_classes):
    class_names[0, c] = f"Make{c + 1} Model {2000 + c}"
  os.makedirs(directory, exist_ok=True)
  scipy.io.savemat(os.path.join(directory, "cars_annos.mat"),
                   {"annotations": annotations, "class_names": class_names},
                   format="5")
  return _class_split_fixture("cars", directory, directory, rows, num_classes)


_SOP_SUPER = ("bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp",
              "mug", "sofa", "stapler", "table", "toaster")


def make_sop(directory: str, num_classes: int = 12, sizes=None,
             train_classes: int | None = None, shuffle_seed: int | None = None,
             grayscale: Iterable[int] = ()) -> Fixture:
  """Writes ``directory/Stanford_Online_Products/`` as the zip unpacks.

  ``Ebay_train.txt`` lists products ``1..train_classes`` (default ``C // 2``),
  ``Ebay_test.txt`` the rest, and ``Ebay_info.txt`` all; each with the header
  ``image_id class_id super_class_id path`` and ``image_id`` counting from 1 per file.
  Images are ``<super>_final/<listing id>_<k>.JPG`` (upper-case extension, as
  published), with super classes cycling through SOP's 12. Rows are grouped by product,
  or in a fixed shuffled order within each file with ``shuffle_seed``. Expected: each
  file's rows in order.
  """
  base = os.path.join(directory, "Stanford_Online_Products")
  grayscale = set(grayscale)
  train_classes = num_classes // 2 if train_classes is None else train_classes
  rows = []  # (image id, relative path, class id, super class id)
  for c, size in enumerate(_sizes(num_classes, sizes), start=1):
    s = (c - 1) % len(_SOP_SUPER) + 1
    for k in range(size):
      image_id = len(rows) + 1
      rel = f"{_SOP_SUPER[s - 1]}_final/{111085122000 + 10 * c}_{k}.JPG"
      rows.append((image_id, rel, c, s))
  parts = {"train": [r for r in rows if r[2] <= train_classes],
           "test": [r for r in rows if r[2] > train_classes]}
  header = "image_id class_id super_class_id path"
  splits = {}
  for split, file in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
    part = [parts[split][i] for i in _order(len(parts[split]), shuffle_seed)]
    _write_text(os.path.join(base, file),
                [header] + [f"{n} {c} {s} {rel}"
                            for n, (_, rel, c, s) in enumerate(part, start=1)])
    splits[split] = tuple(FixtureImage(os.path.join(base, rel), i, str(c))
                          for i, rel, c, _ in part)
  _write_text(os.path.join(base, "Ebay_info.txt"),
              [header] + [f"{i} {c} {s} {rel}" for i, rel, c, s in rows])
  for image_id, rel, _, _ in rows:
    write_image(os.path.join(base, rel), image_id, image_id in grayscale)
  return Fixture("sop", base, splits,
                 {s: _by_class_order(v, int) for s, v in splits.items()})


_INSHOP_CATEGORIES = ("WOMEN/Dresses", "MEN/Denim", "WOMEN/Blouses_Shirts",
                      "MEN/Tees_Tanks", "WOMEN/Skirts")
_INSHOP_VIEWS = ("front", "side", "back", "full")


def make_inshop(directory: str, num_items: int = 12, sizes=None,
                with_img_level: bool = True, gallery_only_items: int = 0,
                grayscale: Iterable[int] = ()) -> Fixture:
  """Writes the In-Shop benchmark into ``directory``: ``Eval/`` and ``Img/img/...``.

  ``Eval/list_eval_partition.txt`` as published: the image count, the header
  ``image_name item_id evaluation_status``, then one column-aligned row per image,
  ``img/<GENDER>/<Category>/id_XXXXXXXX/NN_K_<view>.jpg id_XXXXXXXX <status>``. Items
  alternate train / test (even / odd item index), so statuses interleave in the file.
  A test item's images alternate query, gallery, query, ... (a single-image item is
  query only), except the last ``gallery_only_items`` test items, which are gallery
  only. ``with_img_level=False`` unpacks the images to ``directory/img/...`` instead of
  ``directory/Img/img/...``. Expected: train, query and gallery in file order, query
  and gallery labelled over their shared item vocabulary.
  """
  grayscale = set(grayscale)
  image_root = os.path.join(directory, "Img") if with_img_level else directory
  size_list = _sizes(num_items, sizes)
  test_items = [k for k in range(num_items) if k % 2 == 1]
  gallery_only = set(test_items[len(test_items) - gallery_only_items:]
                     if gallery_only_items else ())
  rows = []  # (image id, image name, item id, status)
  for k, size in enumerate(size_list):
    item = f"id_{3 * k + 2:08d}"
    category = _INSHOP_CATEGORIES[k % len(_INSHOP_CATEGORIES)]
    for j in range(size):
      name = f"img/{category}/{item}/{j // 4 + 1:02d}_{j % 4 + 1}_{_INSHOP_VIEWS[j % 4]}.jpg"
      if k % 2 == 0:
        status = "train"
      elif k in gallery_only:
        status = "gallery"
      else:
        status = ("query", "gallery")[j % 2]
      rows.append((len(rows) + 1, name, item, status))
  width = max(len(r[1]) for r in rows) + 1
  _write_text(os.path.join(directory, "Eval", "list_eval_partition.txt"),
              [str(len(rows)), "image_name item_id evaluation_status"]
              + [f"{name:<{width}}{item}  {status}" for _, name, item, status in rows])
  for image_id, name, _, _ in rows:
    write_image(os.path.join(image_root, name), image_id, image_id in grayscale)
  splits = {s: tuple(FixtureImage(os.path.join(image_root, name), i, item)
                     for i, name, item, status in rows if status == s)
            for s in ("train", "query", "gallery")}
  vocabulary = tuple(sorted({im.class_name for s in ("query", "gallery")
                             for im in splits[s]}))
  return Fixture("inshop", directory, splits,
                 {"train": _by_class_order(list(splits["train"]), str),
                  "query": vocabulary, "gallery": vocabulary})


# --- a class-per-directory tree ------------------------------------------------------


def folder_class_path(c: int, depth: int) -> str:
  """The relative directory of class ``c`` (0-based) in a tree ``depth`` levels deep.

  Names are not zero-padded (``char10`` sorts before ``char2``) and group folders mix
  classes written far apart, so a loader must really sort.
  """
  groups = [f"alphabet{(c + level) % (level + 2)}" for level in range(depth - 1)]
  return "/".join(groups + [f"char{c + 1}"])


def make_folder(directory: str, num_classes: int = 6, sizes=None, depth: int = 2,
                exts: Sequence[str] = (".png", ".JPG", ".jpeg"),
                train_fraction: float = 0.5, extras: bool = True) -> Fixture:
  """Writes a class-per-directory tree under ``directory`` (Omniglot-style at depth 2).

  Class ``c`` holds ``img<k>.<ext>`` files (``k`` from 1, extensions cycling through
  ``exts``, any case) in ``folder_class_path(c, depth)``; classes are written in
  reverse order. ``extras`` adds what a loader must ignore: hidden files and folders,
  non-image files, an empty folder and a folder of non-images. Expected: classes in
  path order, the first ``round(C * train_fraction)`` train, files sorted by name.
  """
  paths = [folder_class_path(c, depth) for c in range(num_classes)]
  size_list = _sizes(num_classes, sizes)
  entries = {}
  image_id = 0
  for c in reversed(range(num_classes)):
    files = []
    for k in range(size_list[c]):
      image_id += 1
      name = f"img{k + 1}{exts[k % len(exts)]}"
      write_image(os.path.join(directory, paths[c], name), image_id)
      files.append((name, image_id))
    entries[paths[c]] = sorted(files)
  if extras:
    write_image(os.path.join(directory, ".cache", "hidden_class", "img1.png"), 0)
    write_image(os.path.join(directory, paths[0], ".thumb.png"), 0)
    _write_text(os.path.join(directory, "README.txt"), ["not an image"])
    _write_text(os.path.join(directory, paths[0], "labels.csv"), ["a,b"])
    _write_text(os.path.join(directory, "docs", "notes.md"), ["no images here"])
    os.makedirs(os.path.join(directory, "empty"), exist_ok=True)
  ordered = sorted(entries, key=lambda p: p.split("/"))
  n_train = int(round(len(ordered) * train_fraction))
  splits = {}
  for split, part in (("train", ordered[:n_train]), ("test", ordered[n_train:])):
    splits[split] = tuple(FixtureImage(os.path.join(directory, p, name), i, p)
                          for p in part for name, i in entries[p])
  return Fixture("folder", directory, splits,
                 {"train": tuple(ordered[:n_train]), "test": tuple(ordered[n_train:])})
