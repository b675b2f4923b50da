"""The embedded default dataset: procedurally generated image classes, no download.

``load_synthetic`` builds a class-disjoint retrieval benchmark that a ``small_cnn``
trained with the MS loss learns in a couple of CPU minutes, and on which raw pixels and
an untrained network retrieve poorly, so what the numbers show is metric learning.

**Classes.** A class is one combination of three attributes of a main object:

- shape (8): disk, ring, triangle, square, plus, five-pointed star, half disk, bar;
- hue (8): 0°, 45°, ..., 315°;
- texture (4): solid, stripes, checkerboard, halves (one half in a second colour); the
  second colour is a darker shade of the object's.

That is 8 × 8 × 4 = 256 combinations. A seed shuffles them once; the training classes
are taken from the front of that order and the test classes from the back, so the two
are disjoint whenever ``num_train_classes + num_test_classes <= 256``, and changing one
count never changes the other split's classes. A test class is a combination never seen
in training, made of attribute values that were: what transfers to it is an embedding
of the main object's shape, colour and texture that ignores everything else. The
default trains on 128 classes, so each test class's shape, hue and texture each occur
in about 16, 16 and 32 training classes (with 64, learning was slower and generalised
less), and tests on 64 × 32 images: chance Recall@1 is low and the evaluation and the
raw-pixel baseline take seconds. Training classes cost nothing to store.

**Nuisances.** Every image draws, independently: the main object's position, size
(radius 0.5–0.7 of the half-width) and rotation (any angle; every shape is achiral, so a
horizontal flip keeps the class); its hue (±12°), saturation and brightness; a
background that is a gradient between two random colours under a random plane wave; 1–3
smaller distractor objects behind it (any shape, any hue; radius 0.08–0.18); a
per-channel gain (a colour cast), a brightness shift and pixel noise. Every object has a
dark outline, so the silhouette shows on any background. The images already vary this
much, so training needs no augmentation; a random crop much smaller than the image may
cut the main object away.

**Determinism.** Image ``k`` of attribute combination ``c`` is a pure function of
``(seed, c, k, image_size)``: it is rendered on every ``read`` by a NumPy generator
seeded with those numbers (no files, no cache; about 0.6 ms per 32-px image), so a
``SyntheticImages`` pickles as a few integers and every worker process reads the same
pixels.

**Measured** on the defaults (128 train / 64 test classes × 32 images, 32 px, seed 0;
test queries search each other; Recall@1): cosine on mean-centred raw pixels 9.3%
(seeds 1 and 2: 9.2%, 11.7%; the tests assert < 15%); an untrained ``small_cnn`` with a
64-d head (``nnx.Rngs(0)``, eval mode) 6.0%. Trained with the MS loss (α=2, β=50, λ=0.5, ε=0.1) and Adam (lr 1e-3,
constant), P×K = 16 × 4 = 64 images per step, no augmentation, ImageNet-RGB
normalisation, on 2 CPU cores (about 0.27 s per step): 39.9% after 150 steps (42 s),
57.8% after 300 (81 s), 69.0% after 450 (120 s). With λ=1 (the paper's): 41.4%, 52.7%,
63.5% at the same steps. Train batches were drawn from pre-rendered images (classes
without replacement, K images of each without replacement, NumPy seed 0).
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence

import numpy as np

from msjax.data import records
from msjax.data.records import DataError

SHAPES = ("disk", "ring", "triangle", "square", "plus", "star", "half_disk", "bar")
NUM_HUES = 8
TEXTURES = ("solid", "stripes", "checker", "halves")
NUM_COMBINATIONS = len(SHAPES) * NUM_HUES * len(TEXTURES)

DEFAULTS = dict(num_train_classes=128, num_test_classes=64, images_per_class=32,
                image_size=32, seed=0)

# Domain tags in the generators' seed words: the class shuffle and the images never share
# a stream.
_CLASS_ORDER_TAG = 0x5C1A55
_IMAGE_TAG = 0x1A6E


def _attribute_indices(combination: int) -> tuple[int, int, int]:
  """``(shape, hue, texture)`` indices of an attribute combination."""
  texture = combination % len(TEXTURES)
  hue = (combination // len(TEXTURES)) % NUM_HUES
  return combination // (len(TEXTURES) * NUM_HUES), hue, texture


def combination_attributes(combination: int) -> tuple[str, int, str]:
  """``(shape, hue in degrees, texture)`` of attribute combination ``0..255``."""
  shape, hue, texture = _attribute_indices(combination)
  return SHAPES[shape], hue * 360 // NUM_HUES, TEXTURES[texture]


def class_order(seed: int) -> np.ndarray:
  """The seed's shuffle of the 256 attribute combinations (train from the front, test from
  the back)."""
  return np.random.default_rng([seed, _CLASS_ORDER_TAG]).permutation(NUM_COMBINATIONS)


# --- rendering -----------------------------------------------------------------------------

# How the nuisances are drawn (radii and positions in units of the image's half-width;
# colours in [0, 1]). Tuned so that raw pixels and an untrained network retrieve poorly
# while a small CNN learns the classes in a couple of CPU minutes (module docstring).
_MAIN_RADIUS = (0.5, 0.7)
_MAIN_HUE_JITTER = 12.0  # degrees; the hues are 45° apart
_DISTRACTORS = (1, 3)  # how many, inclusive
_DISTRACTOR_RADIUS = (0.08, 0.18)
_WAVE_AMPLITUDE = (0.025, 0.1)
_GAIN = (0.85, 1.15)
_SHIFT = 0.08
_NOISE = 0.03
_SHADE = 0.45  # the texture's second colour: the main colour times this
_OUTLINE = 0.08  # grey level of the outline every object has
_EXTENT = 1.12  # every shape lies within this many radii of its centre


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates, the image spanning [-1, 1] on both axes (y down)."""
  t = (np.arange(size, dtype=np.float32) + 0.5) * (2.0 / size) - 1.0
  y, x = np.meshgrid(t, t, indexing="ij")
  return x, y


