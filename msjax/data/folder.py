"""A dataset from a class-per-directory tree of image files, split by class.

Any directory that directly holds image files is a class, at any depth: ``dogs/*.jpg``
or ``alphabet/character/*.png`` (Omniglot-style) alike. The classes, in order of their
relative paths, are cut into a training part and a test part, so the two share no
class, as in the retrieval protocol of the benchmarks.
"""

from __future__ import annotations

import os

import numpy as np

from msjax.data import records
from msjax.data.records import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def find_classes(root: str) -> list[tuple[str, list[str]]]:
  """``(class path, image file names)`` for every directory under ``root`` holding images.

  Class paths are relative to ``root`` with ``/`` separators (``"."`` for ``root``
  itself), in order of their path components; file names are sorted. Hidden files and
  directories (a leading ``.``) are skipped; symlinked directories are followed once.
  """
  found = []
  seen = set()
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    real = os.path.realpath(dirpath)
    if real in seen:  # A symlink back up the tree would otherwise loop forever.
      dirnames[:] = []
      continue
    seen.add(real)
    dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    images = sorted(f for f in filenames if _is_image(f))
    if images:
      rel = os.path.relpath(dirpath, root)
      found.append((rel.replace(os.sep, "/"), images))
  # Sorting by components keeps a directory's subtree together ("a/b" before "a-b").
  found.sort(key=lambda entry: entry[0].split("/"))
  return found


def find_images(root: str) -> list[str]:
  """Every image file under ``root``, at any depth, as paths relative to ``root``.

  The files ``find_classes`` finds (extensions ``IMAGE_EXTENSIONS`` in any case; hidden
  files and folders skipped), with ``/`` separators, sorted by path components: a
  folder's files and subfolders by name, each subfolder's whole tree at its place
  (``a/b/c.png``, ``a/d.png``, ``a-b.png``).
  """
  paths = [f"{rel}/{f}" if rel != "." else f for rel, files in find_classes(root)
           for f in files]
  return sorted(paths, key=lambda p: p.split("/"))


def load_folder(root, train_fraction: float = 0.5) -> records.Dataset:
  """The classes under ``root``: the first ``round(C * train_fraction)`` train, the rest test.

  ``C`` counts the directories that directly hold image files (extensions
  ``IMAGE_EXTENSIONS``, any case). Classes are ordered by relative path, images by file
  name; ``class_names`` are the relative directory paths. ``round`` is Python's
  (halves to even).
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  if not os.path.isdir(root):
    raise DataError(f"folder dataset root {root} does not exist or is not a directory. "
                    "Pass a directory whose class folders hold the images, e.g. "
                    "<root>/<class>/*.jpg or <root>/<group>/<class>/*.png.")
  if not 0.0 <= train_fraction <= 1.0:
    raise DataError(f"train_fraction must lie in [0, 1]; got {train_fraction}.")
  classes = find_classes(root)
  if not classes:
    raise DataError(f"no class directories found under {root}: no directory holds image "
                    f"files ({', '.join(IMAGE_EXTENSIONS)}). Put each class's images in "
                    "its own folder, e.g. <root>/<class>/*.jpg.")
  c = len(classes)
  n_train = int(round(c * train_fraction))
  if n_train == 0 or n_train == c:
    raise DataError(f"train_fraction={train_fraction} of the {c} class directories "
                    f"under {root} leaves {n_train} for train and {c - n_train} for test; "
                    "both need at least one. Change train_fraction or add classes.")
  splits = []
  for name, part in (("train", classes[:n_train]), ("test", classes[n_train:])):
    paths = [f"{rel}/{f}" if rel != "." else f for rel, files in part for f in files]
    labels = np.repeat(np.arange(len(part)), [len(files) for _, files in part])
    splits.append(records.Split(name, records.ImageFiles(root, paths), labels,
                                tuple(rel for rel, _ in part)))
  return records.Dataset("folder", *splits)
