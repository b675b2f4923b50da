"""Decoding, the released recipe's crops and resizes, and the two input conventions."""

import io
import math

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from msjax.data import transforms as T
from msjax.data.records import DataError


def _encode(img: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt)
  return buf.getvalue()


def _noise(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("size,expected", [((500, 375), (341, 256)), ((375, 500), (256, 341)),
                                           ((256, 300), (256, 300)), ((100, 50), (512, 256))])
def test_resize_short_side_sizes(size, expected):
  """Short side → 256, long side truncated (torchvision's Resize(int) rule)."""
  img = Image.fromarray(_noise(size[1], size[0]))
  assert T.resize_short_side(img, 256).size == expected


def test_center_crop_takes_the_middle():
  arr = _noise(256, 341)
  t = T.ImageTransform(image_size=227, resize_to=256, train=False)
  out = t(_encode(Image.fromarray(arr), "PNG"), "x.png")
  # (341 - 227) / 2 = 57, (256 - 227) / 2 = 14.5 -> 14 (round half to even, as torchvision)
  np.testing.assert_array_equal(out, arr[14:14 + 227, 57:57 + 227])


def test_random_resized_crop_box_properties():
  rng = np.random.default_rng(0)
  areas, log_ratios = [], []
  for n in range(3000):
    w, h = (341, 256) if n % 2 else (256, 256)
    left, top, cw, ch = T.random_resized_crop_box(w, h, (0.16, 1.0), (3 / 4, 4 / 3), rng)
    assert 0 <= left and left + cw <= w and 0 <= top and top + ch <= h
    areas.append(cw * ch / (w * h))
    log_ratios.append(math.log(cw / ch))
  areas, log_ratios = np.array(areas), np.array(log_ratios)
  # Rounding moves a side by at most half a pixel.
  assert areas.min() > 0.16 * 0.95 and areas.max() <= 1.0
  assert np.all(np.abs(log_ratios) <= math.log(4 / 3) + 0.02)
  # Large areas fail to fit more often and are redrawn, so the mean sits below 0.58.
  assert 0.45 < areas.mean() < 0.58
  # On the square images, wide and tall crops fail to fit equally often.
  assert abs(log_ratios[::2].mean()) < 0.02
  assert log_ratios[1::2].mean() > 0.02  # on the wide ones, tall crops fail more often


def test_random_resized_crop_falls_back_to_a_clamped_center_crop():
  """A 1000×10 strip fits no crop of area ≥ 0.9 and ratio ≤ 4/3: widest allowed center."""
  box = T.random_resized_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3),
                                  np.random.default_rng(0))
  assert box == ((1000 - 13) // 2, 0, 13, 10)
  box = T.random_resized_crop_box(10, 1000, (0.9, 1.0), (3 / 4, 4 / 3),
                                  np.random.default_rng(0))
  assert box == (0, (1000 - 13) // 2, 10, 13)


def test_train_transform_whole_image_crop_and_flip():
  """scale = ratio = 1 on a square image: the crop is the whole image, flipped half the time."""
  arr = _noise(64, 64)
  t = T.ImageTransform(image_size=32, resize_to=None, train=True, crop_scale=(1.0, 1.0),
                       crop_ratio=(1.0, 1.0), flip=True)
  whole = np.asarray(Image.fromarray(arr).resize((32, 32), Image.Resampling.BILINEAR))
  flips = 0
  for seed in range(40):
    out = t(arr, "a", np.random.default_rng(seed))
    if np.array_equal(out, whole[:, ::-1]):
      flips += 1
    else:
      np.testing.assert_array_equal(out, whole)
  assert 8 < flips < 32


def test_train_transform_crops_then_resizes():
  """The crop is cut before resizing: no pixel outside the box reaches the output."""
  arr = np.zeros((100, 100, 3), np.uint8)
  arr[:, 50:] = 255  # right half white
  t = T.ImageTransform(image_size=16, resize_to=None, train=True, crop_scale=(0.2, 0.2),
                       crop_ratio=(1.0, 1.0), flip=False)
  for seed in range(20):
    rng = np.random.default_rng(seed)
    left, top, cw, ch = T.random_resized_crop_box(100, 100, (0.2, 0.2), (1.0, 1.0),
                                                  np.random.default_rng(seed))
    out = t(arr, "a", rng)
    if left + cw <= 50:
      assert out.max() == 0
    elif left >= 50:
      assert out.min() == 255


def test_train_transform_is_deterministic_given_the_generator():
  data = _encode(Image.fromarray(_noise(120, 90)), "JPEG")
  t = T.ImageTransform(image_size=48, resize_to=64)
  a = t(data, "a.jpg", np.random.default_rng(7))
  b = t(data, "a.jpg", np.random.default_rng(7))
  c = t(data, "a.jpg", np.random.default_rng(8))
  assert a.dtype == np.uint8 and a.shape == (48, 48, 3)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "1", "I;16"])