def _polygon(u, v, sides: int, inradius: float, phase: float = -np.pi / 2):
  """Distance-like field of a regular polygon (negative inside): the largest excess over
  the edges' half-planes."""
  d = None
  for k in range(sides):
    a = phase + 2 * math.pi * k / sides
    edge = u * math.cos(a) + v * math.sin(a)
    d = edge if d is None else np.maximum(d, edge)
  return d - inradius


def _shape_field(shape: int, u, v):
  """Signed distance (approximately, in object radii; negative inside) to shape ``shape``
  in its own frame, where the shape spans about the unit disk."""
  name = SHAPES[shape]
  if name == "disk":
    return np.hypot(u, v) - 1.0
  if name == "ring":
    return np.abs(np.hypot(u, v) - 0.72) - 0.28
  if name == "triangle":
    return _polygon(u, v, 3, 0.5)
  if name == "square":
    return np.maximum(np.abs(u), np.abs(v)) - 0.72
  if name == "plus":
    return np.minimum(np.maximum(np.abs(u) - 0.3, np.abs(v) - 1.0),
                      np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.3))
  if name == "star":
    # The radius swings between 0.45 and 1 five times per turn; the polar excess
    # overstates the distance near the tips, hence the 0.6.
    rho, phi = np.hypot(u, v), np.arctan2(v, u)
    return 0.6 * (rho - (0.725 + 0.275 * np.cos(5 * phi)))
  if name == "half_disk":
    v = v + 0.5  # centres the half disk's bounding box, like the other shapes'
    return np.maximum(np.hypot(u, v) - 1.0, -v)
  return np.maximum(np.abs(u) - 1.0, np.abs(v) - 0.32)  # bar


def _texture_field(texture: int, u, v):
  """How much of the second colour, in [0, 1], at each point of the object's frame (so
  the pattern turns and scales with the object); ``None`` for solid. The periods are
  coarse enough to survive a 32-px image."""
  name = TEXTURES[texture]
  if name == "solid":
    return None
  if name == "stripes":
    s = np.sin(u * (2 * np.pi / 0.9))
  elif name == "checker":
    s = 2.0 * np.sin(u * (np.pi / 0.55)) * np.sin(v * (np.pi / 0.55))
  else:  # halves
    s = 3.0 * u
  return np.clip(0.5 + 1.5 * s, 0.0, 1.0)


def _hsv(hue_deg: float, sat: float, val: float) -> np.ndarray:
  return np.asarray(colorsys.hsv_to_rgb((hue_deg / 360.0) % 1.0, sat, val), np.float32)


def _window(centre: float, half: float, size: int) -> slice:
  """The pixels whose centres lie within ``half`` of ``centre`` on one axis."""
  lo = int(np.floor((centre - half + 1.0) * size / 2.0 - 0.5))
  hi = int(np.ceil((centre + half + 1.0) * size / 2.0 - 0.5)) + 1
  return slice(max(lo, 0), min(hi, size))


