"""A trained model's pair weights on a real P×K batch, and its retrieval on the test
split: what the GPW notebook studies.

    run = analysis.load_run("runs/cub-...")          # config.json + latest checkpoint
    emb, labels = analysis.batch_embeddings(run)      # one training batch, embedded
    sel = analysis.pair_weights(emb, labels, "ms", alpha=2.0, beta=40.0)
    examples = analysis.retrieval_examples(run)       # queries and their neighbours

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


# ------------------------------------------------------------------ retrieval examples


@dataclasses.dataclass
class RetrievalExamples:
  """Chosen queries of an evaluation split, each with its ``k`` nearest neighbours: what
  the retrieval metrics count, one query at a time. ``E`` examples, all NumPy.

  Attributes:
    kind: ``str [E]``: ``"random"`` (drawn at random among the queries with a positive)
      or ``"worst"`` (among the queries whose first positive ranks lowest).
    query_index: ``int64 [E]``, the query's row in the query split.
    query_label: ``[E]``, its label.
    first_positive: ``int64 [E]``, the 0-based rank of the query's first positive in its
      ranking (``evaluate.Rankings.first_positive``: the negatives ranked before it); the
      query is a hit for Recall@K exactly when this is below K.
    neighbour_index: ``int64 [E, k]``, the ``k`` gallery rows most similar to the query,
      most similar first (among equal similarities the lower row first, as evaluation
      ranks), the query itself excluded when queries search each other.
    neighbour_label: ``[E, k]``, their labels.
    similarity: ``[E, k]``, their similarities to the query (inner products of the
      L2-normalised embeddings).
    query_class, neighbour_class: ``str [E]``, ``str [E, k]``: the dataset's names of
      those labels (the labels as text for examples built from embeddings alone).
    images: ``uint8 [E, k + 1, S, S, 3]``, each row the query then its neighbours, after
      the run's evaluation transform (the pixels the model embedded); None for examples
      built from embeddings alone.
    split: the query split's name ("" when unknown).
    symmetric: whether the queries search each other (the gallery is the query split);
      False when they search a separate gallery (In-Shop's).
    num_gallery: how many items each query ranks (the query itself excluded).
  """

  kind: np.ndarray
  query_index: np.ndarray
  query_label: np.ndarray
  first_positive: np.ndarray
  neighbour_index: np.ndarray
  neighbour_label: np.ndarray
  similarity: np.ndarray
  query_class: np.ndarray
  neighbour_class: np.ndarray
  images: np.ndarray | None
  split: str
  symmetric: bool
  num_gallery: int

  @property
  def k(self) -> int:
    return self.neighbour_index.shape[1]

  @property
  def matches(self) -> np.ndarray:
    """``bool [E, k]``: the neighbour shares the query's label (a positive)."""
    return self.neighbour_label == self.query_label[:, None]


def pick_retrieval_examples(query_emb, query_labels, gallery_emb=None, gallery_labels=None,
                            *, num_random: int = 4, num_worst: int = 4, k: int = 5,
                            seed: int = 0, split: str = "") -> RetrievalExamples:
  """Random queries and the worst failures among ``query_emb``, with their ``k`` nearest
  neighbours, as evaluation ranks them (``images`` None).

  Only queries with a positive are chosen (the metrics average over those). The worst
  are the ``num_worst`` queries with the largest first-positive rank, the lower index
  first among equal ranks; the ``num_random`` random ones are drawn with
  ``np.random.default_rng(seed)`` from the others, without replacement, and listed in
  index order. Rows: the random queries, then the worst, worst first. Fewer come back
  when fewer queries have a positive.

  The first-positive ranks are ``evaluate.retrieval_rankings``'s and the neighbours
  ``knn.top_k``'s: both rank by similarity, ties to the lower index, so where the first
  positive is among the ``k`` shown it is the first neighbour sharing the query's label.

  Args:
    query_emb, query_labels: ``[Nq, D]`` embeddings and their ``[Nq]`` labels.
    gallery_emb, gallery_labels: a separate gallery (In-Shop's); without one the queries
      search each other and a query never retrieves itself.
    num_random, num_worst: how many of each kind.
    k: neighbours per query, at most the number of items a query ranks.
    seed: the random queries' draw.
    split: the query split's name, for the figure.
  """
  from msjax import evaluate, knn
  for name, value in (("num_random", num_random), ("num_worst", num_worst)):
    if int(value) < 0:
      raise ValueError(f"{name} must be >= 0; got {value}.")
  if num_random + num_worst == 0:
    raise ValueError("num_random and num_worst are both 0: there is nothing to show.")
  query_emb, query_labels = np.asarray(query_emb), np.asarray(query_labels)
  symmetric = gallery_emb is None
  if symmetric:
    gallery_emb, gallery_labels = query_emb, query_labels
  gallery_emb, gallery_labels = np.asarray(gallery_emb), np.asarray(gallery_labels)
  ranked = len(gallery_emb) - (1 if symmetric else 0)
  if not 1 <= k <= ranked:
    raise ValueError(f"k must be between 1 and the {ranked} items a query ranks; got {k}.")
  first = evaluate.retrieval_rankings(
      query_emb, query_labels, None if symmetric else gallery_emb,
      None if symmetric else gallery_labels).first_positive
  candidates = np.flatnonzero(first >= 0)
  # Largest rank first; the stable sort keeps the lower index first among equal ranks.
  worst = candidates[np.argsort(-first[candidates], kind="stable")][:num_worst]
  others = np.setdiff1d(candidates, worst)
  rng = np.random.default_rng(seed)
  drawn = np.sort(rng.choice(others, size=min(num_random, others.size), replace=False))
  chosen = np.concatenate([drawn, worst]).astype(np.int64)
  kind = np.array(["random"] * drawn.size + ["worst"] * worst.size)

  # A query in the gallery finds itself: one more neighbour, then its own row dropped.
  # Exact duplicates ranked before it can push it down the list (or off it), so it is
  # dropped by index, not by position.
  found = knn.top_k(query_emb[chosen], gallery_emb, k + (1 if symmetric else 0))
  indices, sims = found.indices, found.similarities
  if symmetric:
    order = np.argsort(indices == chosen[:, None], axis=1, kind="stable")[:, :k]
    indices = np.take_along_axis(indices, order, axis=1)
    sims = np.take_along_axis(sims, order, axis=1)
  neighbour_label = gallery_labels[indices]
  return RetrievalExamples(
      kind=kind, query_index=chosen, query_label=query_labels[chosen],
      first_positive=first[chosen].astype(np.int64), neighbour_index=indices,
      neighbour_label=neighbour_label, similarity=sims,
      query_class=query_labels[chosen].astype(str),
      neighbour_class=neighbour_label.astype(str), images=None, split=split,
      symmetric=symmetric, num_gallery=ranked)


def retrieval_examples(run: Run, *, num_random: int = 4, num_worst: int = 4, k: int = 5,
                       seed: int = 0, split: str | None = None,
                       batch_size: int | None = None) -> RetrievalExamples:
  """Random queries and the worst failures of ``run``'s evaluation split, each with its
  ``k`` nearest neighbours and their images, as the run's evaluation ranks them.

  The split (default ``config.eval.split``) is embedded as evaluation embeds it
  (``embed.embed_split``: the eval transform, the eval-mode model; ``batch_size`` default
  ``config.data.eval_batch_size``), then searched as evaluation searches it: In-Shop's
  queries search its gallery, the other datasets' test (or val) images search each other.
  The choice of queries is ``pick_retrieval_examples``'s; the images are loaded again
  through the evaluation transform, so the figure shows what the model saw.

  Args:
    run: a restored run with its dataset (``load_run``).
    num_random, num_worst, k, seed: see ``pick_retrieval_examples``.
    split: ``"test"`` or ``"val"`` (runs trained with ``config.data.val_fraction``).
  """
  from msjax import data as data_lib
  from msjax import embed, train
  split = split or run.config.eval.split
  if run.dataset is None:
    raise ValueError("this run was restored without its dataset (load_run(..., "
                     "load_data=False)); restore it with load_data=True, and data_root "
                     "if the dataset lives elsewhere on this machine.")
  if split not in ("test", "val"):
    raise ValueError(f"split must be 'test' or 'val', the splits evaluation searches; got "
                     f"{split!r}.")
  queries, gallery = train._eval_splits(run.dataset, split)
  if queries is None:
    embed.dataset_split(run, split)  # raises, saying which splits the run has
  q = _embedded_split(run, queries, batch_size)
  g = _embedded_split(run, gallery, batch_size) if gallery is not None else None
  examples = pick_retrieval_examples(
      q.embeddings, q.labels, None if g is None else g.embeddings,
      None if g is None else g.labels, num_random=num_random, num_worst=num_worst, k=k,
      seed=seed, split=queries.name)
  searched = queries if gallery is None else gallery
  transform = data_lib.image_transform(run.config.data, train=False)
  rows = [[_eval_image(queries, transform, i)] +
          [_eval_image(searched, transform, j) for j in neighbours]
          for i, neighbours in zip(examples.query_index, examples.neighbour_index)]
  return dataclasses.replace(
      examples, images=np.asarray(rows, np.uint8),
      query_class=np.asarray([queries.class_names[c] for c in examples.query_label]),
      neighbour_class=np.asarray([[searched.class_names[c] for c in row]
                                  for row in examples.neighbour_label]))


def _embedded_split(run: Run, split, batch_size):
  """``embed.embed_split`` of the whole split, row i being image i: an image that cannot
  be loaded is an error here, as it is for evaluation."""
  from msjax import embed
  from msjax.data.records import DataError
  result = embed.embed_split(run, split, batch_size=batch_size, progress=False)
  if result.skipped:
    name, reason = result.skipped[0]
    raise DataError(f"{len(result.skipped)} image(s) of split {split.name!r} cannot be "
                    f"loaded (first: {name}: {reason}), so evaluation cannot rank this "
                    "split either. Restore or remove them (python -m msjax.data check "
                    "lists every one).")
  return result


def _eval_image(split, transform, index) -> np.ndarray:
  """Image ``index`` of ``split`` after the evaluation transform: ``uint8 [S, S, 3]``."""
  return transform(split.images.read(int(index)), split.images.describe(int(index)))
