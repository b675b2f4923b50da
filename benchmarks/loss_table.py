#!/usr/bin/env python
"""Every registry loss on the embedded default, at the same budget: held-out Recall@1.

The project's own small version of the "Metric Learning Reality Check" comparison
(Musgrave et al., ECCV 2020): one data set, one network, one optimiser and one budget,
and only the loss changes. The embedded default is ``configs/synthetic.py`` (128 generated
training classes × 32 images, 64 held-out classes, ``small_cnn``, 64-d, P×K = 16×4, Adam
at 1e-3 constant, 400 steps); each loss keeps its own registry defaults (``config.loss.<name>``;
MS the config's α=2, β=50, λ=0.5, ε=0.1), and a proxy loss trains its proxies at ×100 the
learning rate (the config's ``optim.proxy_lr_mult``, the Proxy-Anchor recipe's). No loss
is tuned here: the table says how each behaves out of the box on this problem, not how
good it can be made. Every run is ``msjax.train.train_and_evaluate`` (see
``learning.py``); Recall@1 is on the held-out test classes (queries searching each other),
mean ± sample std over seeds (``config.seed``: the initialisation and the batches).

Usage::

    python benchmarks/loss_table.py                      # every loss × seeds 0,1,2
    python benchmarks/loss_table.py --losses ms,circle --seeds 0 --no-write
"""

from __future__ import annotations

import sys

import learning  # benchmarks/learning.py, beside this script

sys.path.insert(0, learning.REPO)
from msjax import losses  # noqa: E402


def loss_config(name, seed, steps):
  c = learning.synthetic_config(seed, steps)
  c.loss.name = name
  return c


def describe(name):
  from msjax import train
  kwargs = train.loss_kwargs(loss_config(name, 0, 1).loss)
  return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                   for k, v in sorted(kwargs.items()))


def main(argv=None):
  learning.main(argv, script="loss_table.py", doc=__doc__, flag="losses",
                choices=losses.ALL_NAMES, defaults=losses.ALL_NAMES, out="loss_table",
                make_config=loss_config, describe=describe, first_column="loss")


if __name__ == "__main__":
  main()
