"""Random and adversarial P×K batches of unit embeddings, built with NumPy."""

import numpy as np
from hypothesis import strategies as st

KINDS = ("pk", "one_class", "singletons", "k1_mixed", "duplicates", "ties", "mined_out")


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_batch(kind, num_classes, per_class, dim, seed, spread=0.6):
  """Returns ``(emb [B, D] float64 unit rows, labels [B] int32)`` for a batch kind.

  - ``pk``: P classes × K images around random class centres (``spread`` = noise level).
  - ``one_class``: every image has the same label (no negatives).
  - ``singletons``: every image its own class (no positives).
  - ``k1_mixed``: P×K where some classes are split into single-image classes.
  - ``duplicates``: P×K where some images are exact copies of others (S = 1 pairs,
    within and across classes).
  - ``ties``: embeddings on a coarse lattice, so many similarities are exactly equal.
  - ``mined_out``: tight classes far apart, so MS mining keeps no pair at all.
  """
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  centres = unit(rng.normal(size=(num_classes, dim)))
  emb = unit(centres[labels] + spread * rng.normal(size=(len(labels), dim)) / np.sqrt(dim))
  if kind == "one_class":
    labels[:] = 0
  elif kind == "singletons":
    labels = np.arange(len(labels), dtype=np.int32)
  elif kind == "k1_mixed":
    # Same batch size (so compiled kernels are reused); split classes into singletons.
    split = rng.random(num_classes) < 0.5
    fresh = num_classes + np.arange(len(labels), dtype=np.int32)
    labels = np.where(split[labels], fresh, labels).astype(np.int32)
  elif kind == "duplicates":
    n = len(labels)
    src = rng.integers(0, n, size=max(1, n // 3))
    dst = rng.integers(0, n, size=len(src))
    emb[dst] = emb[src]
  elif kind == "ties":
    lattice = rng.integers(-1, 2, size=emb.shape).astype(np.float64)
    lattice[:, 0] = np.where(np.any(lattice != 0, axis=1), lattice[:, 0], 1.0)
    emb = unit(lattice)
  elif kind == "mined_out":
    # One axis per class, members 1e-2 apart: positives ~0.9999 (below the by-value
    # self threshold), negatives ~0, so no negative is within ε of the hardest positive.
    emb = unit(np.eye(dim)[labels % dim] + 1e-2 * rng.normal(size=(len(labels), dim)))
  return emb, labels


@st.composite
def batches(draw, kinds=KINDS):
  """(kind, emb, labels) with B = 12 or 10 (few shapes: eager kernels are reused)."""
  kind = draw(st.sampled_from(kinds))
  num_classes, per_class = draw(st.sampled_from(
      [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2), (12, 1), (5, 2), (2, 5), (10, 1)]))
  dim = draw(st.integers(3, 12))
  if kind == "mined_out":
    num_classes, per_class = draw(st.sampled_from([(2, 6), (3, 4), (4, 3), (2, 5)]))
    dim = max(dim, num_classes)
  seed = draw(st.integers(0, 2**31 - 1))
  spread = draw(st.sampled_from([0.3, 1.0, 3.0]))
  emb, labels = make_batch(kind, num_classes, per_class, dim, seed, spread)
  return kind, emb, labels
