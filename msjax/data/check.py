"""``python -m msjax.data check``: is a dataset where the config says, whole and readable?

Loads the config's dataset, reads every image (header, or a full decode with
``--decode``), and reports per split the images, classes and images per class, plus
every problem found: a missing root (with where to get the dataset), a missing or
malformed metadata file, missing or unreadable images (the first few by path), and
training classes too small for the P×K batch.
"""

from __future__ import annotations

import concurrent.futures
import io

from PIL import Image, UnidentifiedImageError

from msjax import config as config_lib
from msjax.data import sources, transforms
from msjax.data.records import DataError

FIRST_FEW = 5


def _read_problem(images, index: int, full_decode: bool) -> tuple[str, str] | None:
  """``None`` if image ``index`` reads, else ``("missing" | "unreadable", message)``."""
  where = images.describe(index)
  try:
    data = images.read(index)
  except FileNotFoundError:
    return "missing", where
  except OSError as e:
    return "unreadable", f"{where}: {e.strerror or e}"
  if full_decode:
    try:
      transforms.decode(data, where)
    except transforms.ImageReadError as e:
      return "unreadable", str(e)
    return None
  if hasattr(data, "shape"):  # a generated array
    return None
  try:
    with Image.open(io.BytesIO(data)) as img:  # parses the header only
      if img.format == "PNG":
        img.verify()  # chunk checksums: cheap, unlike a decode
  except UnidentifiedImageError:
    return "unreadable", f"{where}: not an image format PIL can read"
  except Exception as e:  # truncated headers, bad PNG checksums, ...
    return "unreadable", f"{where}: {type(e).__name__}: {e}"
  return None


def check_images(split, *, full_decode: bool = False, threads: int = 8) -> dict:
  """Reads every image of ``split``: counts and the first few missing or unreadable."""
  found = {"missing": [], "unreadable": []}
  counts = {"missing": 0, "unreadable": 0}
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    results = pool.map(lambda i: _read_problem(split.images, i, full_decode),
                       range(len(split)), chunksize=64)
    for result in results:
      if result is not None:
        kind, message = result
        counts[kind] += 1
        if len(found[kind]) < FIRST_FEW:
          found[kind].append(message)
  return {"missing_images": counts["missing"], "unreadable_images": counts["unreadable"],
          "first_missing": found["missing"], "first_unreadable": found["unreadable"]}


def check_dataset(d, *, full_decode: bool = False, threads: int = 8) -> dict:
  """The report ``check`` prints: ``ok``, per-split summaries, ``problems``, ``notes``.

  Raises ``DataError`` when the dataset cannot be loaded at all (root or metadata).
  """
  dataset = sources.load_dataset(d)
  benchmark = d.dataset in config_lib.BENCHMARKS
  report = {"dataset": d.dataset, "format": d.format if benchmark else None,
            "root": d.root, "splits": {}, "problems": [], "notes": []}
  published = _published_counts(d)
  for name, split in dataset.splits().items():
    summary = split.summary()
    summary.update(check_images(split, full_decode=full_decode, threads=threads))
    report["splits"][name] = summary
    for kind in ("missing", "unreadable"):
      n = summary[f"{kind}_images"]
      if n:
        report["problems"].append(
            f"{name}: {n} {kind} image(s), first: {summary[f'first_{kind}']}")
    expected = published.get(name)
    if expected and (summary["images"], summary["classes"]) != tuple(expected):
      report["notes"].append(
          f"{name}: {summary['images']} images / {summary['classes']} classes; the "
          f"published split has {expected[0]} / {expected[1]} (an incomplete download?).")
  train = dataset.train
  p, k = d.classes_per_batch, d.images_per_class
  if train.num_classes < p:
    report["problems"].append(
        f"train: {train.num_classes} classes, fewer than data.classes_per_batch={p}.")
  small = sources.small_classes(train, k)
  if small:
    listed = ", ".join(f"{c} ({n})" for c, n in small[:FIRST_FEW])
    message = (f"train: {len(small)} classes have fewer than data.images_per_class={k} "
               f"images (first: {listed})")
    if d.pad_small_classes:
      report["notes"].append(message + "; their images are drawn with replacement "
                             "(data.pad_small_classes=True).")
    else:
      report["problems"].append(message + "; lower data.images_per_class or set "
                                "data.pad_small_classes=True.")
  report["ok"] = not report["problems"]
  return report


def _published_counts(d) -> dict:
  """The benchmark's published ``split -> (images, classes)``; empty for other sources."""
  if d.dataset not in config_lib.BENCHMARKS or d.val_fraction:
    return {}
  from msjax.data.benchmarks import PUBLISHED_COUNTS
  return PUBLISHED_COUNTS.get(d.dataset, {})


__all__ = ["check_dataset", "check_images", "DataError"]
