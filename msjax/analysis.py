"""A trained model's pair weights on a real P×K batch: what the GPW notebook studies.

    run = analysis.load_run("runs/cub-...")          # config.json + latest checkpoint
    emb, labels = analysis.batch_embeddings(run)      # one training batch, embedded
    sel = analysis.pair_weights(emb, labels, "ms", alpha=2.0, beta=40.0)

Everything here is NumPy in, NumPy out, so figures (``msjax.plot``) and notebooks need
no JAX knowledge. The weights are the paper's per-anchor ``w`` (``∂L/∂S`` times the batch
size).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msjax import losses
from msjax.config import load_config_file  # noqa: F401 - the notebook's entry

# The hyper-parameters each loss is shown with when nothing else is asked for: the
# released MS setting, and the values the papers use for the others on unit embeddings.
DEFAULT_HPARAMS = {
    "ms": dict(alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1),
    "binomial": dict(alpha=2.0, beta=50.0, lam=0.5),
    "lifted": dict(lam=1.0, scale=1.0),
    "contrastive": dict(lam=0.5),
    "triplet": dict(margin=0.1),
}
# Which similarities each loss's weights depend on (Wang et al., Table 1).
DEPENDS_ON = {"contrastive": "S", "triplet": "P", "binomial": "S", "lifted": "N",
              "ms": "S, P, N"}


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a training run saved as ``<workdir>/config.json``."""
  from etils import epath
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: {workdir} is not an msjax training workdir (python -m "
        "msjax.main writes config.json there when it starts).")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


@dataclasses.dataclass
class Run:
  """A restored training run."""

  config: ml_collections.ConfigDict
  model: Any  # msjax.train.Model
  state: dict
  dataset: Any  # msjax.data.Dataset
  mesh: Any
  step: int


def load_run(workdir, *, step: int | None = None, data_root: str | None = None,
             load_data: bool = True) -> Run:
  """Restores ``workdir``'s checkpoint ``step`` (default: the latest) with its config.

  ``data_root`` points at the dataset when it lives elsewhere on this machine than on
  the one that trained. ``load_data=False`` restores the model alone (``Run.dataset``
  is None), so the run's dataset need not be on this machine: embedding other images.
  """
  from msjax import train
  config = load_config(workdir)
  config.model.pretrained = ""  # the checkpoint holds every weight
  if data_root is not None:
    config.data.root = data_root
  mesh, dataset, _, model, state, _, ckpt = train._setup(config, workdir, training=False,
                                                          load_data=load_data)
  try:
    if ckpt.latest_step() is None:
      raise FileNotFoundError(f"{workdir} has no checkpoint yet.")
    state, _ = train._restore(ckpt, state, step)
  finally:
    ckpt.close()
  return Run(config, model, state, dataset, mesh, int(jax.device_get(state["step"])))


def batch_embeddings(run: Run, *, step: int | None = None):
  """``(embeddings [B, D] float32, labels [B])`` of the training batch of ``step``.

  The batch is the P×K sampler's batch at ``step`` (default: the run's step, i.e. the
  batch training would take next) with the training transforms, embedded in eval mode
  (BatchNorm running statistics), on this process.
  """
  from msjax import data as data_lib
  from msjax import train
  d = run.config.data.copy_and_resolve_references()
  d.num_workers = 0
  at = run.step if step is None else step
  batches = data_lib.train_batches(run.dataset.train, d, seed=run.config.seed,
                                   num_steps=at + 1, start_step=at)
  batch = data_lib.to_global(next(iter(batches)), run.mesh)
  emb = train.make_embed_fn(run.model, run.mesh)(run.state, batch["image"])
  return np.asarray(jax.device_get(emb), np.float32), np.asarray(jax.device_get(batch["label"]))


@dataclasses.dataclass
class PairWeights:
  """One batch under one loss, all ``[B, B]`` NumPy arrays."""

  sim: np.ndarray
  weights: np.ndarray  # ∂L/∂S · B: +w⁻ on negatives, −w⁺ on positives
  pos: np.ndarray
  neg: np.ndarray
  selected: np.ndarray

  @property
  def w_pos(self):
    return np.where(self.pos, -self.weights, 0.0)

  @property
  def w_neg(self):
    return np.where(self.neg, self.weights, 0.0)

  def mined_fractions(self) -> tuple[float, float]:
    """Selected over candidate positive and negative pairs."""
    return (float((self.pos & self.selected).sum() / max(self.pos.sum(), 1)),
            float((self.neg & self.selected).sum() / max(self.neg.sum(), 1)))


def similarities(emb) -> np.ndarray:
  emb = np.asarray(emb, np.float64)
  return emb @ emb.T


def pair_weights(emb_or_sim, labels, loss: str = "ms", *, is_sim: bool = False,
                 **hparams) -> PairWeights:
  """The loss's per-anchor weights, candidate pairs and selection on one square batch,
  computed in float64. ``hparams`` default to ``DEFAULT_HPARAMS[loss]``."""
  sim = np.asarray(emb_or_sim, np.float64) if is_sim else similarities(emb_or_sim)
  hp = {**DEFAULT_HPARAMS.get(loss, {}), **hparams}
  with jax.enable_x64(True):
    s = losses.pair_selection(jnp.asarray(sim), jnp.asarray(labels), loss=loss,
                              batch_size=1, **hp)
    s = jax.device_get(s)
  return PairWeights(sim, np.asarray(s.weights), np.asarray(s.pos), np.asarray(s.neg),
                     np.asarray(s.selected))


def autodiff_gap(sim, labels, loss: str = "ms", **hparams) -> dict:
  """How far ``jax.grad`` of the loss is from its analytic GPW weights, in float64.

  Returns ``{"max_abs_diff", "max_abs_weight"}`` over the ``[B, B]`` matrix of ``∂L/∂S``.
  """
  hp = {**DEFAULT_HPARAMS.get(loss, {}), **hparams}
  entry = losses.get(loss)
  with jax.enable_x64(True):
    s = jnp.asarray(np.asarray(sim, np.float64))
    y = jnp.asarray(labels)
    auto = jax.grad(lambda x: entry.loss(x, y, **hp))(s)
    analytic = entry.weights(s, y, **hp)
    diff, scale = jax.device_get((jnp.max(jnp.abs(auto - analytic)),
                                  jnp.max(jnp.abs(analytic))))
  return {"max_abs_diff": float(diff), "max_abs_weight": float(scale)}


def telemetry_records(workdir) -> list[dict]:
  """The ``gpw/`` telemetry (with ``train/loss``) logged by a run, one dict per step,
  keys without the prefix, resumed-over records dropped."""
  from etils import epath

  from msjax import metric_writers
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: {workdir} is not an msjax training workdir, or its run "
        "has not logged yet.")
  by_step: dict[int, dict] = {}
  for r in metric_writers.drop_superseded(metric_writers.read_jsonl(path)):
    if any(k.startswith("gpw/") for k in r):
      row = by_step.setdefault(r["step"], {"step": r["step"]})
      row.update({k[4:]: v for k, v in r.items() if k.startswith("gpw/")})
      if "train/loss" in r:
        row["loss"] = r["train/loss"]
  if not by_step:
    raise ValueError(
        f"{path} holds no pair-weight telemetry (gpw/ keys): the run was trained with "
        "config.train.telemetry=False or by an msjax without telemetry.")
  return [by_step[s] for s in sorted(by_step)]
