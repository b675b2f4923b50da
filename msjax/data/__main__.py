"""Dataset tools.

  python -m msjax.data check --config configs/cub.py --config.data.root=/data/CUB_200_2011
      [--decode] [--threads 8]
  python -m msjax.data prepare_tfds --dataset inshop --data_dir gs://bucket/tfds
      [--manual_dir /data/inshop]

``check`` prints a JSON report (per split: images, classes, images per class, missing and
unreadable images) and exits 0 when the dataset is ready to train on, 1 with the
problems named otherwise. ``prepare_tfds`` builds a benchmark as an array_record TFDS
dataset, so all four can live in one ``data_dir`` (``--config.data.format=tfds``).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).")
_DECODE = flags.DEFINE_bool("decode", False, "check: decode every image fully (slower; "
                            "finds truncated files that a header read misses).")
_THREADS = flags.DEFINE_integer("threads", 8, "check: images read concurrently.")
_DATASET = flags.DEFINE_enum("dataset", None, ["cub", "cars", "sop", "inshop"],
                             "prepare_tfds: the benchmark to build.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "prepare_tfds: the TFDS data_dir.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "prepare_tfds: the downloaded files "
                                  "(needed for cars and inshop).")

COMMANDS = ("check", "prepare_tfds")


def _fail(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 1


def _check() -> int:
  from msjax.data.check import check_dataset
  from msjax.data.records import DataError
  if _CONFIG.value is None:
    return _fail("check needs --config (e.g. --config configs/cub.py "
                 "--config.data.root=/data/CUB_200_2011).")
  try:
    report = check_dataset(_CONFIG.value.data, full_decode=_DECODE.value,
                           threads=_THREADS.value)
  except DataError as e:
    return _fail(str(e))
  print(json.dumps(report, indent=2))
  for problem in report["problems"]:
    print(f"problem: {problem}", file=sys.stderr)
  return 0 if report["ok"] else 1


def _prepare_tfds() -> int:
  from msjax.data.records import DataError
  from msjax.data.tfds_source import prepare_tfds
  if not _DATASET.value or not _DATA_DIR.value:
    return _fail("prepare_tfds needs --dataset and --data_dir.")
  try:
    prepare_tfds(_DATASET.value, _DATA_DIR.value, manual_dir=_MANUAL_DIR.value)
  except DataError as e:
    return _fail(str(e))
  return 0


def main(argv):
  command = argv[1] if len(argv) > 1 else None
  if command not in COMMANDS or len(argv) > 2:
    return _fail(f"usage: python -m msjax.data {{{'|'.join(COMMANDS)}}} [flags]; got "
                 f"{' '.join(argv[1:]) or 'no command'}.")
  return _check() if command == "check" else _prepare_tfds()


if __name__ == "__main__":
  app.run(main)