def test_any_mode_decodes_to_rgb(mode):
  arr = _noise(12, 10)
  src = Image.fromarray(arr)
  if mode == "I;16":
    gray = np.arange(120, dtype=np.uint16).reshape(12, 10) * 500
    img = Image.fromarray(gray)  # uint16: mode I;16
    out = np.asarray(T.decode(_encode(img, "PNG"), "g.png"))
    assert out.shape == (12, 10, 3) and (out[..., 0] == out[..., 2]).all()
    np.testing.assert_allclose(out[..., 0], gray / 65535 * 255, atol=1)
    return
  img = src.convert(mode)
  fmt = "JPEG" if mode == "CMYK" else "PNG"
  out = T.decode(_encode(img, fmt), f"a.{fmt.lower()}")
  assert out.mode == "RGB" and out.size == (10, 12)
  if mode == "L":
    gray = np.asarray(img)
    np.testing.assert_array_equal(np.asarray(out), np.repeat(gray[..., None], 3, -1))
  if mode == "RGBA":  # alpha dropped, colour kept
    np.testing.assert_array_equal(np.asarray(out), arr)


@pytest.mark.parametrize("data", [b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 20])
def test_unreadable_image_names_its_path(data):
  with pytest.raises(T.ImageReadError, match="/data/cub/images/bad.jpg"):
    T.decode(data, "/data/cub/images/bad.jpg")


def test_truncated_jpeg_names_its_path():
  data = _encode(Image.fromarray(_noise(64, 64)), "JPEG")
  with pytest.raises(T.ImageReadError, match="cut.jpg") as info:
    T.decode(data[:len(data) // 2], "/x/cut.jpg")
  assert info.value.__cause__ is None  # no decoder traceback chained


def test_normalize_conventions_numpy_and_jax():
  rgb = np.array([[[[10, 20, 30]]]], np.uint8)
  caffe = T.normalize(rgb, "caffe_bgr")
  np.testing.assert_array_equal(caffe[0, 0, 0], [30 - 104, 20 - 117, 10 - 128])
  imnet = T.normalize(rgb, "imagenet_rgb")
  expected = (np.array([10, 20, 30]) / 255 - np.array(T.IMAGENET_RGB_MEAN)) / np.array(
      T.IMAGENET_RGB_STD)
  np.testing.assert_allclose(imnet[0, 0, 0], expected, rtol=1e-6)
  images = _noise(5, 7)[None]
  for conv in T.CONVENTIONS:
    host = T.normalize(images, conv)
    device = T.normalize(jnp.asarray(images), conv)
    assert host.dtype == np.float32 and device.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(device), host, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="unknown input convention"):
    T.normalize(images, "bgr")


def test_bad_transform_settings():
  with pytest.raises(DataError, match="crop_scale"):
    T.ImageTransform(crop_scale=(0.5, 0.2))
  with pytest.raises(DataError, match="resize_to ≥ data.image_size"):
    T.ImageTransform(image_size=227, resize_to=200, train=False)(_noise(300, 300), "a")
  with pytest.raises(DataError, match="uint8"):
    T.decode(np.zeros((4, 4), np.float32), "arr")


@pytest.mark.parametrize("train", [True, False])
def test_single_resize_matches_the_two_step_result(train):
  """Resampling the mapped box straight from the decoded image gives the same crop (same
  random draws) within a few levels on a photograph-like image."""
  rng = np.random.default_rng(0)
  coarse = rng.integers(0, 256, (17, 22, 3), dtype=np.uint8)
  arr = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.Resampling.BICUBIC))
  two_step = T.ImageTransform(227, 256, train=train)
  one_step = T.ImageTransform(227, 256, train=train, single_resize=True)
  for seed in range(6):
    a = two_step(arr, "a", np.random.default_rng(seed)).astype(int)
    b = one_step(arr, "a", np.random.default_rng(seed)).astype(int)
    assert a.shape == b.shape == (227, 227, 3)
    assert np.abs(a - b).mean() < 1.5 and np.percentile(np.abs(a - b), 99) <= 8
  # Nothing to resize first: both are the same code path, bit for bit.
  small = arr[:256, :300]
  np.testing.assert_array_equal(two_step(small, "a", np.random.default_rng(1)),
                                one_step(small, "a", np.random.default_rng(1)))
