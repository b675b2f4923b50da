"""Name -> (loss, weights) registry of the GPW pair-loss family."""

from __future__ import annotations

import dataclasses
from typing import Callable

from msjax.losses.binomial import binomial_loss, binomial_weights
from msjax.losses.contrastive import contrastive_loss, contrastive_weights
from msjax.losses.lifted import lifted_loss, lifted_weights
from msjax.losses.ms import (ms_loss, ms_value_and_symmetric_weights,
                             ms_value_and_weights, ms_weights)
from msjax.losses.triplet import triplet_loss, triplet_weights


@dataclasses.dataclass(frozen=True)
class PairLoss:
  """A pair loss ``loss(sim, labels, **kw) -> scalar`` and its analytic ``∂loss/∂sim``.

  ``rectangular`` says the loss takes any reference columns (``ref_labels``,
  ``anchor_index``, ``ref_valid``), which row blocks, the sharded global batch and the
  cross-batch memory need. The optional fused forms compute what the backward pass needs
  in one pass where that pays: ``value_and_weights(sim, labels, **kw) -> (L, ∂L/∂S)``,
  and for a square, symmetric S ``value_and_symmetric_weights(sim, labels, **kw) ->
  (L, W + Wᵀ)``; ``pair_loss_from_embeddings`` uses them when present. It unpacks as
  ``loss, weights = get(name)``.
  """

  loss: Callable
  weights: Callable
  rectangular: bool = True
  value_and_weights: Callable | None = None
  value_and_symmetric_weights: Callable | None = None

  def __iter__(self):
    return iter((self.loss, self.weights))


_REGISTRY = {
    "ms": PairLoss(ms_loss, ms_weights, value_and_weights=ms_value_and_weights,
                   value_and_symmetric_weights=ms_value_and_symmetric_weights),
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
