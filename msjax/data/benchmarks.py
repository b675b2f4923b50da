"""The four retrieval benchmarks read from their published on-disk layouts.

Each loader reads only the metadata (listings, labels, the Cars ``.mat``) and returns a
``records.Dataset`` split by the class-disjoint retrieval protocol:

- **CUB-200-2011**: classes 1–100 train (5,864 images), 101–200 test (5,924).
- **Cars-196**: classes 1–98 train (8,054), 99–196 test (8,131).
- **Stanford Online Products**: ``Ebay_train.txt`` train (11,318 products, 59,551
  images), ``Ebay_test.txt`` test (11,316 products, 60,502).
- **In-Shop Clothes**: ``list_eval_partition.txt`` status ``train`` (3,997 items,
  25,882 images); ``query`` (14,218) searches ``gallery`` (12,612) over 3,985 items.

The official train/test flags of CUB and Cars (``train_test_split.txt``, the ``test``
field) split every class between train and test, for classification; retrieval splits
by class instead and ignores them. Class identifiers from the files become
``Split.class_names``; labels are those ids renumbered ``0..C-1`` in id order.

Images are neither opened nor listed here (SOP alone has 120k): loading is a metadata
parse that takes a fraction of a second, and ``check`` verifies the image files. Only the
folder of each split's first image is looked at, to catch a root whose images were never
unpacked.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np

from msjax.data import records
from msjax.data.records import DataError

WHERE_TO_GET = {
    "cub": ("CUB-200-2011: download CUB_200_2011.tgz from "
            "https://data.caltech.edu/records/65de6-vp158 and unpack it, giving "
            "CUB_200_2011/{images.txt, image_class_labels.txt, classes.txt, "
            "train_test_split.txt, images/}; pass CUB_200_2011/ or the folder holding it."),
    "cars": ("Cars-196: download cars_annos.mat and car_ims.tgz from the Stanford Cars "
             "page (ai.stanford.edu/~jkrause/cars/car_dataset.html; now offline, mirrors "
             "of the same two files exist) and unpack car_ims.tgz next to cars_annos.mat, "
             "giving <root>/{cars_annos.mat, car_ims/000001.jpg, ...}; pass <root> or the "
             "folder holding it. (Layouts with cars_train/, cars_test/ and devkit/ .mat "
             "files are a different release and are not read.)"),
    "sop": ("Stanford Online Products: download Stanford_Online_Products.zip from "
            "ftp://cs.stanford.edu/cs/cvgl/Stanford_Online_Products.zip (see "
            "cvgl.stanford.edu/projects/lifted_struct) and unzip it, giving "
            "Stanford_Online_Products/{Ebay_train.txt, Ebay_test.txt, bicycle_final/, "
            "...}; pass Stanford_Online_Products/ or the folder holding it."),
    "inshop": ("In-Shop Clothes: download the DeepFashion In-shop Clothes Retrieval "
               "Benchmark (mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html): "
               "Eval/list_eval_partition.txt and Img/img.zip; unzip img.zip inside Img/, "
               "giving <root>/{Eval/list_eval_partition.txt, Img/img/WOMEN/...} (or "
               "<root>/img/WOMEN/... without Img/); pass <root>."),
}

# dataset -> split -> (images, classes). In-Shop's query and gallery count the classes
# of their shared vocabulary (the items of query ∪ gallery), as ``Split.num_classes`` does.
PUBLISHED_COUNTS = {
    "cub": {"train": (5864, 100), "test": (5924, 100)},
    "cars": {"train": (8054, 98), "test": (8131, 98)},
    "sop": {"train": (59551, 11318), "test": (60502, 11316)},
    "inshop": {"train": (25882, 3997), "query": (14218, 3985), "gallery": (12612, 3985)},
}

_TITLES = {"cub": "CUB-200-2011", "cars": "Cars-196", "sop": "Stanford Online Products",
           "inshop": "In-Shop Clothes"}
_SOP_HEADER = ("image_id", "class_id", "super_class_id", "path")
_INSHOP_HEADER = ("image_name", "item_id", "evaluation_status")
_INSHOP_STATUSES = ("train", "query", "gallery")
_CARS_FIELDS = ("relative_im_path", "class")


# --- shared helpers -----------------------------------------------------------------


def _locate(root, dataset: str, marker: str, folder: str | None = None) -> str:
  """The dataset folder: ``root`` if it holds ``marker``, else the one child that does.

  Users point at either the unpacked folder or the download folder holding it; a child
  named ``folder`` wins when several children hold ``marker``.
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  if not os.path.isdir(root):
    raise DataError(f"{_TITLES[dataset]} root {root} does not exist or is not a directory. "
                    f"{WHERE_TO_GET[dataset]}")
  if os.path.exists(os.path.join(root, marker)):
    return root
  try:
    children = sorted(c for c in os.listdir(root) if not c.startswith("."))
  except OSError as e:
    raise DataError(f"cannot list {_TITLES[dataset]} root {root}: {e}.") from e
  found = [c for c in children if os.path.exists(os.path.join(root, c, marker))]
  if folder in found:
    return os.path.join(root, folder)
  if len(found) == 1:
    return os.path.join(root, found[0])
  if found:
    raise DataError(f"several folders in {root} hold {marker}: {', '.join(found)}. "
                    f"Pass the {_TITLES[dataset]} folder itself as the root.")
  raise DataError(f"{marker} not found in {root} or in a folder directly inside it, so "
                  f"{root} is not a {_TITLES[dataset]} root. {WHERE_TO_GET[dataset]}")


