"""The GPW loss family as pure functions of a similarity block.

Each loss ``<name>_loss(sim, labels, *, ref_labels=None, anchor_index=None, ...)`` has an
analytic twin ``<name>_weights`` returning ``∂L/∂S`` from its closed-form pair weights;
``get(name)`` returns the pair. ``pair_loss_from_embeddings`` evaluates any pair loss from
embeddings with the analytic weights as the backward pass, optionally in row blocks.
The proxy losses (``PROXY_NAMES``) take the block of sample-to-proxy similarities;
``proxy_loss_from_embeddings`` evaluates them from embeddings and learned proxies.
"""

from msjax.losses.binomial import binomial_loss, binomial_weights
from msjax.losses.circle import circle_loss, circle_value_and_weights, circle_weights
from msjax.losses.contrastive import contrastive_loss, contrastive_weights
from msjax.losses.embeddings import (ms_loss_from_embeddings, pair_loss_from_embeddings,
                                     proxy_loss_from_embeddings)
from msjax.losses.global_batch import global_batch_loss
from msjax.losses.gpw import SELF_THRESHOLD, gpw_summary, pair_masks, prepare_pairs
from msjax.losses.lifted import lifted_loss, lifted_weights
from msjax.losses.ms import (MS_ABLATIONS, MS_PRESETS, ms_loss, ms_mining, ms_preset,
                             ms_value_and_symmetric_weights, ms_value_and_weights, ms_weights)
from msjax.losses.proxy import (normalize_proxies, proxy_anchor_loss,
                                proxy_anchor_value_and_weights, proxy_anchor_weights,
                                proxy_nca_loss,
                                proxy_nca_value_and_weights, proxy_nca_weights)
from msjax.losses.registry import (ALL_NAMES, NAMES, PROXY_NAMES, PairLoss, get,
                                   hparam_defaults, is_proxy)
from msjax.losses.summary import PairSelection, batch_gpw_summary, pair_selection
from msjax.losses.supcon import supcon_loss, supcon_value_and_weights, supcon_weights
from msjax.losses.triplet import triplet_loss, triplet_weights
