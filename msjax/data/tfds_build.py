"""Writes the four retrieval benchmarks as TFDS array_record datasets, without TensorFlow.

``prepare_tfds`` is the entry point (``python -m msjax.data prepare_tfds`` wraps it).
It writes each benchmark under its TFDS name and version, with the same features as the
TFDS catalog builder, so ``tfds.data_source`` (and ``msjax.data.tfds_source``) reads
the result exactly as it would read the catalog build:

- ``inshop_clothes_retrieval`` (In-Shop Clothes Retrieval) has no TFDS catalog builder;
  ``InshopClothesRetrieval`` here is it, splits ``train``/``query``/``gallery``.
- ``caltech_birds2011``, ``cars196`` and ``stanford_online_products``: the catalog
  builders read their files through ``tf.io.gfile`` (and CUB's masks through OpenCV),
  so they need TensorFlow. With ``manual_dir`` (files already downloaded and
  extracted), builders here generate the same examples from those files with plain
  Python and Pillow. Without it, CUB and SOP fall back to the catalog builder, which
  downloads.

Images are stored as the encoded bytes of the original files, never re-encoded.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import shuffle as tfds_shuffle

from msjax.data.records import DataError

# Where TFDS looks for a builder's checksums.tsv. Set on each builder here because TFDS
# 4.9.10 computes it through `importlib_resources`, a package it only declares for
# Python < 3.9 (tensorflow/datasets#11212); no file is downloaded, so none is needed.
_CODE_PATH = epath.Path(__file__)

_HOMEPAGE = "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html"
_CITATION = """\
@inproceedings{liu2016deepfashion,
  title = {DeepFashion: Powering Robust Clothes Recognition and Retrieval with Rich
           Annotations},
  author = {Liu, Ziwei and Luo, Ping and Qiu, Shi and Wang, Xiaogang and Tang, Xiaoou},
  booktitle = {Proceedings of IEEE Conference on Computer Vision and Pattern
               Recognition (CVPR)},
  year = {2016}
}
"""
_PARTITION = os.path.join("Eval", "list_eval_partition.txt")
_INSHOP_STATUSES = ("train", "query", "gallery")
_ITEM_ID = re.compile(r"id_(\d+)$")

INSHOP_INSTRUCTIONS = """\
Download "In-shop Clothes Retrieval Benchmark" from the DeepFashion page
(https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html; the files are
on Google Drive) and lay out the manual directory as:

  <manual_dir>/Eval/list_eval_partition.txt
  <manual_dir>/Img/img/...          (Img/img.zip extracted inside Img/)

or, with img.zip extracted directly into <manual_dir>:

  <manual_dir>/Eval/list_eval_partition.txt
  <manual_dir>/img/...