def _read_lines(path: str, dataset: str) -> list[str]:
  if not os.path.isfile(path):
    raise DataError(f"metadata file {path} is missing. {WHERE_TO_GET[dataset]}")
  try:
    with open(path, encoding="utf-8-sig") as f:
      return f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise DataError(f"cannot read metadata file {path}: {e}. Re-download or re-unpack "
                    "it.") from e


def _rows(path: str, lines: Sequence[str], fields: Sequence[str], start: int = 0,
          ints: Sequence[int] = ()) -> Iterator[tuple[int, list]]:
  """``(line number, fields)`` for the non-blank lines from ``lines[start]`` on.

  Each line must have exactly ``len(fields)`` whitespace-separated fields, and those at
  positions ``ints`` are integers (converted). Errors name ``path:line``.
  """
  n = len(fields)
  for i in range(start, len(lines)):
    parts = lines[i].split()
    if not parts:
      continue
    if len(parts) != n:
      raise DataError(f"{path}:{i + 1}: expected {n} fields '{' '.join(fields)}', got "
                      f"{len(parts)}: {lines[i]!r}. Fix or re-download the file.")
    for k in ints:
      try:
        parts[k] = int(parts[k])
      except ValueError:
        raise DataError(f"{path}:{i + 1}: {fields[k]} must be an integer, got "
                        f"{parts[k]!r} in {lines[i]!r}. Fix or re-download the "
                        "file.") from None
    yield i + 1, parts


def _check_image_folder(base: str, relpath: str, listed_in: str, dataset: str) -> None:
  """Fails early when the folder of a listed image is absent (images not unpacked)."""
  folder = os.path.dirname(os.path.join(base, relpath))
  if not os.path.isdir(folder):
    raise DataError(f"images not found: {listed_in} lists {relpath}, but folder {folder} "
                    f"does not exist. Unpack the images in place. {WHERE_TO_GET[dataset]}")


