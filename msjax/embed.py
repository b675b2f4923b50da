"""Embeds a split of a run's dataset, or every image under a folder, with a trained model.

  python -m msjax.embed --workdir runs/cub --split test --out runs/cub/test.npz
  python -m msjax.embed --workdir runs/cub --images ~/photos --out photos.npz
      [--step N | --best] [--batch-size B] [--data-root PATH] [--overwrite]

The workdir's checkpoint (the latest; ``--step N``, or ``--best`` by
``config.eval.best_metric``) is restored as ``python -m msjax.main --mode eval`` restores
it (``analysis.load_run``). Images go through the run's evaluation transform (short side
resized to ``config.data.resize_to``, center crop ``config.data.image_size``) and its
eval-mode model (``train.make_embed_fn``), in global batches sharded over every device,
as the in-process evaluation embeds them: ``--split test`` gives that evaluation's
embeddings bit for bit. A progress line with an ETA goes to stderr.

**Sources.** ``--split``: ``train``, ``test`` (the evaluation queries), ``val`` (runs
trained with ``config.data.val_fraction``), In-Shop's ``query`` and ``gallery``; labels
are the split's. ``--images DIR``: every image file under the local folder DIR at any
depth (``.jpg .jpeg .png .bmp .gif .webp .tif .tiff``, any case; hidden files and
folders are not images), sorted by path components (``msjax.data.folder.find_images``);
labels unknown. The run's dataset is not needed for ``--images``.

**Unreadable images.** A file that cannot be read, is not an image PIL decodes (a
truncated JPEG, a text file named ``.png``), or is smaller than the crop of a config
without resizing, is skipped, never dropped silently: it is printed to stderr with its
reason, stored under ``skipped``, and counted on the command's last line.

**Output.** One ``.npz`` (``np.load(path)`` reads it without pickle), written whole or
not at all (a temporary file renamed into place); an existing file is kept unless
``--overwrite``. ``N`` images were embedded, ``S`` skipped:

  embeddings       float32 [N, D]  L2-normalised rows, in the order of ``paths``
  labels           int32 [N]       the split's labels; -1 with --images (unknown)
  paths            str [N]         relative to ``root``; for images that are not files
                                   (the synthetic set, TFDS) the source's description
  skipped          str [S]         the images that could not be embedded, in order
  skipped_reasons  str [S]         why, one per skipped image
  split            str             the split embedded, or "" with --images
  images_dir       str             the --images folder (absolute), or ""
  root             str             the folder ``paths`` are relative to, or ""
  workdir, step    str, int        the run and the checkpoint step restored
  config           str             the run's config.json (JSON)
  backbone, embedding_dim          str, int
  batch_size, num_devices          int, int: how the batches were split
  format           str             "msjax.embed/1"

Metadata entries are 0-d arrays (``z["step"].item()``, ``str(z["config"])``); ``load``
reads a file back as a dict of arrays and Python values.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import sys
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from etils import epath

if TYPE_CHECKING:
  from msjax.analysis import Run
  from msjax.data.records import Dataset, Split

FORMAT = "msjax.embed/1"
# Seconds between progress lines (the first and the last batch always print one).
PROGRESS_SECONDS = 10.0


class EmbedError(ValueError):
  """Bad input to ``msjax.embed``; the message says what is wrong and how to fix it."""


@dataclasses.dataclass
class Embeddings:
  """What embedding a split gives.

  Attributes:
    embeddings: ``float32 [N, D]``, the embedded images' L2-normalised embeddings.
    labels: ``int32 [N]``; -1 where unknown (``--images``).
    paths: ``N`` image names: paths relative to ``root``, or the source's descriptions.
    skipped: ``(name, reason)`` of each image that could not be embedded, in order.
    root: the folder ``paths`` are relative to ("" when the images are not files).
  """

  embeddings: np.ndarray
  labels: np.ndarray
  paths: list[str]
  skipped: list[tuple[str, str]]
  root: str


# ---------------------------------------------------------------------------- inputs


def image_folder(directory) -> Split:
  """Every image file under ``directory`` as a ``Split`` named ``"images"``.

  Labels are unknown: the split holds one placeholder class (label 0) because a
  ``Split`` needs one; ``embed_split(..., known_labels=False)`` reports -1.
  """
  from msjax.data import folder, records
  root = os.path.abspath(os.path.expanduser(os.fspath(directory)))
  if not os.path.isdir(root):
    raise EmbedError(f"--images {directory}: no such folder. Pass a local folder of "
                     "image files (searched at any depth).")
  paths = folder.find_images(root)
  if not paths:
    raise EmbedError(f"--images {directory} holds no image files "
                     f"({' '.join(folder.IMAGE_EXTENSIONS)}, any case, at any depth; "
                     "hidden files do not count). Point it at a folder of images.")
  return records.Split("images", records.ImageFiles(root, paths),
                       np.zeros(len(paths), np.int32), ("unknown",))


def dataset_split(dataset: Dataset | Run, name: str) -> Split:
  """The split ``name`` of a ``msjax.data.Dataset`` (or of a restored run's: an
  ``analysis.Run`` is taken for its ``dataset``); an ``EmbedError`` lists the others."""
  dataset = getattr(dataset, "dataset", dataset)
  if dataset is None:
    raise EmbedError("this run was restored without its dataset (load_run(..., "
                     "load_data=False)), so it has no splits to embed.")
  splits = dataset.splits()
  if name in splits:
    return splits[name]
  hint = ""
  if name == "val":
    hint = (" A 'val' split exists only in runs trained with config.data.val_fraction "
            "> 0.")
  elif name == "test" and "query" in splits:
    hint = " In-Shop's test images are 'query' (the queries) and 'gallery'."
  elif name in ("query", "gallery"):
    hint = " Only In-Shop has 'query' and 'gallery'; the test images here are 'test'."
  raise EmbedError(f"the {dataset.name} dataset of this run has no split {name!r}; "
                   f"it has {', '.join(splits)}.{hint}")


def checkpoint_step(workdir, config, *, step: int | None = None, best: bool = False) -> int:
  """The saved step to restore: ``step``, the best by ``config.eval.best_metric``, or
  the latest (``checkpoint.select_step``, whose ``CheckpointError`` names what is wrong)."""
  from msjax import checkpoint
  return checkpoint.select_step(
      workdir, best_metric=f"{config.eval.split}/{config.eval.best_metric}", step=step,
      best=best)[0]


def check_batch_size(batch_size: int, num_devices: int, num_processes: int = 1) -> int:
  """``batch_size`` if a global batch of it splits evenly over the devices and processes."""
  batch_size = int(batch_size)
  if batch_size < 1:
    raise EmbedError(f"--batch-size {batch_size} must be positive.")
  whole = int(np.lcm(num_devices, num_processes))
  if batch_size % whole:
    up = -(-batch_size // whole) * whole
    over = f"{num_devices} devices" + (f" of {num_processes} processes"
                                       if num_processes > 1 else "")
    raise EmbedError(f"a batch of {batch_size} images does not split evenly over {over}; "
                     f"pass --batch-size {up} (a multiple of {whole}).")
  return batch_size


# ---------------------------------------------------------------------------- embedding


def _image_names(split) -> tuple[list[str], str]:
  """``(names, root)``: file paths relative to ``root``, or descriptions and ""."""
  from msjax.data import records
  if isinstance(split.images, records.ImageFiles):
    return [str(p) for p in split.images.paths], str(split.images.root)
  return [split.images.describe(i) for i in range(len(split))], ""


def embed_split(run: Run, split: Split, *, batch_size: int | None = None,
                known_labels: bool = True, progress: bool = True, log=None) -> Embeddings:
  """Embeds every image of ``split`` with ``run`` (``analysis.load_run``), in order.

  The batches are the in-process evaluation's (``data.eval_dataset`` with the run's
  eval transform, ``config.data.eval_batch_size`` unless ``batch_size``), placed on the
  mesh with ``data.to_global``, through ``train.make_embed_fn`` and
  ``evaluate.embed``; with the same batch size the embeddings are the evaluation's.
  Images that cannot be loaded are skipped, and listed with their reasons in
  ``skipped`` and on ``log`` (default: stderr on process 0).

  Args:
    run: a restored run (``analysis.load_run``).
    split: a ``msjax.data.Split`` (``dataset_split`` or ``image_folder``).
    batch_size: images per global batch, a multiple of the device count.
    known_labels: False reports every label as -1 (``image_folder``'s placeholder).
    progress: print the progress line (on process 0).
    log: where skipped images are listed; None: stderr on process 0, nowhere on others.
  """
  import jax

  from msjax import data as data_lib
  from msjax import evaluate as evaluate_lib
  from msjax import knn, metric_writers, train
  from msjax.data import pipeline

  d = run.config.data
  batch_size = check_batch_size(batch_size or d.eval_batch_size, jax.device_count(),
                                jax.process_count())
  n = len(split)
  if n == 0:
    raise EmbedError(f"split {split.name!r} holds no images; there is nothing to embed.")
  if log is None and jax.process_index() == 0:
    log = sys.stderr
  names, root = _image_names(split)
  transform = data_lib.image_transform(d, train=False)
  batches = pipeline.eval_dataset(
      split, transform, batch_size=batch_size, num_workers=d.num_workers,
      num_threads=d.num_threads, prefetch=d.prefetch, skip_unreadable=True)
  embed_fn = train.make_embed_fn(run.model, run.mesh)
  bar = metric_writers.Progress(-(-n // batch_size), batch_size=batch_size,
                                every_seconds=PROGRESS_SECONDS,
                                enabled=None if progress else False)
  kept: list[int] = []
  skipped: list[tuple[str, str]] = []

  def placed_batches():
    """The global batches; after each is embedded, records what it held."""
    for b, batch in enumerate(batches):
      placed = data_lib.to_global(batch, run.mesh)
      yield placed  # evaluate.embed embeds it (and fetches the result) before resuming
      start = b * batch_size
      mask = knn.fetch(placed["mask"])[:n - start]  # the real images, padding cut off
      kept.extend((start + np.flatnonzero(mask)).tolist())
      for i in (start + np.flatnonzero(~mask)).tolist():
        # Rare, so the reason is found again here rather than carried in every batch,
        # and every process knows it, whichever process's slice held the image.
        reason = (pipeline.unreadable_reason(split, transform, i)
                  or "could not be loaded while embedding, but loads now (a transient "
                     "read error?)")
        skipped.append((names[i], reason))
        if log is not None:
          print(f"skipped {names[i]}: {reason}", file=log, flush=True)
      bar.update(b + 1, images=f"{min(start + batch_size, n):,}/{n:,}")

  emb, labels = evaluate_lib.embed(lambda images: embed_fn(run.state, images),
                                   placed_batches())
  labels = labels.astype(np.int32) if known_labels else np.full(len(emb), -1, np.int32)
  return Embeddings(np.asarray(emb, np.float32), labels, [names[i] for i in kept],
                    skipped, root)


# ---------------------------------------------------------------------------- the file


def _check_out(path: epath.Path, overwrite: bool) -> None:
  if path.is_dir():
    raise EmbedError(f"--out {path} is a folder; name the .npz file to write.")
  if path.exists() and not overwrite:
    raise EmbedError(f"--out {path} exists; pass --overwrite to replace it, or choose "
                     "another --out.")


def _strings(values) -> np.ndarray:
  # A unicode array (never object), so np.load reads it without allow_pickle.
  return np.asarray(list(values), dtype=str)


def save(path, result: Embeddings, metadata: Mapping[str, Any], *,
         overwrite: bool = False) -> str:
  """Writes ``result`` and ``metadata`` (str or number values) as the NPZ of the module
  docstring; the file appears whole (a temporary file renamed into place) or not at all.

  Refuses to replace an existing file unless ``overwrite``. Local or ``gs://``.
  """
  arrays = {"embeddings": np.asarray(result.embeddings, np.float32),
            "labels": np.asarray(result.labels, np.int32),
            "paths": _strings(result.paths),
            "skipped": _strings(p for p, _ in result.skipped),
            "skipped_reasons": _strings(r for _, r in result.skipped),
            "root": np.asarray(str(result.root))}
  for key, value in metadata.items():
    value = np.asarray(value)
    if key in arrays or value.dtype == object:
      raise ValueError(f"metadata {key!r} clashes with an array or is not a str/number.")
    arrays[key] = value
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)  # in memory first: a failure here leaves no file behind
  path = epath.Path(path)
  _check_out(path, overwrite)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  try:
    tmp.write_bytes(buffer.getvalue())
    _check_out(path, overwrite)  # written by someone else while this one embedded?
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return os.fspath(path)


def load(path) -> dict[str, Any]:
  """An embeddings file as a dict: the arrays as NumPy arrays, the 0-d metadata entries
  as Python str and int."""
  data = epath.Path(path).read_bytes()
  with np.load(io.BytesIO(data), allow_pickle=False) as z:
    return {k: (z[k].item() if z[k].ndim == 0 else z[k]) for k in z.files}


# ---------------------------------------------------------------------------- the command


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m msjax.embed",
      description="Embed a split of a run's dataset, or every image under a folder, with "
                  "the run's trained model; write the embeddings to an .npz file.")
  p.add_argument("--workdir", required=True, help="the training run's workdir")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--split", help="a split of the run's dataset: train, test, val "
                      "(runs with data.val_fraction), or In-Shop's query and gallery")
  source.add_argument("--images", metavar="DIR",
                      help="every image file under DIR, at any depth")
  p.add_argument("--out", required=True, metavar="FILE.npz", help="the file to write")
  which = p.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, help="the checkpoint step (default: the latest)")
  which.add_argument("--best", action="store_true",
                     help="the checkpoint best by the run's config.eval.best_metric")
  p.add_argument("--batch-size", type=int,
                 help="images per global batch, a multiple of the device count "
                      "(default: the run's config.data.eval_batch_size)")
  p.add_argument("--data-root", help="--split: where the run's dataset is on this machine")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  return p


def _check_inputs(args) -> None:
  """The checks that need no JAX, so that a mistake is reported at once."""
  _check_out(epath.Path(args.out), args.overwrite)
  workdir = epath.Path(args.workdir)
  if not workdir.is_dir():
    raise EmbedError(f"--workdir {args.workdir} does not exist; pass the workdir of a "
                     "training run (python -m msjax.main --workdir ...).")
  if not (workdir / "config.json").exists():
    raise EmbedError(f"--workdir {args.workdir} is not an msjax training workdir: it has "
                     "no config.json (python -m msjax.main writes it when a run starts).")
  if args.batch_size is not None and args.batch_size < 1:
    raise EmbedError(f"--batch-size {args.batch_size} must be positive.")
  if args.images is not None and args.data_root is not None:
    raise EmbedError("--data-root says where the run's dataset is, for --split; "
                     "--images reads no dataset. Drop --data-root.")


def _run(args) -> int:
  _check_inputs(args)
  images = image_folder(args.images) if args.images is not None else None

  import jax
  from absl import logging as absl_logging

  from msjax import analysis, sharding
  # Orbax logs every restore (and that a read-only directory is read-only) to absl.
  absl_logging.set_verbosity(absl_logging.ERROR)
  sharding.initialize()
  config = analysis.load_config(args.workdir)
  if images is None:
    # The split is found before the model is built, so a wrong name fails at once.
    from msjax import data as data_lib
    if args.data_root is not None:
      config.data.root = args.data_root
    split = dataset_split(data_lib.load_dataset(config.data), args.split)
  else:
    split = images
  step = checkpoint_step(args.workdir, config, step=args.step, best=args.best)
  # The model alone: the dataset (loaded above, when needed) is not read twice.
  run = analysis.load_run(args.workdir, step=step, data_root=args.data_root,
                          load_data=False)
  batch_size = check_batch_size(args.batch_size or run.config.data.eval_batch_size,
                                jax.device_count(), jax.process_count())
  source = f"the files under {split.images.root}" if images is not None else (
      f"split {args.split!r}")
  m = run.config.model
  if jax.process_index() == 0:
    print(f"{args.workdir} step {run.step} ({m.backbone}, {m.embedding_dim}-d): embedding "
          f"{len(split):,} images of {source} on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), {batch_size} a batch", file=sys.stderr)
  result = embed_split(run, split, batch_size=batch_size, known_labels=images is None)
  if not result.paths:
    raise EmbedError(f"none of the {len(split):,} images could be embedded (each is "
                     f"listed above with its reason); {args.out} was not written.")
  if jax.process_index() == 0:
    out = save(args.out, result, _metadata(args, run, batch_size, jax.device_count()),
               overwrite=args.overwrite)
    print(f"embedded {len(result.paths):,} images, skipped {len(result.skipped):,}"
          f"{' (listed above)' if result.skipped else ''}; wrote {out}")
  return 0


def _metadata(args, run: Run, batch_size: int, num_devices: int) -> dict[str, Any]:
  """The file's single values: which run, checkpoint, model and source, and how."""
  workdir = args.workdir if "://" in args.workdir else os.path.abspath(args.workdir)
  images_dir = "" if args.images is None else os.path.abspath(
      os.path.expanduser(args.images))
  return dict(format=FORMAT, workdir=workdir, step=run.step,
              config=(epath.Path(args.workdir) / "config.json").read_text(),
              backbone=run.config.model.backbone,
              embedding_dim=int(run.config.model.embedding_dim), split=args.split or "",
              images_dir=images_dir, batch_size=batch_size, num_devices=num_devices)


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  try:
    return _run(args)
  except EmbedError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # noqa: BLE001 - a user's mistake as one line, not a traceback
    if not is_input_error(e):
      raise
    print(f"error: {e}", file=sys.stderr)
    return 1


def is_input_error(e: Exception) -> bool:
  """Whether ``e`` reports bad input (a dataset, config or checkpoint problem) whose
  message says what to fix, rather than a bug that needs its traceback."""
  from msjax.checkpoint import CheckpointError
  from msjax.data.records import DataError
  from msjax.train import ConfigError
  return isinstance(e, (DataError, ConfigError, CheckpointError, FileNotFoundError))


if __name__ == "__main__":
  sys.exit(main())