Each row of list_eval_partition.txt names an image as img/<...>.jpg; it is read from
<manual_dir>/Img/<image_name> or else <manual_dir>/<image_name>.
"""

CUB_INSTRUCTIONS = """\
Download CUB_200_2011.tgz and segmentations.tgz
(https://www.vision.caltech.edu/datasets/cub_200_2011/) and extract both into
<manual_dir>, giving:

  <manual_dir>/CUB_200_2011/images.txt, train_test_split.txt, bounding_boxes.txt,
                            images/<class>/<image>.jpg
  <manual_dir>/segmentations/<class>/<image>.png
"""

CARS_INSTRUCTIONS = """\
The Cars-196 download links used by TFDS (ai.stanford.edu/~jkrause) no longer serve
the files; get the original release from a mirror and put into <manual_dir> (any
nesting; archives extracted):

  cars_train/<00001.jpg ...>            (cars_train.tgz)
  cars_test/<00001.jpg ...>             (cars_test.tgz)
  cars_train_annos.mat                  (devkit/ of car_devkit.tgz)
  cars_test_annos_withlabels.mat
"""

SOP_INSTRUCTIONS = """\
Download Stanford_Online_Products.zip
(https://cvgl.stanford.edu/projects/lifted_struct/) and extract it into <manual_dir>,
giving <manual_dir>/Stanford_Online_Products/Ebay_train.txt, Ebay_test.txt and the
image folders (<manual_dir> may also be the Stanford_Online_Products folder itself).
"""


def _read_bytes(path: str) -> bytes:
  """The bytes of ``path``; a missing or unreadable file is a ``DataError``."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise DataError(f"cannot read image {path}: {e}. The manual directory is "
                    "incomplete; extract the image archive(s) again.") from e


def resolve_data_dir(data_dir: str) -> str:
  """``data_dir`` made absolute, unless it is a URL (``gs://...``), which is kept."""
  if "://" in data_dir:
    return data_dir
  return os.path.abspath(os.path.expanduser(data_dir))


def _clip01(value: float) -> float:
  return min(max(float(value), 0.0), 1.0)


# --------------------------------------------------------------------------- In-Shop


def read_inshop_partition(manual_dir: str) -> tuple[str, list[tuple[str, str, str]]]:
  """In-Shop's partition: the folder image names are relative to, and its rows.

  Returns ``(image_root, rows)``, ``rows`` being ``(image_name, item_id, status)`` in
  file order, ``status`` one of ``train``/``query``/``gallery``; the image of a row is
  ``os.path.join(image_root, image_name)``. ``image_root`` is ``<manual_dir>/Img`` or
  ``<manual_dir>``, whichever holds the first listed image.
  """
  path = os.path.join(manual_dir, _PARTITION)
  if not os.path.isfile(path):
    raise DataError(f"In-Shop partition file {path} not found.\n{INSHOP_INSTRUCTIONS}")
  with open(path) as f:
    lines = [line.strip() for line in f.read().splitlines()]
  if len(lines) < 2 or lines[1].split() != ["image_name", "item_id", "evaluation_status"]:
    raise DataError(f"{path}: expected line 1 to be the image count and line 2 the "
                    "header 'image_name item_id evaluation_status'.")
  rows = []
  for number, line in enumerate(lines[2:], start=3):
    if not line:
      continue
    fields = tuple(line.split())
    if len(fields) != 3 or fields[2] not in _INSHOP_STATUSES or not _ITEM_ID.match(fields[1]):
      raise DataError(f"{path} line {number}: expected '<image_name> id_<digits> "
                      f"train|query|gallery', got {line!r}.")
    rows.append(fields)
  try:
    count = int(lines[0])
  except ValueError:
    raise DataError(f"{path} line 1: expected the image count, got {lines[0]!r}.") from None
  if count != len(rows):
    raise DataError(f"{path}: line 1 announces {count} images but {len(rows)} rows "
                    "follow; the file is truncated or not the original.")
  if not rows:
    raise DataError(f"{path} lists no images.")
  first = rows[0][0]
  for root in (os.path.join(manual_dir, "Img"), manual_dir):
    if os.path.isfile(os.path.join(root, first)):
      return root, rows
  raise DataError(f"In-Shop image {first} (first row of {path}) is neither at "
                  f"{os.path.join(manual_dir, 'Img', first)} nor at "
                  f"{os.path.join(manual_dir, first)}.\n{INSHOP_INSTRUCTIONS}")


class InshopClothesRetrieval(tfds.core.GeneratorBasedBuilder):
  """DeepFashion In-Shop Clothes Retrieval: 52,712 images of 7,982 clothing items.

  Splits ``train`` (25,882 images, 3,997 items), ``query`` (14,218) and ``gallery``
  (12,612), the query and gallery images showing the same 3,985 items. Features:
  ``image`` (the original JPEG bytes), ``image_name`` (``img/...`` as listed in
  ``Eval/list_eval_partition.txt``), ``item_id`` (``id_00000002``) and ``label`` (the
  item's number, 2 for ``id_00000002``).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  code_path = _CODE_PATH
  MANUAL_DOWNLOAD_INSTRUCTIONS = INSHOP_INSTRUCTIONS

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs would look for README/CITATIONS
    # files beside this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=("In-Shop Clothes Retrieval benchmark of DeepFashion: photos of "
                     "clothing items, the query images to be matched to gallery "
                     "images of the same item."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "image_name": tfds.features.Text(),
            "item_id": tfds.features.Text(),
            # A number rather than a ClassLabel: the item count is only known once the
            # partition file is read, and the numeric id is what In-Shop names items by.
            "label": tfds.features.Scalar(np.int64, doc="item number: id_00000002 -> 2"),
        }),
        supervised_keys=("image", "label"),
        homepage=_HOMEPAGE,
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    root, rows = read_inshop_partition(os.fspath(dl_manager.manual_dir))
    return {status: self._generate_examples(root, [r for r in rows if r[2] == status])
            for status in _INSHOP_STATUSES}

  def _generate_examples(self, root, rows):
    for image_name, item_id, _ in rows:
      yield image_name, {
          "image": _read_bytes(os.path.join(root, image_name)),
          "image_name": image_name,
          "item_id": item_id,
          "label": int(_ITEM_ID.match(item_id).group(1)),
      }


# ------------------------------------------------------------------------------- CUB


def _cub_layout(manual_dir: str) -> tuple[str, str]:
  """``(CUB_200_2011 folder, segmentations folder)`` in ``manual_dir``."""
  candidates = [os.path.join(manual_dir, "CUB_200_2011"), manual_dir]
  root = next((c for c in candidates if os.path.isfile(os.path.join(c, "images.txt"))),
              None)
  if root is None:
    raise DataError(f"no CUB_200_2011/images.txt in {manual_dir}.\n{CUB_INSTRUCTIONS}")
  for name in ("images.txt", "train_test_split.txt", "bounding_boxes.txt"):
    if not os.path.isfile(os.path.join(root, name)):
      raise DataError(f"{os.path.join(root, name)} not found.\n{CUB_INSTRUCTIONS}")
  seg_candidates = [os.path.join(manual_dir, "segmentations"),
                    os.path.join(os.path.dirname(os.path.abspath(root)), "segmentations"),
                    os.path.join(root, "segmentations")]
  seg = next((c for c in seg_candidates if os.path.isdir(c)), None)
  if seg is None:
    raise DataError("the caltech_birds2011 TFDS features include segmentation masks, "
                    f"but no segmentations/ folder is in {manual_dir}.\n{CUB_INSTRUCTIONS}")
  return root, seg


def _cub_table(path: str) -> dict[str, list[str]]:
  """A CUB metadata file (``<image id> <values...>`` per line) keyed by image id."""
  with open(path) as f:
    return {fields[0]: fields[1:] for fields in (line.split() for line in f) if fields}


def _cub_mask(path: str) -> tuple[bytes, int, int]:
  """A mask as single-channel PNG bytes, and its width and height."""
  data = _read_bytes(path)
  with Image.open(io.BytesIO(data)) as im:
    width, height = im.size
    if im.format == "PNG" and im.mode == "L":
      return data, width, height
    # The TFDS catalog builder reads masks as grayscale; the feature is 1 channel.
    buffer = io.BytesIO()
    im.convert("L").save(buffer, format="PNG")
    return buffer.getvalue(), width, height


class CubFiles(tfds.builder_cls("caltech_birds2011"), skip_registration=True):
  """``caltech_birds2011`` from extracted CUB_200_2011 files (no TensorFlow, no OpenCV).

  Same name, version, features and splits (CUB's own train/test flag) as the catalog
  builder: ``label`` is the class folder's number minus 1, ``label_name`` its
  lower-cased name, ``bbox`` normalised by the mask's size.
  """

  name = "caltech_birds2011"
  code_path = _CODE_PATH
  MANUAL_DOWNLOAD_INSTRUCTIONS = CUB_INSTRUCTIONS

  def _split_generators(self, dl_manager):
    root, seg = _cub_layout(os.fspath(dl_manager.manual_dir))
    images = _cub_table(os.path.join(root, "images.txt"))
    flags = _cub_table(os.path.join(root, "train_test_split.txt"))
    boxes = _cub_table(os.path.join(root, "bounding_boxes.txt"))
    missing = sorted(set(images) - set(flags) | set(images) - set(boxes))
    if missing:
      raise DataError(f"CUB image ids {missing[:5]} of images.txt lack a train/test "
                      f"flag or a bounding box in {root}.")
    rows = {"train": [], "test": []}
    for image_id, (relpath,) in images.items():
      split = "train" if flags[image_id][0] == "1" else "test"
      rows[split].append((relpath, [float(v) for v in boxes[image_id]]))
    return {split: self._generate_examples(root, seg, split_rows)
            for split, split_rows in rows.items()}

  def _generate_examples(self, root, seg, rows):
    for relpath, (x, y, w, h) in rows:
      folder, filename = relpath.split("/")[-2:]
      mask, width, height = _cub_mask(
          os.path.join(seg, folder, os.path.splitext(filename)[0] + ".png"))
      key = "CUB_200_2011/images/" + relpath
      yield key, {
          "image": _read_bytes(os.path.join(root, "images", relpath)),
          "image/filename": key,
          "label": int(folder.split(".", 1)[0]) - 1,
          "label_name": folder.split(".", 1)[1].lower(),
          "bbox": tfds.features.BBox(ymin=_clip01(y / height), xmin=_clip01(x / width),
                                     ymax=_clip01((y + h) / height),
                                     xmax=_clip01((x + w) / width)),
          "segmentation_mask": mask,
      }


# ------------------------------------------------------------------------------ Cars


def _walk(manual_dir: str, max_depth: int = 4):
  """``os.walk`` of ``manual_dir`` down to ``max_depth`` levels, in sorted order."""
  base = os.path.abspath(manual_dir).rstrip(os.sep).count(os.sep)
  for dirpath, dirnames, filenames in os.walk(os.path.abspath(manual_dir)):
    dirnames.sort()
    if dirpath.count(os.sep) - base >= max_depth:
      dirnames[:] = []
    yield dirpath, dirnames, filenames


def _cars_layout(manual_dir: str) -> dict[str, str]:
  """Paths of Cars-196's image folders and annotation files in ``manual_dir``."""
  found: dict[str, str] = {}
  for dirpath, _, filenames in _walk(manual_dir):
    name = os.path.basename(dirpath)
    # Mirrors nest the images one level deeper (cars_train/cars_train/); the folder
    # that holds the JPEGs is the one we want.
    if name in ("cars_train", "cars_test") and any(f.lower().endswith(".jpg")
                                                   for f in filenames):
      found.setdefault(name, dirpath)
    for f in sorted(filenames):
      if f == "cars_train_annos.mat":
        found.setdefault("train_annos", os.path.join(dirpath, f))
      elif f.startswith("cars_test_annos_withlabels") and f.endswith(".mat"):
        found.setdefault("test_annos", os.path.join(dirpath, f))
  missing = [k for k in ("cars_train", "cars_test", "train_annos", "test_annos")
             if k not in found]
  if missing:
    raise DataError(f"Cars-196 files missing in {manual_dir}: {', '.join(missing)}.\n"
                    f"{CARS_INSTRUCTIONS}")
  return found


def _cars_annotations(path: str) -> list[tuple[str, int, tuple[float, ...]]]:
  """``(file name, 1-based class, (x1, y1, x2, y2))`` per image of a Cars .mat file."""
  import scipy.io  # pylint: disable=import-outside-toplevel

  try:
    annotations = scipy.io.loadmat(path)["annotations"][0]
    return [(str(a["fname"].item()), int(a["class"].item()),
             tuple(float(a[k].item()) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")))
            for a in annotations]
  except (KeyError, ValueError, IndexError) as e:
    raise DataError(f"{path} is not a Cars-196 annotation file with labels "
                    f"(annotations with fname, class and bbox fields): {e}") from e


class CarsFiles(tfds.builder_cls("cars196"), skip_registration=True):
  """``cars196`` from the original Cars-196 files (no TensorFlow).

  Same name, version, features and splits (the official train/test halves) as the
  catalog builder: ``label`` is the class minus 1, ``bbox`` normalised by the image size,
  ``id`` the file name without extension.
  """

  name = "cars196"
  code_path = _CODE_PATH
  MANUAL_DOWNLOAD_INSTRUCTIONS = CARS_INSTRUCTIONS

  def _split_generators(self, dl_manager):
    layout = _cars_layout(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(layout[f"cars_{split}"],
                                           _cars_annotations(layout[f"{split}_annos"]))
            for split in ("train", "test")}

  def _generate_examples(self, image_dir, annotations):
    for fname, label, (x1, y1, x2, y2) in annotations:
      data = _read_bytes(os.path.join(image_dir, fname))
      with Image.open(io.BytesIO(data)) as im:
        width, height = im.size
      image_id = fname.split(".")[0]
      yield image_id, {
          "image": data,
          "label": label - 1,
          "bbox": tfds.features.BBox(ymin=_clip01(y1 / height), xmin=_clip01(x1 / width),
                                     ymax=_clip01(y2 / height), xmax=_clip01(x2 / width)),
          "id": image_id,
      }


# ------------------------------------------------------------------------------- SOP

_SOP = tfds.builder_cls("stanford_online_products")


def _sop_root(manual_dir: str) -> str:
  """The folder holding ``Ebay_train.txt`` and ``Ebay_test.txt``."""
  for root in (os.path.join(manual_dir, "Stanford_Online_Products"), manual_dir):
    if all(os.path.isfile(os.path.join(root, f"Ebay_{s}.txt")) for s in ("train", "test")):
      return root
  raise DataError(f"no Stanford_Online_Products/Ebay_train.txt and Ebay_test.txt in "
                  f"{manual_dir}.\n{SOP_INSTRUCTIONS}")


class SopFiles(_SOP, skip_registration=True):
  """``stanford_online_products`` from the extracted zip (no TensorFlow).

  Same name, version, features and splits as the catalog builder: ``class_id`` and
  ``super_class_id/num`` are the file's ids minus 1.
  """

  name = "stanford_online_products"
  # The catalog builder's description and citation live beside its module.
  pkg_dir_path = _SOP._get_pkg_dir_path()  # pylint: disable=protected-access
  code_path = _CODE_PATH
  MANUAL_DOWNLOAD_INSTRUCTIONS = SOP_INSTRUCTIONS

  def _split_generators(self, dl_manager):
    root = _sop_root(os.fspath(dl_manager.manual_dir))
    return {split: self._generate_examples(root, os.path.join(root, f"Ebay_{split}.txt"))
            for split in ("train", "test")}

  def _generate_examples(self, root, list_path):
    super_classes = self.info.features["super_class_id"].names
    with open(list_path) as f:
      for i, row in enumerate(csv.DictReader(f, delimiter=" ")):
        try:
          super_class = int(row["super_class_id"]) - 1
          example = {"class_id": int(row["class_id"]) - 1,
                     "super_class_id/num": super_class,
                     "super_class_id": super_classes[super_class]}
          path = os.path.join(root, row["path"])
        except (KeyError, ValueError, IndexError, TypeError) as e:
          raise DataError(f"{list_path} row {i + 1}: expected 'image_id class_id "
                          f"super_class_id path' columns, got {row}.") from e
        yield i, {**example, "image": _read_bytes(path)}


# --------------------------------------------------------------------------- prepare


@contextlib.contextmanager
def _shuffle_in_memory():
  """Keeps TFDS's example shuffle in memory when TensorFlow is absent.

  TFDS shuffles a split's serialized examples in memory up to 1 GiB, then spills them to
  disk through ``tf.io.gfile``, which fails without TensorFlow. Stanford Online
  Products' train split (~1.5 GB) and Cars-196's halves (~1 GB) reach that, so without
  TensorFlow the limit is lifted while writing: the split is held in memory instead.
  """
  if importlib.util.find_spec("tensorflow") is not None:
    yield
    return
  limit = tfds_shuffle.MAX_MEM_BUFFER_SIZE
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = 1 << 62
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE = limit

_FILE_BUILDERS = {"cub": CubFiles, "cars": CarsFiles, "sop": SopFiles,
                  "inshop": InshopClothesRetrieval}
_LAYOUT_CHECKS = {"cub": _cub_layout, "cars": _cars_layout, "sop": _sop_root,
                  "inshop": read_inshop_partition}
INSTRUCTIONS = {"cub": CUB_INSTRUCTIONS, "cars": CARS_INSTRUCTIONS,
                 "sop": SOP_INSTRUCTIONS, "inshop": INSHOP_INSTRUCTIONS}


def prepare_tfds(dataset: str, data_dir: str, manual_dir: str | None = None) -> str:
  """Writes benchmark ``dataset`` into ``data_dir`` as a TFDS array_record dataset.

  Args:
    dataset: ``"cub"`` (``caltech_birds2011``), ``"cars"`` (``cars196``), ``"sop"``
      (``stanford_online_products``) or ``"inshop"`` (``inshop_clothes_retrieval``).
    data_dir: the TFDS data directory; the dataset lands in
      ``<data_dir>/<tfds name>/<version>/``. Created if missing.
    manual_dir: the benchmark's files, downloaded and extracted (each dataset's
      ``*_INSTRUCTIONS`` in this module gives the layout). Required for ``cars`` and
      ``inshop``. For ``cub`` and ``sop`` it is optional: without it the TFDS catalog
      builder downloads the data, which needs TensorFlow (and OpenCV for CUB).

  Returns:
    The prepared dataset's directory. A dataset already prepared there in
    array_record format is left as it is.

  Raises:
    DataError: an unknown dataset, a missing or incomplete ``manual_dir``, missing
      dependencies of the catalog builder, or a dataset already prepared in
      ``data_dir`` in another file format.
  """
  if dataset not in _FILE_BUILDERS:
    raise DataError(f"unknown TFDS dataset {dataset!r}; expected one of "
                    f"{', '.join(_FILE_BUILDERS)}.")
  name = _FILE_BUILDERS[dataset].name
  data_dir = resolve_data_dir(data_dir)
  download_config = None
  if manual_dir is None:
    if dataset in ("cars", "inshop"):
      raise DataError(f"preparing {name} needs manual_dir, a folder holding the "
                      f"downloaded files:\n{INSTRUCTIONS[dataset]}")
    # The catalog builders read their files through tf.io.gfile (CUB's masks through
    # OpenCV), and TFDS's downloader needs importlib_resources (see _CODE_PATH).
    needed = ["tensorflow", "importlib_resources"] + (["cv2"] if dataset == "cub" else [])
    absent = [m for m in needed if importlib.util.find_spec(m) is None]
    if absent:
      packages = {"tensorflow": "tensorflow", "cv2": "opencv-python-headless",
                  "importlib_resources": "importlib_resources"}
      raise DataError(
          f"downloading {name} through its TFDS catalog builder needs "
          f"{' and '.join(packages[m] for m in absent)} (pip install "
          f"{' '.join(packages[m] for m in absent)}). Or, without them, download the "
          f"files yourself and pass manual_dir:\n{INSTRUCTIONS[dataset]}")
    builder_cls = tfds.builder_cls(name)
  else:
    manual_dir = os.path.abspath(os.path.expanduser(manual_dir))
    if not os.path.isdir(manual_dir):
      raise DataError(f"manual_dir {manual_dir} does not exist.\n{INSTRUCTIONS[dataset]}")
    # Check the layout before TFDS starts writing, so a bad folder fails fast and plainly.
    _LAYOUT_CHECKS[dataset](manual_dir)
    builder_cls = _FILE_BUILDERS[dataset]
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  # Opened without a file format first: TFDS refuses to open a dataset prepared in one
  # format as another, with an error that does not say what to do.
  existing = builder_cls(data_dir=data_dir)
  if existing.is_prepared():
    formats = existing.info.available_file_formats()
    if tfds.core.FileFormat.ARRAY_RECORD not in formats:
      raise DataError(
          f"{existing.data_dir} already holds {name} as "
          f"{', '.join(sorted(f.value for f in formats))}, which has no random access "
          "for the tfds source; delete that folder (or choose another data_dir) and "
          "prepare again.")
    return os.fspath(existing.data_dir)
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  with _shuffle_in_memory():
    builder.download_and_prepare(download_config=download_config)
  return os.fspath(builder.data_dir)
