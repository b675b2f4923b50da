"""Image decoding, augmentation and input normalisation.

Runs in the input pipeline's worker processes on NumPy/PIL: decode (any mode → RGB),
then for training resize the short side → RandomResizedCrop → horizontal flip, and for
evaluation resize the short side → center crop, as the released MS code's torchvision
transforms do (same sampling of the crop box, same rounding, PIL bilinear resizing).

The pipeline hands ``uint8`` RGB images to the device, a quarter of the bytes of
``float32``; ``normalize`` then puts them in the backbone's input convention inside the
jitted step (it also accepts NumPy arrays, for host-side use).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, UnidentifiedImageError

from msjax.data.records import DataError

# Per-channel constants of the two input conventions (see msjax.models.INPUT_CONVENTIONS).
CAFFE_BGR_MEAN = (104.0, 117.0, 128.0)  # B, G, R on the 0-255 scale; std 1
IMAGENET_RGB_MEAN = (0.485, 0.456, 0.406)
IMAGENET_RGB_STD = (0.229, 0.224, 0.225)
CONVENTIONS = ("caffe_bgr", "imagenet_rgb")


class ImageReadError(DataError):
  """An image that cannot be read or decoded; the message names its path.

  ``reason`` is what is wrong with the file alone, without its path or advice
  (``"not an image format PIL can read"``), for listings that already name the file.
  """

  def __init__(self, message: str, reason: str | None = None):
    super().__init__(message)
    self.reason = reason or message


def decode(data, where: str) -> Image.Image:
  """Encoded bytes (or a ``uint8 [H, W, 3]`` array) → an RGB PIL image.

  Grayscale, palette, CMYK, 16-bit and alpha images become RGB (alpha is dropped), as
  PIL's ``convert("RGB")`` does for the released code's loader. ``where`` names the image
  in the error raised when it cannot be decoded.
  """
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim != 3 or data.shape[-1] != 3:
      raise ImageReadError(f"{where}: expected a uint8 [H, W, 3] image array, got "
                           f"{data.dtype} {data.shape}.")
    return Image.fromarray(data)
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # PIL raises many types for truncated or foreign files.
    why = ("not an image format PIL can read" if isinstance(e, UnidentifiedImageError)
           else f"{type(e).__name__}: {e}")
    raise ImageReadError(f"cannot decode image {where}: {why}. Re-download or remove the "
                         "file (python -m msjax.data check lists every unreadable "
                         "image).", reason=why) from None
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    # 16/32-bit grayscale: scale to 8 bits rather than clip (PIL's convert clips).
    arr = np.asarray(img, np.float64)
    top = 65535.0 if arr.max(initial=0) > 255 else 255.0
    img = Image.fromarray(np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8))
  return img if img.mode == "RGB" else img.convert("RGB")


def _short_side_size(w: int, h: int, size: int) -> tuple[int, int]:
  """``(w, h)`` scaled so the short side is ``size``, the long side truncated."""
  if min(w, h) == size:
    return w, h
  return (size, int(size * h / w)) if w <= h else (int(size * w / h), size)


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
  """Scales so the short side is ``size`` (long side truncated, as torchvision's Resize)."""
  new = _short_side_size(*img.size, size)
  return img if new == img.size else img.resize(new, Image.Resampling.BILINEAR)


def random_resized_crop_box(width: int, height: int, scale, ratio,
                            rng: np.random.Generator) -> tuple[int, int, int, int]:
  """The crop ``(left, top, crop_width, crop_height)`` of RandomResizedCrop.

  Up to ten tries of an area fraction uniform in ``scale`` and a log-uniform aspect
  ratio in ``ratio``; if none fits, the largest center crop whose aspect ratio lies in
  ``ratio`` (torchvision's algorithm).
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    cw = int(round(math.sqrt(target * aspect)))
    ch = int(round(math.sqrt(target / aspect)))
    if 0 < cw <= width and 0 < ch <= height:
      top = int(rng.integers(0, height - ch + 1))
      left = int(rng.integers(0, width - cw + 1))
      return left, top, cw, ch
  in_ratio = width / height
  if in_ratio < min(ratio):
    cw, ch = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    cw, ch = int(round(height * max(ratio))), height
  else:
    cw, ch = width, height
  return (width - cw) // 2, (height - ch) // 2, cw, ch


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  """The centered ``size × size`` box (torchvision's rounding)."""
  if size > width or size > height:
    raise DataError(f"cannot center-crop {size}×{size} from a {width}×{height} image; "
                    "make data.resize_to ≥ data.image_size.")
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return left, top, size, size


@dataclasses.dataclass(frozen=True)
class ImageTransform:
  """Decoded image → ``uint8 [size, size, 3]`` RGB.

  Attributes:
    image_size: the side of the output (227 for BN-Inception in the released recipe).
    resize_to: first scale the short side to this (256); None keeps the image as is.
    train: random crop and flip (train) or center crop (eval).
    crop_scale, crop_ratio: RandomResizedCrop's area fraction and aspect-ratio ranges.
    flip: random horizontal flip in training.
    single_resize: resample the crop straight from the decoded image (its box mapped
      back through the short-side resize) instead of resizing the whole image first and
      then the crop. The same crops and flips, about a third less work per image, and
      pixels within a few levels of the two-step result; off by default, which matches
      the released pipeline exactly.
  """

  image_size: int = 227
  resize_to: int | None = 256
  train: bool = True
  crop_scale: tuple[float, float] = (0.16, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip: bool = True
  single_resize: bool = False

  def __post_init__(self):
    if self.image_size < 1 or (self.resize_to is not None and self.resize_to < 1):
      raise DataError(f"data.image_size={self.image_size} and data.resize_to="
                      f"{self.resize_to} must be positive.")
    lo, hi = self.crop_scale
    if not 0 < lo <= hi <= 1:
      raise DataError(f"data.crop_scale={tuple(self.crop_scale)} must satisfy "
                      "0 < low ≤ high ≤ 1.")
    if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
      raise DataError(f"data.crop_ratio={tuple(self.crop_ratio)} must satisfy "
                      "0 < low ≤ high.")

  def __call__(self, data, where: str, rng: np.random.Generator | None = None) -> np.ndarray:
    img = decode(data, where)
    w, h = img.size
    if self.resize_to is not None:
      w, h = _short_side_size(w, h, self.resize_to)
    s = self.image_size
    if self.train:
      if rng is None:
        raise ValueError("a training transform needs a random generator.")
      left, top, cw, ch = random_resized_crop_box(w, h, self.crop_scale, self.crop_ratio, rng)
      img = self._resized_crop(img, (w, h), (left, top, cw, ch), s)
      if self.flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
      img = self._resized_crop(img, (w, h), center_crop_box(w, h, s), s)
    return np.asarray(img, dtype=np.uint8)

  def _resized_crop(self, img: Image.Image, size, box, out: int) -> Image.Image:
    """The ``box`` of ``img`` resized to ``size``, resampled to ``out × out``."""
    left, top, cw, ch = box
    if self.single_resize and img.size != tuple(size):
      sx, sy = img.size[0] / size[0], img.size[1] / size[1]
      return img.resize((out, out), Image.Resampling.BILINEAR,
                        box=(left * sx, top * sy, (left + cw) * sx, (top + ch) * sy))
    if img.size != tuple(size):
      img = img.resize(size, Image.Resampling.BILINEAR)
    # Crop, then resize: resizing with a box would let pixels outside it bleed in.
    img = img.crop((left, top, left + cw, top + ch))
    return img if img.size == (out, out) else img.resize((out, out),
                                                         Image.Resampling.BILINEAR)


def normalize(images, convention: str, xp=None):
  """``uint8`` RGB images ``[..., H, W, 3]`` → ``float32`` in a backbone's input convention.

  - ``"caffe_bgr"``: channels reversed to BGR, on the 0-255 scale, minus
    ``CAFFE_BGR_MEAN`` (std 1): the Caffe-converted BN-Inception weights.
  - ``"imagenet_rgb"``: ``(x / 255 - IMAGENET_RGB_MEAN) / IMAGENET_RGB_STD``.

  ``xp`` is the array module (``numpy`` or ``jax.numpy``); by default the one ``images``
  belongs to, so this runs inside a jitted step as well as on the host.
  """
  if xp is None:
    xp = np if isinstance(images, np.ndarray) else __import__("jax.numpy").numpy
  x = xp.asarray(images).astype(xp.float32)
  if convention == "caffe_bgr":
    return x[..., ::-1] - xp.asarray(CAFFE_BGR_MEAN, xp.float32)
  if convention == "imagenet_rgb":
    mean = xp.asarray(IMAGENET_RGB_MEAN, xp.float32) * 255.0
    return (x - mean) / (xp.asarray(IMAGENET_RGB_STD, xp.float32) * 255.0)
  raise ValueError(f"unknown input convention {convention!r}; choose one of {CONVENTIONS}.")