def _draw(img, rng, *, shape, colour, texture, radius, centre):
  """Paints one object (outlined, anti-aliased over about a pixel, at a random rotation)
  onto ``img`` in place; only the pixels of its bounding box are touched."""
  size = img.shape[0]
  pixel = 2.0 / size
  angle = rng.uniform(0.0, 2 * np.pi)
  half = _EXTENT * radius + 2.5 * pixel
  cx, cy = float(centre[0]), float(centre[1])  # Python floats keep the maths float32
  rows, cols = _window(cy, half, size), _window(cx, half, size)
  x, y = _grid(size)
  dx, dy = x[rows, cols] - cx, y[rows, cols] - cy
  c, s = math.cos(angle), math.sin(angle)
  u = (c * dx + s * dy) / radius
  v = (c * dy - s * dx) / radius
  d = _shape_field(shape, u, v) * (radius / pixel)  # in pixels
  patch = img[rows, cols]
  # A dark outline about a pixel wide keeps the silhouette visible on any background.
  patch += (_OUTLINE - patch) * np.clip(1.5 - d, 0.0, 1.0)[..., None]
  mix = _texture_field(texture, u, v)
  paint = colour if mix is None else colour * (1.0 - (1.0 - _SHADE) * mix[..., None])
  patch += (paint - patch) * np.clip(0.5 - d, 0.0, 1.0)[..., None]


def render(seed: int, combination: int, index: int, image_size: int) -> np.ndarray:
  """Image ``index`` of attribute combination ``combination`` (0..255) for ``seed``:
  ``uint8 [image_size, image_size, 3]``, RGB."""
  rng = np.random.default_rng([seed, _IMAGE_TAG, combination, index])
  x, y = _grid(image_size)

  # Background: a gradient between two random colours under a random plane wave.
  c0, c1 = rng.uniform(0.0, 1.0, size=(2, 3)).astype(np.float32)
  theta = rng.uniform(0.0, 2 * np.pi)
  ramp = np.clip(0.5 + 0.5 * (math.cos(theta) * x + math.sin(theta) * y), 0.0, 1.0)
  freq, phase, theta = rng.uniform(1.5, 5.0), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
  wave = rng.uniform(*_WAVE_AMPLITUDE) * np.sin(
      math.pi * freq * (math.cos(theta) * x + math.sin(theta) * y) + phase)
  img = c0 + (c1 - c0) * ramp[..., None] + wave[..., None]

  # Distractors behind the main object: any shape and hue, so neither "there is a
  # triangle" nor "there is red" identifies a class; the class is the big object's.
  for _ in range(rng.integers(_DISTRACTORS[0], _DISTRACTORS[1] + 1)):
    _draw(img, rng, shape=rng.integers(len(SHAPES)),
          colour=_hsv(rng.uniform(0, 360), rng.uniform(0.4, 1.0), rng.uniform(0.35, 1.0)),
          texture=0, radius=rng.uniform(*_DISTRACTOR_RADIUS),
          centre=rng.uniform(-1.0, 1.0, size=2))

  shape, hue, texture = _attribute_indices(combination)
  radius = rng.uniform(*_MAIN_RADIUS)
  colour = _hsv(hue * 360.0 / NUM_HUES + rng.uniform(-_MAIN_HUE_JITTER, _MAIN_HUE_JITTER),
                rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))
  _draw(img, rng, shape=shape, colour=colour, texture=texture, radius=radius,
        centre=rng.uniform(-(0.95 - radius), 0.95 - radius, size=2))

  # Camera: per-channel gain (a colour cast), brightness shift, sensor noise.
  img = img * rng.uniform(*_GAIN, size=3).astype(np.float32) + rng.uniform(-_SHIFT, _SHIFT)
  img += rng.normal(0.0, _NOISE, size=img.shape).astype(np.float32)
  return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --- the source and the dataset ------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticImages:
  """The images of one split, rendered on read: class ``c`` (label order) is attribute
  combination ``combinations[c]``, image ``i`` is image ``i % images_per_class`` of class
  ``i // images_per_class``."""

  split: str
  combinations: tuple[int, ...]
  images_per_class: int
  image_size: int
  seed: int

  def __len__(self) -> int:
    return len(self.combinations) * self.images_per_class

  def _locate(self, index: int) -> tuple[int, int]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"synthetic:{self.split}: image {index} out of range [0, {len(self)}).")
    return divmod(index, self.images_per_class)

  def read(self, index: int) -> np.ndarray:
    """``uint8 [image_size, image_size, 3]``, RGB."""
    label, k = self._locate(index)
    return render(self.seed, self.combinations[label], k, self.image_size)

  def describe(self, index: int) -> str:
    label, k = self._locate(index)
    return f"synthetic:{self.split}/class {label}/image {k}"


