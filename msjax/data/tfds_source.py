"""The ``tfds`` source: a benchmark read from a TFDS data_dir, split by class.

``load_tfds`` opens one of the four benchmarks in a TFDS ``data_dir`` (array_record
format, prepared by ``prepare_tfds`` or ``tfds build``) and re-splits it into the
class-disjoint retrieval protocol, which is not TFDS's own train/test split for CUB and
Cars:

- CUB-200-2011 (``caltech_birds2011``): TFDS labels 0-99 (classes 1-100) train,
  100-199 test, over TFDS's train and test splits together.
- Cars-196 (``cars196``): TFDS labels 0-97 (classes 1-98) train, 98-195 test, likewise.
- Stanford Online Products (``stanford_online_products``): TFDS's train and test splits,
  which are already class-disjoint.
- In-Shop (``inshop_clothes_retrieval``, built by ``msjax.data.tfds_build``): its
  train, query and gallery splits; query and gallery share one label numbering.

Class names are the datasets' own 1-based class ids (TFDS label + 1) and In-Shop's item
ids. Reading needs no TensorFlow: records are read through a TFDS data source as raw
``tf.Example`` bytes and parsed with the protobuf classes TFDS ships.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.proto import tf_example_pb2

from msjax.data import tfds_build
from msjax.data.tfds_build import prepare_tfds, resolve_data_dir
from msjax.data.records import Dataset, DataError, Split, make_split

__all__ = ["TFDS_NAMES", "TfdsImages", "load_tfds", "prepare_tfds", "read_feature"]

TFDS_NAMES = {
    "cub": "caltech_birds2011",
    "cars": "cars196",
    "sop": "stanford_online_products",
    "inshop": tfds_build.InshopClothesRetrieval.name,
}
# The first test class, as a TFDS label, where the protocol re-splits by class.
_FIRST_TEST_LABEL = {"cub": 100, "cars": 98}
_LABEL_KEY = {"cub": "label", "cars": "label", "sop": "class_id"}
_ARRAY_RECORD = tfds.core.FileFormat.ARRAY_RECORD


def _open(name: str, version: str, split: str, data_dir: str):
  """The split's records as raw serialized ``tf.Example`` bytes (random access)."""
  builder = tfds.builder(f"{name}:{version}", data_dir=data_dir)
  # RAW_BYTES: TFDS's own decoding would decode every image feature it is not told to
  # skip (CUB's segmentation masks too) and costs ~3x more per record than parsing the
  # proto here; the bytes are a tf.Example because the format is array_record.
  return builder.as_data_source(
      split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
      file_format=_ARRAY_RECORD)


def _value(record: bytes, key: str, where: str):
  """The single value of feature ``key`` in a serialized ``tf.Example``."""
  features = tf_example_pb2.Example.FromString(record).features.feature
  if key not in features:
    raise DataError(f"{where}: the record has no feature {key!r} (it has "
                    f"{sorted(features)}); the dataset was not written by the expected "
                    "builder. Prepare it again.")
  feature = features[key]
  kind = feature.WhichOneof("kind")
  values = getattr(feature, kind).value if kind else ()
  if len(values) != 1:
    raise DataError(f"{where}: feature {key!r} holds {len(values)} values, expected 1.")
  return values[0]


def read_feature(name: str, version: str, split: str, data_dir: str, key: str) -> list:
  """Feature ``key`` of every record of a TFDS split, in record order.

  Each record is read whole (array_record stores rows, so there is no column to read
  alone) and only its ``tf.Example`` proto is parsed: no image is decoded. For Stanford
  Online Products' 120,053 records (24 KB each) that took 6.7 s from the page cache and
  11.6 s from disk on one core; TFDS's own decoding, images skipped, takes ~3x as long.
  """
  source = _open(name, version, split, data_dir)
  return [_value(source[i], key, f"tfds:{name}/{split}[{i}] ({data_dir})")
          for i in range(len(source))]


@dataclasses.dataclass(frozen=True, eq=False)
class TfdsImages:
  """The encoded image bytes of records ``indices`` of a TFDS split.

  Pickles as its fields only; the data source is opened on the first ``read`` in each
  process, so workers receive a few numbers and a path.

  Attributes:
    name: the TFDS name (``caltech_birds2011``).
    version: the dataset version read (``0.2.0``).
    split: a TFDS split expression (``train``, ``train+test``).
    data_dir: the TFDS data_dir.
    indices: ``int64 [N]``: image ``i`` is record ``indices[i]`` of ``split``.
    image_key: the image feature.
  """

  name: str
  version: str
  split: str
  data_dir: str
  indices: np.ndarray
  image_key: str = "image"

  def __post_init__(self):
    object.__setattr__(self, "indices", np.asarray(self.indices, np.int64).reshape(-1))

  def __len__(self) -> int:
    return len(self.indices)

  def _source(self):
    # Per process: a reader opened before a fork is not to be shared with the child.
    opened = self.__dict__.get("_opened")
    if opened is None or opened[0] != os.getpid():
      opened = (os.getpid(), _open(self.name, self.version, self.split, self.data_dir))
      object.__setattr__(self, "_opened", opened)
    return opened[1]

  def read(self, index: int) -> bytes:
    """Image ``index``'s encoded bytes (JPEG or PNG, as the dataset stored them)."""
    record = self._source()[int(self.indices[index])]
    return _value(record, self.image_key, self.describe(index))

  def describe(self, index: int) -> str:
    return f"tfds:{self.name}/{self.split}[{int(self.indices[index])}] ({self.data_dir})"

  def __getstate__(self) -> dict:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def __setstate__(self, state: dict) -> None:
    for key, value in state.items():
      object.__setattr__(self, key, value)