def _class_split(name: str, source: str, paths: list[str], class_ids: list[int],
                 base: str) -> records.Dataset:
  """Train on the first half of the sorted class ids, test on the rest (C // 2 train)."""
  ids = np.asarray(class_ids, dtype=np.int64)
  classes = np.unique(ids)
  if len(classes) < 2:
    raise DataError(f"{source} lists {len(classes)} class(es); the class-disjoint split "
                    f"needs at least 2. {WHERE_TO_GET[name]}")
  in_train = ids <= classes[len(classes) // 2 - 1]
  splits = []
  for split_name, mask in (("train", in_train), ("test", ~in_train)):
    keep = np.flatnonzero(mask)
    images = records.ImageFiles(base, [paths[i] for i in keep])
    splits.append(records.make_split(split_name, images, ids[keep]))
  return records.Dataset(name, *splits)


# --- CUB-200-2011 --------------------------------------------------------------------


def load_cub(root) -> records.Dataset:
  """CUB-200-2011 from ``CUB_200_2011/`` (or its parent): classes 1–100 vs 101–200.

  Reads ``images.txt`` (``<image id> <path under images/>``) and
  ``image_class_labels.txt`` (``<image id> <class id>``); images keep the order of
  ``images.txt``. ``train_test_split.txt`` is not used (it splits within classes).
  """
  base = _locate(root, "cub", "images.txt", "CUB_200_2011")
  images_txt = os.path.join(base, "images.txt")
  labels_txt = os.path.join(base, "image_class_labels.txt")
  paths: dict[int, str] = {}
  for line, (image_id, path) in _rows(images_txt, _read_lines(images_txt, "cub"),
                                      ("image_id", "path"), ints=(0,)):
    if image_id in paths:
      raise DataError(f"{images_txt}:{line}: image id {image_id} is listed twice. Fix "
                      "or re-download the file.")
    paths[image_id] = path
  labels: dict[int, int] = {}
  for line, (image_id, class_id) in _rows(labels_txt, _read_lines(labels_txt, "cub"),
                                          ("image_id", "class_id"), ints=(0, 1)):
    if image_id not in paths:
      raise DataError(f"{labels_txt}:{line}: image id {image_id} has no entry in "
                      f"{images_txt}. The two files come from different downloads; "
                      "re-unpack CUB_200_2011.tgz.")
    if image_id in labels:
      raise DataError(f"{labels_txt}:{line}: image id {image_id} is labelled twice. Fix "
                      "or re-download the file.")
    labels[image_id] = class_id
  if not paths:
    raise DataError(f"{images_txt} lists no images. {WHERE_TO_GET['cub']}")
  unlabelled = [i for i in paths if i not in labels]
  if unlabelled:
    raise DataError(f"{len(unlabelled)} image id(s) of {images_txt} (first: "
                    f"{unlabelled[0]}) have no class in {labels_txt}. The two files come "
                    "from different downloads; re-unpack CUB_200_2011.tgz.")
  ordered = list(paths)
  image_dir = os.path.join(base, "images")
  _check_image_folder(image_dir, paths[ordered[0]], images_txt, "cub")
  return _class_split("cub", images_txt, [paths[i] for i in ordered],
                      [labels[i] for i in ordered], image_dir)


# --- Cars-196 ------------------------------------------------------------------------


def _mat_scalar(value, what: str, index: int, path: str):
  """The single element of a MATLAB cell (``loadmat`` wraps each field in arrays)."""
  flat = np.asarray(value).reshape(-1)
  if flat.size != 1:
    raise DataError(f"{path}: annotations({index}).{what} holds {flat.size} values, "
                    "expected one. Fix or re-download cars_annos.mat.")
  value = flat[0]
  return value.item() if isinstance(value, np.generic) else value


def load_cars(root) -> records.Dataset:
  """Cars-196 from the folder holding ``cars_annos.mat`` and ``car_ims/``: classes 1–98 vs 99–196.

  ``cars_annos.mat`` is a MATLAB v5 file whose struct array ``annotations`` has the
  fields ``relative_im_path`` (``car_ims/000001.jpg``) and ``class`` (1–196), among
  others; its ``test`` flag is not used (it splits within classes). Images keep the
  order of ``annotations``.
  """
  import scipy.io  # A dependency of jax; imported here so the other loaders skip it.

  base = _locate(root, "cars", "cars_annos.mat")
  path = os.path.join(base, "cars_annos.mat")
  try:
    mat = scipy.io.loadmat(path, squeeze_me=False, struct_as_record=True)
  except NotImplementedError as e:  # MATLAB v7.3 files are HDF5.
    raise DataError(f"{path} is a MATLAB v7.3 (HDF5) file; the published cars_annos.mat "
                    f"is MATLAB v5. Re-download it. ({e})") from e
  except Exception as e:  # loadmat raises several types on a damaged file.
    raise DataError(f"{path} is not a readable MATLAB file ({type(e).__name__}: {e}). "
                    f"Re-download it. {WHERE_TO_GET['cars']}") from e
  if "annotations" not in mat:
    names = sorted(k for k in mat if not k.startswith("__"))
    raise DataError(f"{path} has no 'annotations' variable (it holds: "
                    f"{', '.join(names) or 'nothing'}). Is it cars_train_annos.mat or "
                    f"another file? {WHERE_TO_GET['cars']}")
  annotations = np.asarray(mat["annotations"])
  fields = annotations.dtype.names or ()
  missing = [f for f in _CARS_FIELDS if f not in fields]
  if missing:
    raise DataError(f"{path}: 'annotations' lacks the field(s) {', '.join(missing)} "
                    f"(it has: {', '.join(fields) or 'none; not a struct array'}). "
                    f"Re-download cars_annos.mat. {WHERE_TO_GET['cars']}")
  flat = annotations.reshape(-1)
  if not flat.size:
    raise DataError(f"{path}: 'annotations' is empty. {WHERE_TO_GET['cars']}")
  paths, class_ids = [], []
  # Column by column: one field of every annotation at a time is several times faster
  # than record by record. Errors number annotations from 1, as MATLAB does.
  for i, value in enumerate(flat["relative_im_path"]):
    rel = _mat_scalar(value, "relative_im_path", i + 1, path)
    if not isinstance(rel, str) or not rel:
      raise DataError(f"{path}: annotations({i + 1}).relative_im_path is {rel!r}, not a "
                      "path. Fix or re-download cars_annos.mat.")
    paths.append(rel)
  for i, value in enumerate(flat["class"]):
    cls = _mat_scalar(value, "class", i + 1, path)
    try:
      cls_int = int(cls)
      ok = cls_int == cls
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise DataError(f"{path}: annotations({i + 1}).class is {cls!r}, not an integer "
                      "class id. Fix or re-download cars_annos.mat.")
    class_ids.append(cls_int)
  _check_image_folder(base, paths[0], path, "cars")
  return _class_split("cars", path, paths, class_ids, base)


# --- Stanford Online Products --------------------------------------------------------


def _load_sop_list(base: str, file: str, name: str) -> tuple[records.Split, set]:
  path = os.path.join(base, file)
  lines = _read_lines(path, "sop")
  first = next((i for i, ln in enumerate(lines) if ln.strip()), None)
  if first is None or tuple(lines[first].lower().split()) != _SOP_HEADER:
    shown = repr(lines[first]) if first is not None else "an empty file"
    raise DataError(f"{path}:{(first or 0) + 1}: expected the header "
                    f"'{' '.join(_SOP_HEADER)}', got {shown}. Fix or re-download the "
                    "file.")
  paths, class_ids = [], []
  for _, (_, class_id, _, rel) in _rows(path, lines, _SOP_HEADER, start=first + 1,
                                        ints=(0, 1, 2)):
    paths.append(rel)
    class_ids.append(class_id)
  if not paths:
    raise DataError(f"{path} lists no images. {WHERE_TO_GET['sop']}")
  _check_image_folder(base, paths[0], path, "sop")
  split = records.make_split(name, records.ImageFiles(base, paths),
                             np.asarray(class_ids, dtype=np.int64))
  return split, set(split.class_names)


def load_sop(root) -> records.Dataset:
  """Stanford Online Products from ``Stanford_Online_Products/`` (or its parent).

  ``Ebay_train.txt`` is the training split and ``Ebay_test.txt`` the test split (header
  ``image_id class_id super_class_id path``, paths relative to the dataset folder);
  classes are products (``class_id``).
  """
  base = _locate(root, "sop", "Ebay_train.txt", "Stanford_Online_Products")
  train, train_classes = _load_sop_list(base, "Ebay_train.txt", "train")
  test, test_classes = _load_sop_list(base, "Ebay_test.txt", "test")
  shared = train_classes & test_classes
  if shared:
    raise DataError(f"Ebay_train.txt and Ebay_test.txt in {base} share "
                    f"{len(shared)} class id(s) (e.g. {min(shared, key=int)}); the "
                    "retrieval protocol needs disjoint classes. Re-download the lists.")
  return records.Dataset("sop", train, test)


# --- In-Shop Clothes -----------------------------------------------------------------


def load_inshop(root) -> records.Dataset:
  """In-Shop Clothes from the folder holding ``Eval/`` and ``Img/``: train, query, gallery.

  ``Eval/list_eval_partition.txt`` gives each image's item and status (line 1: the
  number of images; line 2: the header ``image_name item_id evaluation_status``). Query
  and gallery share one class vocabulary (the items of query ∪ gallery), so an item has
  the same label in both. Images live at ``Img/<image_name>`` or, when ``img.zip`` was
  unpacked without ``Img/``, at ``<image_name>``; the layout is detected.
  """
  marker = os.path.join("Eval", "list_eval_partition.txt")
  base = _locate(root, "inshop", marker)
  path = os.path.join(base, marker)
  lines = _read_lines(path, "inshop")
  content = [i for i, ln in enumerate(lines) if ln.strip()]
  if len(content) < 2:
    raise DataError(f"{path} has {len(content)} non-blank line(s); expected the image "
                    f"count, the header '{' '.join(_INSHOP_HEADER)}' and one line per "
                    "image. Re-download it.")
  count_line, header_line = content[0], content[1]
  try:
    declared = int(lines[count_line].strip())
  except ValueError:
    raise DataError(f"{path}:{count_line + 1}: expected the number of images, got "
                    f"{lines[count_line]!r}. Fix or re-download the file.") from None
  if tuple(lines[header_line].split()) != _INSHOP_HEADER:
    raise DataError(f"{path}:{header_line + 1}: expected the header "
                    f"'{' '.join(_INSHOP_HEADER)}', got {lines[header_line]!r}. Fix or "
                    "re-download the file.")
  by_status: dict[str, tuple[list, list]] = {s: ([], []) for s in _INSHOP_STATUSES}
  for line, (name, item, status) in _rows(path, lines, _INSHOP_HEADER,
                                          start=header_line + 1):
    if status not in by_status:
      raise DataError(f"{path}:{line}: evaluation_status must be one of "
                      f"{', '.join(_INSHOP_STATUSES)}, got {status!r}. Fix or "
                      "re-download the file.")
    by_status[status][0].append(name)
    by_status[status][1].append(item)
  total = sum(len(names) for names, _ in by_status.values())
  if total != declared:
    raise DataError(f"{path}:{count_line + 1} declares {declared} images but the file "
                    f"lists {total}; it is truncated or edited. Re-download it.")
  for status, (names, _) in by_status.items():
    if not names:
      raise DataError(f"{path} lists no '{status}' images. {WHERE_TO_GET['inshop']}")

  # img.zip holds img/...; it is unpacked inside Img/ (the published layout) or directly
  # in the root. Decide by where the first image's folder is.
  first = by_status["train"][0][0]
  candidates = [os.path.join(base, "Img"), base]
  image_root = next((c for c in candidates
                     if os.path.isdir(os.path.dirname(os.path.join(c, first)))), None)
  if image_root is None:
    tried = " or ".join(os.path.dirname(os.path.join(c, first)) for c in candidates)
    raise DataError(f"images not found: {path} lists {first}, but neither {tried} "
                    f"exists. Unzip Img/img.zip inside Img/. {WHERE_TO_GET['inshop']}")

  train_names, train_items = by_status["train"]
  train = records.make_split("train", records.ImageFiles(image_root, train_names),
                             train_items)
  vocabulary = sorted(set(by_status["query"][1]) | set(by_status["gallery"][1]))
  shared = set(train.class_names) & set(vocabulary)
  if shared:
    raise DataError(f"{path}: {len(shared)} item(s) (e.g. {min(shared)}) have both "
                    "'train' and query/gallery images; the retrieval protocol needs "
                    "disjoint items. Re-download the file.")
  lookup = {item: k for k, item in enumerate(vocabulary)}
  query, gallery = (
      records.Split(status, records.ImageFiles(image_root, by_status[status][0]),
                    np.fromiter((lookup[i] for i in by_status[status][1]), np.int32,
                                count=len(by_status[status][1])),
                    tuple(vocabulary))
      for status in ("query", "gallery"))
  return records.Dataset("inshop", train, query, gallery=gallery)


LOADERS: dict[str, Callable[..., records.Dataset]] = {
    "cub": load_cub,
    "cars": load_cars,
    "sop": load_sop,
    "inshop": load_inshop,
}
