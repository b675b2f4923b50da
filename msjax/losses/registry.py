"""Name -> (loss, weights) registry of the GPW pair-loss family."""

from __future__ import annotations

from typing import Callable, NamedTuple

from msjax.losses.binomial import binomial_loss, binomial_weights
from msjax.losses.contrastive import contrastive_loss, contrastive_weights
from msjax.losses.lifted import lifted_loss, lifted_weights
from msjax.losses.ms import ms_loss, ms_weights
from msjax.losses.triplet import triplet_loss, triplet_weights


class PairLoss(NamedTuple):
  """A pair loss ``loss(sim, labels, **kw) -> scalar`` and its analytic ``∂loss/∂sim``."""

  loss: Callable
  weights: Callable


_REGISTRY = {
    "ms": PairLoss(ms_loss, ms_weights),
    "contrastive": PairLoss(contrastive_loss, contrastive_weights),
    "triplet": PairLoss(triplet_loss, triplet_weights),
    "lifted": PairLoss(lifted_loss, lifted_weights),
    "binomial": PairLoss(binomial_loss, binomial_weights),
}

NAMES = tuple(_REGISTRY)


def get(name: str) -> PairLoss:
  """Returns ``PairLoss(loss, weights)`` for ``name`` in ``NAMES``."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"Unknown loss {name!r}; choose one of {NAMES}.") from None