def _how_to_prepare(dataset: str, data_dir: str) -> str:
  """How to put ``dataset`` into ``data_dir``, for error messages."""
  name = TFDS_NAMES[dataset]
  command = f"python -m msjax.data prepare_tfds --dataset {dataset} --data_dir {data_dir}"
  instructions = tfds_build.INSTRUCTIONS[dataset]
  if dataset in ("cars", "inshop"):
    return (f"Prepare it with `{command} --manual_dir DIR`, DIR holding the downloaded "
            f"files (TFDS cannot download {name}):\n{instructions}")
  needs = ("tensorflow, opencv-python-headless and importlib_resources" if dataset == "cub"
           else "tensorflow and importlib_resources")
  return (f"Prepare it with `{command} --manual_dir DIR` (no TensorFlow needed), DIR "
          f"holding the downloaded files:\n{instructions}"
          f"or let TFDS download it, which needs {needs} installed: `{command}`, or "
          f"`tfds build {name} --data_dir={data_dir} --file_format=array_record`.")


def _prepared_builder(dataset: str, data_dir: str):
  """The TFDS builder of ``dataset`` in ``data_dir``, checked to be readable here."""
  name = TFDS_NAMES[dataset]
  if not epath.Path(data_dir).is_dir():
    raise DataError(f"TFDS data_dir {data_dir} does not exist. "
                    f"{_how_to_prepare(dataset, data_dir)}")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises assorted types for unreadable dataset folders.
    raise DataError(f"cannot open TFDS dataset {name} in {data_dir}: {e}") from e
  if not builder.is_prepared():
    folder = epath.Path(data_dir) / name
    versions = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    found = (f" ({folder} holds {', '.join(versions)}; this TFDS reads {builder.version})"
             if versions else "")
    raise DataError(f"{name} {builder.version} is not prepared in {data_dir}{found}. "
                    f"{_how_to_prepare(dataset, data_dir)}")
  if _ARRAY_RECORD not in builder.info.available_file_formats():
    formats = ", ".join(sorted(f.value for f in builder.info.available_file_formats()))
    raise DataError(
        f"{builder.data_dir} holds {name} as {formats or builder.info.file_format}, "
        "but the tfds source needs array_record (random access for the P×K sampler). "
        "Delete that folder and prepare it again in array_record format. "
        f"{_how_to_prepare(dataset, data_dir)}")
  return builder


def _nonempty(split: Split, dataset: str, data_dir: str) -> Split:
  if not len(split):
    raise DataError(f"{dataset} in {data_dir}: the protocol's {split.name} split is "
                    "empty; the TFDS dataset is incomplete. Prepare it again.")
  return split


def load_tfds(dataset: str, data_dir: str) -> Dataset:
  """``dataset`` (``cub``, ``cars``, ``sop``, ``inshop``) from the TFDS ``data_dir``.

  Returns the class-disjoint protocol's splits (see the module docstring); each label
  is renumbered to ``0..C-1`` in class order. Only the label feature of every record is
  read here; images are read later, through ``TfdsImages``.

  Raises:
    DataError: an unknown dataset, a missing ``data_dir``, the dataset not prepared
      there (the message says how to prepare it), or prepared in a format without
      random access.
  """
  if dataset not in TFDS_NAMES:
    raise DataError(f"unknown TFDS dataset {dataset!r}; expected one of "
                    f"{', '.join(TFDS_NAMES)}.")
  data_dir = resolve_data_dir(data_dir)
  builder = _prepared_builder(dataset, data_dir)
  name, version = builder.name, str(builder.version)

  def images(split, indices):
    return TfdsImages(name, version, split, data_dir, indices)

  def checked(split):
    return _nonempty(split, dataset, data_dir)

  if dataset in _FIRST_TEST_LABEL:
    # TFDS keeps CUB's and Cars' own train/test halves, which share every class; the
    # protocol splits the classes instead, so both halves are read as one.
    split = "train+test"
    labels = np.asarray(read_feature(name, version, split, data_dir, _LABEL_KEY[dataset]),
                        np.int64)
    is_train = labels < _FIRST_TEST_LABEL[dataset]
    parts = {"train": np.flatnonzero(is_train), "test": np.flatnonzero(~is_train)}
    train, test = (checked(make_split(k, images(split, idx), labels[idx] + 1))
                   for k, idx in parts.items())
    return Dataset(dataset, train, test)

  if dataset == "sop":
    splits = {}
    for split in ("train", "test"):
      labels = np.asarray(read_feature(name, version, split, data_dir, _LABEL_KEY[dataset]),
                          np.int64)
      splits[split] = checked(make_split(split, images(split, np.arange(len(labels))),
                                         labels + 1))
    shared = set(splits["train"].class_names) & set(splits["test"].class_names)
    if shared:
      raise DataError(f"{name} in {data_dir}: train and test share classes "
                      f"{sorted(shared, key=int)[:5]}; SOP's splits are class-disjoint, "
                      "so this dataset was not built from Ebay_train.txt/Ebay_test.txt.")
    return Dataset(dataset, splits["train"], splits["test"])

  items = {split: [v.decode() for v in read_feature(name, version, split, data_dir,
                                                    "item_id")]
           for split in ("train", "query", "gallery")}
  train = checked(make_split("train", images("train", np.arange(len(items["train"]))),
                             items["train"]))
  # The evaluator compares query labels with gallery labels, so both splits number the
  # union of their items the same way.
  shared = np.unique(items["query"] + items["gallery"])
  query, gallery = (
      checked(Split(split, images(split, np.arange(len(items[split]))),
                    np.searchsorted(shared, np.asarray(items[split], dtype=shared.dtype)),
                    tuple(str(s) for s in shared)))
      for split in ("query", "gallery"))
  return Dataset(dataset, train, query, gallery=gallery)