def _check_int(field: str, value, low: int, high: int | None = None) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise DataError(f"data.synthetic.{field} must be an integer; got {value!r}.")
  value = int(value)
  if value < low or (high is not None and value > high):
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise DataError(f"data.synthetic.{field} must be {bound}; got {value}.")
  return value


def _split(name: str, combinations: np.ndarray, images_per_class: int, image_size: int,
           seed: int) -> records.Split:
  images = SyntheticImages(name, tuple(int(c) for c in combinations), images_per_class,
                           image_size, seed)
  labels = np.repeat(np.arange(len(combinations)), images_per_class)
  names = tuple("{}/hue{}/{}".format(*combination_attributes(c)) for c in combinations)
  return records.Split(name, images, labels, names)


def load_synthetic(*, num_train_classes: int = DEFAULTS["num_train_classes"],
                   num_test_classes: int = DEFAULTS["num_test_classes"],
                   images_per_class: int = DEFAULTS["images_per_class"],
                   image_size: int = DEFAULTS["image_size"],
                   seed: int = DEFAULTS["seed"]) -> records.Dataset:
  """The synthetic benchmark: class-disjoint ``train`` and ``test`` splits (the test
  queries search each other, so no gallery). Arguments are ``data.synthetic.<field>``.

  Raises:
    DataError: an argument of the wrong type or out of range, named by its config field.
  """
  num_train_classes = _check_int("num_train_classes", num_train_classes, 2)
  num_test_classes = _check_int("num_test_classes", num_test_classes, 2)
  images_per_class = _check_int("images_per_class", images_per_class, 2)
  # small_cnn halves the image three times; below 16 px its last stage sees 1 pixel.
  image_size = _check_int("image_size", image_size, 16, 512)
  seed = _check_int("seed", seed, 0)
  if num_train_classes + num_test_classes > NUM_COMBINATIONS:
    raise DataError(
        f"data.synthetic.num_train_classes + data.synthetic.num_test_classes must be at "
        f"most {NUM_COMBINATIONS} (the attribute combinations: {len(SHAPES)} shapes × "
        f"{NUM_HUES} hues × {len(TEXTURES)} textures); got {num_train_classes} + "
        f"{num_test_classes}.")
  order = class_order(seed)
  train = _split("train", order[:num_train_classes], images_per_class, image_size, seed)
  test = _split("test", order[NUM_COMBINATIONS - num_test_classes:], images_per_class,
                image_size, seed)
  return records.Dataset("synthetic", train, test)


# --- the raw-pixel baseline ----------------------------------------------------------------


def pixel_embeddings(split: records.Split) -> np.ndarray:
  """``float32 [N, H·W·3]``: each image's pixels in [0, 1], flattened, minus the split's
  mean image (per pixel and channel), L2-normalised, so inner products are cosine
  similarities of centred pixels.

  Raises:
    DataError: the split's images are encoded bytes or differ in size.
  """
  rows = []
  for i in range(len(split)):
    image = split.images.read(i)
    if not isinstance(image, np.ndarray):
      raise DataError(f"raw-pixel baseline needs decoded arrays; {split.images.describe(i)} "
                      "is encoded bytes.")
    if rows and image.shape != rows[0].shape:
      raise DataError(f"raw-pixel baseline needs images of one size; "
                      f"{split.images.describe(i)} is {image.shape}, image 0 is "
                      f"{rows[0].shape}.")
    rows.append(image)
  x = np.stack(rows).reshape(len(rows), -1).astype(np.float32) / 255.0
  x -= x.mean(axis=0)
  x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  return x


def raw_pixel_recall(split: records.Split, ks: Sequence[int] = (1,)) -> dict:
  """Retrieval metrics (``msjax.evaluate.retrieval_metrics``, queries searching each other)
  of cosine similarity on mean-centred raw pixels: the baseline a trained embedding has
  to beat."""
  from msjax import evaluate  # JAX is only needed for the baseline, not to read images
  return evaluate.retrieval_metrics(pixel_embeddings(split), split.labels, ks=tuple(ks))
