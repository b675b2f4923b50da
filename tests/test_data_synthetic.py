"""The synthetic dataset: deterministic pixels, class-disjoint splits, argument errors, and
a raw-pixel baseline low enough that retrieval on it needs a learned embedding."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from msjax.data import records
from msjax.data import synthetic as S

SMALL = dict(num_train_classes=6, num_test_classes=5, images_per_class=3, image_size=24)


def read_all(split):
  return np.stack([split.images.read(i) for i in range(len(split))])


def test_counts_labels_dtype_shape_and_names():
  ds = S.load_synthetic(**SMALL)
  assert ds.name == "synthetic" and ds.gallery is None and ds.val is None
  assert set(ds.splits()) == {"train", "test"}
  for split, classes in ((ds.train, 6), (ds.test, 5)):
    assert len(split) == len(split.images) == classes * 3
    assert split.num_classes == classes
    np.testing.assert_array_equal(split.labels, np.repeat(np.arange(classes), 3))
    assert split.labels.dtype == np.int32
    assert len(set(split.class_names)) == classes
    image = split.images.read(len(split) - 1)
    assert image.dtype == np.uint8 and image.shape == (24, 24, 3)
  assert ds.test.images.describe(7) == "synthetic:test/class 2/image 1"
  assert ds.train.images.describe(0) == "synthetic:train/class 0/image 0"
  with pytest.raises(IndexError):
    ds.train.images.read(len(ds.train))


def test_defaults():
  ds = S.load_synthetic()
  assert ds.train.summary()["classes"] == S.DEFAULTS["num_train_classes"]
  assert ds.test.summary() == {"images": 64 * 32, "classes": 64,
                               "images_per_class": {"min": 32, "median": 32.0, "max": 32}}
  assert ds.test.images.read(0).shape == (32, 32, 3)


def test_train_and_test_classes_are_disjoint_and_stable():
  ds = S.load_synthetic(num_train_classes=200, num_test_classes=56, images_per_class=2)
  train, test = ds.train.images.combinations, ds.test.images.combinations
  assert not set(train) & set(test)
  assert sorted(train + test) == list(range(S.NUM_COMBINATIONS))
  assert not set(ds.train.class_names) & set(ds.test.class_names)
  # One split's classes do not depend on the other split's size.
  other = S.load_synthetic(num_train_classes=10, num_test_classes=56, images_per_class=2)
  assert other.test.images.combinations == test
  assert other.train.images.combinations == train[:10]


def test_class_names_name_the_attributes():
  ds = S.load_synthetic(**SMALL)
  for name, c in zip(ds.train.class_names, ds.train.images.combinations):
    shape, hue, texture = S.combination_attributes(c)
    assert name == f"{shape}/hue{hue}/{texture}"
    assert shape in S.SHAPES and texture in S.TEXTURES and hue % 45 == 0
  assert len({S.combination_attributes(c) for c in range(S.NUM_COMBINATIONS)}) == 256


def test_same_seed_same_pixels_also_after_pickling():
  a = S.load_synthetic(**SMALL, seed=3)
  b = S.load_synthetic(**SMALL, seed=3)
  for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
    pixels = read_all(split_a)
    np.testing.assert_array_equal(pixels, read_all(split_b))
    np.testing.assert_array_equal(pixels, read_all(pickle.loads(pickle.dumps(split_a))))
    # Reading in another order (as shuffled workers do) gives the same images.
    for i in (5, 0, 11, 5):
      np.testing.assert_array_equal(split_a.images.read(i), pixels[i])


def test_images_differ_across_seeds_indices_and_classes():
  a = read_all(S.load_synthetic(**SMALL, seed=0).test)
  b = read_all(S.load_synthetic(**SMALL, seed=1).test)
  assert not np.array_equal(a, b)
  flat = a.reshape(len(a), -1)
  assert len({row.tobytes() for row in flat}) == len(flat)  # no two images alike
  assert flat.std(axis=0).mean() > 20  # real variation, not near-duplicates


def test_render_is_a_pure_function_of_its_arguments():
  one = S.render(7, 100, 4, 40)
  assert one.shape == (40, 40, 3) and one.dtype == np.uint8
  np.testing.assert_array_equal(one, S.render(7, 100, 4, 40))
  assert not np.array_equal(one, S.render(7, 100, 5, 40))
  assert not np.array_equal(one, S.render(7, 101, 4, 40))
  assert one.std() > 20  # not a flat image


@pytest.mark.parametrize("field,value,match", [
    ("num_train_classes", 1, "must be >= 2"),
    ("num_test_classes", 0, "must be >= 2"),
    ("images_per_class", 1, "must be >= 2"),
    ("image_size", 8, r"must be in \[16, 512\]"),
    ("image_size", 1024, r"must be in \[16, 512\]"),
    ("seed", -1, "must be >= 0"),
    ("num_train_classes", 3.0, "must be an integer"),
    ("images_per_class", True, "must be an integer"),
    ("seed", "0", "must be an integer"),
])
def test_argument_errors_name_the_config_field(field, value, match):
  with pytest.raises(records.DataError, match=rf"data\.synthetic\.{field} {match}"):
    S.load_synthetic(**{field: value})


def test_too_many_classes():
  with pytest.raises(records.DataError, match=r"num_train_classes \+ data\.synthetic\."
                                              r"num_test_classes must be at most 256"):
    S.load_synthetic(num_train_classes=200, num_test_classes=57)


def test_numpy_integers_are_accepted():
  ds = S.load_synthetic(num_train_classes=np.int64(3), num_test_classes=np.int32(2),
                        images_per_class=np.int64(2), image_size=np.int64(16),
                        seed=np.int64(1))
  assert len(ds.train) == 6 and ds.test.images.read(0).shape == (16, 16, 3)


def test_pixel_embeddings_are_centred_unit_rows():
  split = S.load_synthetic(**SMALL).test
  x = S.pixel_embeddings(split)
  assert x.dtype == np.float32 and x.shape == (15, 24 * 24 * 3)
  np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
  # Centring happens before normalising: undo the norms and the mean is zero.
  raw = read_all(split).reshape(15, -1).astype(np.float64) / 255.0
  centred = raw - raw.mean(axis=0)
  np.testing.assert_allclose(x * np.linalg.norm(centred, axis=1, keepdims=True), centred,
                             atol=1e-5)


def test_pixel_embeddings_reject_encoded_or_mixed_images():
  class Encoded:
    def __len__(self):
      return 2

    def read(self, i):
      return b"\x89PNG"

    def describe(self, i):
      return f"img{i}.png"

  with pytest.raises(records.DataError, match="img0.png is encoded bytes"):
    S.pixel_embeddings(records.Split("test", Encoded(), np.zeros(2), ("a",)))

  class Mixed(Encoded):
    def read(self, i):
      return np.zeros((8 + i, 8, 3), np.uint8)

  with pytest.raises(records.DataError, match="images of one size; img1.png"):
    S.pixel_embeddings(records.Split("test", Mixed(), np.zeros(2), ("a",)))


# Raw-pixel Recall@1 of the default test split is 0.093 (module docstring); chance is
# about 1/64. The bound guards the data design: if a change made the classes separable by
# pixel overlap, a trained network's gain would no longer show metric learning.
RAW_PIXEL_RECALL_BOUND = 0.15


def test_raw_pixel_recall_on_the_default_test_split_is_low():
  test = S.load_synthetic().test
  metrics = S.raw_pixel_recall(test, ks=(1, 10))
  assert metrics["num_queries"] == len(test)
  assert 0.0 < metrics["recall@1"] < RAW_PIXEL_RECALL_BOUND
  assert metrics["recall@1"] <= metrics["recall@10"]


def test_config_defaults_are_the_module_defaults():
  from msjax.config import base_config
  assert base_config().data.synthetic.to_dict() == S.DEFAULTS
