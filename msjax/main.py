"""Entry point: ``python -m msjax.main --config configs/<dataset>.py [--workdir DIR]``.

  --mode train   train (resuming from the workdir's latest checkpoint) and evaluate
  --mode eval    evaluate the workdir's latest checkpoint

Any config field can be set on the command line: ``--config.data.root=/data/CUB_200_2011``.
On a multi-host slice the same command runs on every host; Cloud TPU VMs (and SLURM,
Open MPI) are detected, elsewhere pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or set ``MSJAX_COORDINATOR_ADDRESS``, ``MSJAX_NUM_PROCESSES`` and
``MSJAX_PROCESS_ID``). ``launch/`` starts it on TPU VMs and GPU hosts.
"""

from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and final metrics "
                               "(local or gs://); default runs/<config>-<time>.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "Train or evaluate.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 "
                                   "(multi-process runs outside Cloud TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path))[0]
  return os.path.join("runs", f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config configs/synthetic.py")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  import jax

  from msjax import sharding, train
  from msjax.data.records import DataError
  from msjax.models.pretrained import WeightsError
  sharding.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if jax.process_count() > 1 and not _WORKDIR.value:
    # Each host would pick its own timestamped default.
    raise app.UsageError(f"{jax.process_count()} processes need one --workdir they all "
                         "reach: a gs:// path on a multi-host slice.")
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].config_filename)
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(_CONFIG.value, workdir)
    else:
      train.evaluate_workdir(_CONFIG.value, workdir)
  except (DataError, train.ConfigError, WeightsError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
