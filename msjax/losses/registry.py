"""Name -> (loss, weights) registry of the GPW loss family: pair losses and proxy losses."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

from msjax.losses import proxy
from msjax.losses.binomial import binomial_loss, binomial_weights
from msjax.losses.circle import (circle_loss, circle_value_and_symmetric_weights,
                                 circle_value_and_weights, circle_weights)
from msjax.losses.contrastive import contrastive_loss, contrastive_weights
from msjax.losses.lifted import lifted_loss, lifted_weights
from msjax.losses.ms import (ms_loss, ms_value_and_symmetric_weights,
                             ms_value_and_weights, ms_weights)
from msjax.losses.supcon import (supcon_loss, supcon_value_and_symmetric_weights,
                                 supcon_value_and_weights, supcon_weights)
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

  A proxy loss (``proxy_init`` set: the initialiser ``(key, num_proxies, dim) -> [C, D]``
  of its learned class proxies) takes the ``[B, C]`` sample-to-proxy block instead of the
  batch's pairs; it is not ``rectangular`` in the sense above.
  """

  loss: Callable
  weights: Callable
  rectangular: bool = True
  value_and_weights: Callable | None = None
  value_and_symmetric_weights: Callable | None = None
  proxy_init: Callable | None = None

  def __iter__(self):
    return iter((self.loss, self.weights))


_REGISTRY = {
    "ms": PairLoss(ms_loss, ms_weights, value_and_weights=ms_value_and_weights,
                   value_and_symmetric_weights=ms_value_and_symmetric_weights),
    "contrastive": PairLoss(contrastive_loss, contrastive_weights),
    "triplet": PairLoss(triplet_loss, triplet_weights),
    "lifted": PairLoss(lifted_loss, lifted_weights),
    "binomial": PairLoss(binomial_loss, binomial_weights),
    "circle": PairLoss(circle_loss, circle_weights, value_and_weights=circle_value_and_weights,
                       value_and_symmetric_weights=circle_value_and_symmetric_weights),
    "supcon": PairLoss(supcon_loss, supcon_weights, value_and_weights=supcon_value_and_weights,
                       value_and_symmetric_weights=supcon_value_and_symmetric_weights),
}
_PROXY_REGISTRY = {
    "proxy_anchor": PairLoss(proxy.proxy_anchor_loss, proxy.proxy_anchor_weights,
                             rectangular=False,
                             value_and_weights=proxy.proxy_anchor_value_and_weights,
                             proxy_init=proxy.kaiming_fan_out_proxies),
    "proxy_nca": PairLoss(proxy.proxy_nca_loss, proxy.proxy_nca_weights, rectangular=False,
                          value_and_weights=proxy.proxy_nca_value_and_weights,
                          proxy_init=proxy.scaled_normal_proxies),
}

NAMES = tuple(_REGISTRY)  # pair losses: functions of the batch's (or a memory's) pairs
PROXY_NAMES = tuple(_PROXY_REGISTRY)  # functions of sample-to-proxy similarities
ALL_NAMES = NAMES + PROXY_NAMES
_REGISTRY.update(_PROXY_REGISTRY)


def get(name: str) -> PairLoss:
  """Returns the ``PairLoss`` of ``name`` in ``ALL_NAMES``."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f"Unknown loss {name!r}; choose one of {ALL_NAMES}.") from None


def is_proxy(name: str) -> bool:
  """Whether ``name`` is a proxy loss (it trains class proxies with the model)."""
  return get(name).proxy_init is not None


# Keywords of a loss function that are data, not hyper-parameters.
LOSS_INPUTS = ("ref_labels", "anchor_index", "ref_valid", "batch_size", "axis_name",
               "self_threshold")


def hparam_defaults(name: str) -> dict:
  """``{keyword: default}`` of loss ``name``'s hyper-parameters, from its signature."""
  params = inspect.signature(get(name).loss).parameters.values()
  return {p.name: p.default for p in params
          if p.kind is p.KEYWORD_ONLY and p.name not in LOSS_INPUTS}
