#!/usr/bin/env python
"""Does a cross-batch memory make a small batch learn like a large one? (XBM, CVPR 2020)

The XBM paper's headline effect, on the embedded default (``configs/synthetic.py``:
128 generated training classes × 32 images, 64 held-out classes, ``small_cnn``, 64-d,
MS loss α=2, β=50, λ=0.5, ε=0.1, Adam lr 1e-3 constant, no weight decay). Every arm
trains with ``msjax.train.train_and_evaluate`` for the same number of steps and reports
Recall@1 on the held-out test classes (queries searching each other), for a few seeds
(``config.seed``: the initialisation and the P×K batch sampling; the images are fixed):

* ``small``             P×K = 8×4 = 32, no memory;
* ``small+xbm1024``     the same batch + XBM: 1,024 float32 entries (1/4 of the 4,096
                        training images, 32 batches), weight 1.0, joining after 100 steps;
* ``small+xbm256``      the same with 256 entries (8 batches: fresher, fewer pairs);
* ``small+xbm1024-w0.5`` the 1,024-entry memory at weight 0.5;
* ``large``             P×K = 32×4 = 128, no memory (4× the images per step).

The memory sizes, the weight, the start step (100 = a quarter of the run) and the two
batch shapes are this benchmark's choices; everything else is the config file's. Left
as in the config: 400 steps, flips only. Changed for speed only: no untrained
evaluation, no GPW telemetry, no intermediate evaluation or checkpoints
(``checkpoint_every=0``; the final one is written, into a temporary workdir).

What is reported per arm: Recall@1 mean ± std (the sample std over the seeds,
``ddof=1``), the per-seed values, and the wall time (sum
over seeds, each run's time includes its compile and final evaluation); per run, the
logged ``train/loss`` (``train/batch_loss`` and ``train/memory_loss`` with a memory)
every 50 steps. The raw-pixel baseline (cosine on mean-centred pixels,
``synthetic.raw_pixel_recall``) is the floor. The load average is recorded: the machine
is shared, and the times include whatever else ran.

Usage::

    python benchmarks/xbm_learning.py                  # all arms × seeds 0,1,2; writes
                                                       # benchmarks/results/xbm_learning.json
    python benchmarks/xbm_learning.py --arms small,small+xbm1024 --seeds 0 --no-write
    # the small batch at the large batch's images seen (results/xbm_learning_1600.*):
    python benchmarks/xbm_learning.py --steps 1600 --seeds 0,1,2 \
        --arms small,small+xbm1024,small+xbm1024-w0.5 --out xbm_learning_1600
    python benchmarks/xbm_learning.py --steps 100 --seeds 0 --no-write   # a smoke run
"""

from __future__ import annotations

import learning  # benchmarks/learning.py, beside this script

K = 4  # images per class in every batch, as in configs/synthetic.py

# name → (classes per batch, XBM settings or None)
ARMS = {
    "small": (8, None),
    "small+xbm1024": (8, dict(size=1024, weight=1.0, start_step=100)),
    "small+xbm256": (8, dict(size=256, weight=1.0, start_step=100)),
    "small+xbm1024-w0.5": (8, dict(size=1024, weight=0.5, start_step=100)),
    "large": (32, None),
}
DEFAULT_ARMS = ("small", "small+xbm1024", "small+xbm256", "large")


def arm_config(name, seed, steps):
  c = learning.synthetic_config(seed, steps)
  classes, xbm = ARMS[name]
  c.data.classes_per_batch = classes
  c.data.images_per_class = K
  if xbm is not None:
    c.xbm.update(enabled=True, dtype="float32", block_size=0, **xbm)
  return c


def describe(name):
  classes, xbm = ARMS[name]
  text = f"{classes}×{K} = {classes * K}"
  if xbm:
    text += (f" + XBM {xbm['size']:,} entries, weight {xbm['weight']:g}, from step "
             f"{xbm['start_step'] + 1}")
  return text


def main(argv=None):
  learning.main(argv, script="xbm_learning.py", doc=__doc__, flag="arms", choices=ARMS,
                defaults=DEFAULT_ARMS, out="xbm_learning", make_config=arm_config,
                describe=describe)


if __name__ == "__main__":
  main()
