"""A trained model's pair weights on a real P×K batch, and its retrieval on the test
split: what the GPW notebook studies.

    run = analysis.load_run("runs/cub-...")          # config.json + latest checkpoint
    emb, labels = analysis.batch_embeddings(run)      # one training batch, embedded
    sel = analysis.pair_weights(emb, labels, "ms", alpha=2.0, beta=40.0)
    mem = analysis.memory_pair_weights(run)           # the same with a cross-batch memory
    prox = analysis.run_proxies(run)                  # trained proxies, or stand-ins
    pw = analysis.proxy_pair_weights(emb, labels, prox, "proxy_anchor")  # [B, C]
    examples = analysis.retrieval_examples(run)       # queries and their neighbours

Everything here is NumPy in, NumPy out, so figures (``msjax.plot``) and notebooks need
no JAX knowledge. The weights are the paper's per-anchor ``w`` (``∂L/∂S`` times the batch
size; for Proxy-Anchor, whose anchors are the proxies, see ``proxy_pair_weights``).
"""

from __future__ import annotations

import dataclasses
import functools
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
    # The later losses are shown with their registry defaults, which are their papers'
    # and releases' (circle.py, supcon.py, proxy.py say which).
    **{name: losses.hparam_defaults(name)
       for name in ("circle", "supcon", "proxy_anchor", "proxy_nca")},
}
# Which similarities each loss's weights depend on (Wang et al., Table 1, and the losses'
# docstrings for the later ones). For a proxy loss the "pairs" are sample-to-proxy pairs.
DEPENDS_ON = {"contrastive": "S", "triplet": "P", "binomial": "S", "lifted": "N",
              "ms": "S, P, N", "circle": "S, P, N (soft)", "supcon": "S, N",
              "proxy_anchor": "S, N (the proxy as anchor)",
              "proxy_nca": "N (constant pull on w⁺)"}
# Whose per-anchor weight ``proxy_pair_weights`` reports for each proxy loss: Proxy-NCA
# averages over the batch's samples, Proxy-Anchor over proxies (each proxy is an anchor).
PROXY_ANCHOR_OF = {"proxy_anchor": "proxy", "proxy_nca": "sample"}


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
  at = run.step if step is None else step
  return next(_train_batch_embeddings(run, at, at + 1))


def _train_batch_embeddings(run: Run, first: int, stop: int):
  """Yields ``batch_embeddings`` of the training batches of steps ``first .. stop-1``, in
  order, from one data iterator and one compiled embedding function."""
  from msjax import data as data_lib
  from msjax import train
  d = run.config.data.copy_and_resolve_references()
  d.num_workers = 0
  batches = data_lib.train_batches(run.dataset.train, d, seed=run.config.seed,
                                   num_steps=stop, start_step=first)
  embed = train.make_embed_fn(run.model, run.mesh)
  for batch in batches:
    batch = data_lib.to_global(batch, run.mesh)
    emb = embed(run.state, batch["image"])
    yield (np.asarray(jax.device_get(emb), np.float32),
           np.asarray(jax.device_get(batch["label"])))


@dataclasses.dataclass
class PairWeights:
  """One batch's anchors under one loss, all ``[B, R]`` NumPy arrays over R references:
  ``[B, B]`` for the batch itself, ``[B, N]`` for a memory's entries (``MemoryWeights``),
  ``[B, C]`` for the batch against C class proxies (``proxy_pair_weights``)."""

  sim: np.ndarray
  weights: np.ndarray  # per-anchor ∂L/∂S (· B): +w⁻ on negatives, −w⁺ on positives
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
  computed in float64. ``hparams`` default to ``DEFAULT_HPARAMS[loss]``. A proxy loss
  weighs sample-to-proxy pairs instead: ``proxy_pair_weights``."""
  if loss in losses.PROXY_NAMES:
    raise ValueError(f"{loss!r} is a proxy loss: its pairs are sample-to-proxy pairs, so "
                     "use analysis.proxy_pair_weights(emb, labels, proxies, loss).")
  sim = np.asarray(emb_or_sim, np.float64) if is_sim else similarities(emb_or_sim)
  hp = {**DEFAULT_HPARAMS.get(loss, {}), **hparams}
  with jax.enable_x64(True):
    s = losses.pair_selection(jnp.asarray(sim), jnp.asarray(labels), loss=loss,
                              batch_size=1, **hp)
    s = jax.device_get(s)
  return PairWeights(sim, np.asarray(s.weights), np.asarray(s.pos), np.asarray(s.neg),
                     np.asarray(s.selected))


# ------------------------------------------------------------------ cross-batch memory


@dataclasses.dataclass
class MemoryWeights:
  """One batch's anchors under one loss, without and with a cross-batch memory
  (``msjax.memory``), as per-anchor ``PairWeights`` (``batch_size=1``).

  Training with a memory adds to the batch term ``L(batch, batch)`` the memory term
  ``L(batch anchors, memory)``, whose references are the memory's filled slots: the
  older entries and, enqueued last, the batch's own fresh copies. The memory term's
  columns are split in two:

  Attributes:
    batch: the batch alone, ``[B, B]``: ``pair_weights``, the batch term (which the
      memory leaves unchanged).
    batch_part: the memory term on the batch's own copies, ``[B, B]`` in batch order:
      column ``j`` is image ``j``'s copy, so the diagonal is each anchor's self pair
      (neither positive nor negative, weight 0).
    memory_part: the memory term on the older entries, ``[B, N]``, oldest first.
    memory_labels: ``[N]`` the older entries' labels.
    source: where the memory came from, in words ("" when not known).
  """

  batch: PairWeights
  batch_part: PairWeights
  memory_part: PairWeights
  memory_labels: np.ndarray
  source: str = ""

  @property
  def memory_size(self) -> int:
    """``N``: the older entries (filled slots not holding this batch)."""
    return len(self.memory_labels)

  def mined_negatives(self) -> dict[str, np.ndarray]:
    """Selected negatives per anchor, ``int [B]`` each: ``"batch"`` (the batch alone),
    ``"batch_part"`` and ``"memory_part"`` (the memory term's two parts)."""
    return {name: (p.neg & p.selected).sum(axis=1) for name, p in
            (("batch", self.batch), ("batch_part", self.batch_part),
             ("memory_part", self.memory_part))}

  def neg_weight_sums(self) -> dict[str, np.ndarray]:
    """``Σ_j w⁻_ij`` per anchor, ``float [B]`` each, keyed as ``mined_negatives``."""
    return {name: p.w_neg.sum(axis=1) for name, p in
            (("batch", self.batch), ("batch_part", self.batch_part),
             ("memory_part", self.memory_part))}

  def memory_neg_weight_share(self) -> float:
    """The memory term's ``Σ w⁻`` on older entries over its ``Σ w⁻`` on all its
    references, over all anchors (0 when it weighs no negative)."""
    on_memory = self.memory_part.w_neg.sum()
    total = on_memory + self.batch_part.w_neg.sum()
    return float(on_memory / total) if total > 0 else 0.0


def memory_weights(emb, labels, memory, loss: str = "ms", **hparams) -> MemoryWeights:
  """The loss's per-anchor weights for the anchors ``emb`` ``[B, D]`` (labels ``[B]``)
  against the batch alone and against a cross-batch memory, computed in float64.

  The memory is filled as training fills it (``msjax.memory.enqueue``): the batch's own
  copies are enqueued last, over the oldest entries, and each anchor's copy is its self
  pair, dropped by ``msjax.memory.memory_self_pair``'s rule (by index and, for the
  default ``self_pair="value"``, by value too); unfilled slots count for nothing
  (``msjax.memory.valid``). The weights come from ``losses.pair_selection`` with
  ``ref_labels``, ``anchor_index`` and ``ref_valid``, as the memory term's do.

  Args:
    emb, labels: the batch (its anchors, and its own copies in the memory).
    memory: either a ``msjax.memory.Memory`` as it stands before this batch (a run's
      ``state["memory"]``; its storage dtype is kept, so bfloat16 copies are compared as
      training compares them), or ``(embeddings [N, D], labels [N])``: the preceding
      entries, oldest first, put in a float64 memory of ``N + B`` slots.
    loss: a registry loss with a rectangular form.
    hparams: the loss's keywords; default ``DEFAULT_HPARAMS[loss]``.

  Returns:
    ``MemoryWeights``: the batch alone, and the memory term's weights on the batch's
    own copies and on the older entries.
  """
  from msjax import memory as memory_lib
  if not losses.get(loss).rectangular:
    raise ValueError(f"loss {loss!r} has no rectangular form, so it cannot take a memory.")
  emb, labels = np.asarray(emb), np.asarray(labels)
  hp = {**DEFAULT_HPARAMS.get(loss, {}), **hparams}
  batch = pair_weights(emb, labels, loss, **hp)
  count, dim = emb.shape
  with jax.enable_x64(True):
    if isinstance(memory, memory_lib.Memory):
      mem = memory_lib.Memory(*(jnp.asarray(x) for x in jax.device_get(memory)))
    else:
      old_emb, old_labels = np.asarray(memory[0], np.float64), np.asarray(memory[1])
      if old_emb.size == 0:
        old_emb = old_emb.reshape(0, dim)
      if old_emb.shape != (len(old_labels), dim) or old_labels.ndim != 1:
        raise ValueError(f"the memory's embeddings {old_emb.shape} and labels "
                         f"{old_labels.shape} do not match a batch of {dim}-d embeddings.")
      mem = memory_lib.create(len(old_labels) + count, dim, jnp.float64)
      if len(old_labels):
        mem = memory_lib.enqueue(mem, old_emb, old_labels)
    own = memory_lib.slots(mem, count)
    mem = memory_lib.enqueue(mem, emb, labels)
    sim = np.asarray(emb, np.float64) @ np.asarray(mem.embeddings, np.float64).T
    self_pair = memory_lib.memory_self_pair(hp.get("self_pair"), loss)
    # One compiled program: several times faster than op by op at [B, N + B].
    select = jax.jit(functools.partial(losses.pair_selection, loss=loss, batch_size=1,
                                       **{**hp, "self_pair": self_pair}))
    s = select(jnp.asarray(sim), jnp.asarray(labels), ref_labels=mem.labels,
               anchor_index=own, ref_valid=memory_lib.valid(mem))
    s, own, valid, pointer, ref_labels = jax.device_get(
        (s, own, memory_lib.valid(mem), mem.pointer, mem.labels))
  size = len(valid)
  oldest_first = (int(pointer) + np.arange(size)) % size
  is_own = np.zeros(size, bool)
  is_own[own] = True
  older = oldest_first[valid[oldest_first] & ~is_own[oldest_first]]

  def part(columns):
    return PairWeights(sim[:, columns], *(np.asarray(x)[:, columns] for x in
                                          (s.weights, s.pos, s.neg, s.selected)))

  return MemoryWeights(batch, part(np.asarray(own)), part(older),
                       np.asarray(ref_labels)[older])


def memory_pair_weights(run: Run, *, memory_batches: int = 16, step: int | None = None,
                        from_checkpoint: bool | None = None, loss: str = "ms",
                        **hparams) -> MemoryWeights:
  """``memory_weights`` of the training batch of ``step`` (default: the run's step, the
  batch training would take next), embedded as ``batch_embeddings`` embeds it, against
  a cross-batch memory of the run.

  The memory is the run's checkpointed ``state["memory"]`` (``from_checkpoint``; the
  default where the run trained with ``config.xbm.enabled``, its memory holds entries and
  ``step`` is the run's step), or else the embeddings of the ``memory_batches``
  training batches before ``step`` (fewer near step 0), oldest first, from the P×K
  sampler with the training transforms, embedded by the same restored model. The two
  differ: the checkpointed entries are what training stored, train-mode embeddings by
  the models of the steps that wrote them (the drift XBM relies on being slow), while
  the embedded ones are this model's, like the batch's.

  Returns:
    ``MemoryWeights`` (see ``memory_weights``; ``loss`` and ``hparams`` as there).
  """
  at = run.step if step is None else step
  saved = run.state.get("memory")
  if from_checkpoint is None:
    from_checkpoint = (saved is not None and at == run.step
                       and int(jax.device_get(saved.filled)) > 0)
  if from_checkpoint:
    if saved is None:
      raise ValueError("the run has no checkpointed memory: it was trained without "
                       "config.xbm.enabled; pass from_checkpoint=False to embed one.")
    if at != run.step:
      raise ValueError(f"the checkpointed memory is the one before step {run.step}, not "
                       f"{at}; pass from_checkpoint=False to embed one.")
    emb, labels = batch_embeddings(run, step=at)
    return dataclasses.replace(memory_weights(emb, labels, saved, loss, **hparams),
                               source="the run's checkpointed memory")
  if memory_batches < 0:
    raise ValueError(f"memory_batches must be >= 0; got {memory_batches}.")
  first = max(0, at - memory_batches)
  embedded = list(_train_batch_embeddings(run, first, at + 1))
  (emb, labels), older = embedded[-1], embedded[:-1]
  old_emb = np.concatenate([e for e, _ in older]) if older else emb[:0]
  old_labels = np.concatenate([y for _, y in older]) if older else labels[:0]
  return dataclasses.replace(
      memory_weights(emb, labels, (old_emb, old_labels), loss, **hparams),
      source=f"the {at - first} training batches before step {at}, embedded by this model")


# ------------------------------------------------------------------ proxies


@dataclasses.dataclass
class Proxies:
  """Class proxies to weigh a batch against (``proxy_pair_weights``).

  Attributes:
    vectors: ``float64 [C, D]`` unit rows, normalised as the proxy losses normalise them.
    labels: ``[C]`` each proxy's class.
    stand_in: True for class means standing in for proxies the run never trained (a run
      trained with a pair loss): where a converged proxy would sit, not a trained one.
    source: where they came from, in words.
  """

  vectors: np.ndarray
  labels: np.ndarray
  stand_in: bool
  source: str = ""

  def __len__(self) -> int:
    return len(self.labels)


def _unit_rows(x) -> np.ndarray:
  """``losses.normalize_proxies`` (``p / sqrt(Σp² + 1e-12)``) in float64, as NumPy."""
  with jax.enable_x64(True):
    return np.array(losses.normalize_proxies(jnp.asarray(x, jnp.float64)))  # writable


def trained_proxies(run: Run) -> Proxies:
  """The proxies ``run`` trained with a proxy loss (``state["params"]["proxies"]``,
  ``[C, D]`` as trained, normalised here), proxy ``c`` standing for training class ``c``.

  Raises ValueError for a run without proxies (trained with a pair loss); its
  ``stand_in_proxies`` are the class means instead.
  """
  raw = run.state.get("params", {}).get("proxies")
  if raw is None:
    raise ValueError(
        f"the run (config.loss.name={run.config.loss.name!r}) has no trained proxies: only "
        f"a proxy loss {losses.PROXY_NAMES} trains them. analysis.stand_in_proxies(run) "
        "gives the class means, where a converged proxy would sit.")
  vectors = _unit_rows(jax.device_get(raw))
  return Proxies(vectors, np.arange(len(vectors)), stand_in=False,
                 source=f"the run's {len(vectors):,} trained proxies")


def class_mean_proxies(emb, labels, *, source: str = "") -> Proxies:
  """Stand-in proxies: the normalised mean embedding of each class in ``emb`` ``[N, D]``
  (``labels`` ``[N]``), classes in increasing order. Where a proxy converges when the
  loss pulls it to its class's samples and away from the rest; not a trained proxy."""
  emb, labels = np.asarray(emb, np.float64), np.asarray(labels)
  if emb.ndim != 2 or labels.shape != (len(emb),) or not len(emb):
    raise ValueError(f"class_mean_proxies needs embeddings [N, D] with one label each; got "
                     f"{emb.shape} and {labels.shape}.")
  classes, index = np.unique(labels, return_inverse=True)
  sums = np.zeros((len(classes), emb.shape[1]))
  np.add.at(sums, index, emb)
  return Proxies(_unit_rows(sums), classes, stand_in=True,
                 source=source or f"stand-ins: the class means of {len(emb):,} embeddings")


def stand_in_proxies(run: Run, *, num_batches: int = 16, step: int | None = None) -> Proxies:
  """Stand-in proxies for a run trained with a pair loss: ``class_mean_proxies`` of the
  ``num_batches`` training batches before ``step`` (default: the run's step, the batch
  ``batch_embeddings`` studies), embedded as ``batch_embeddings`` embeds them; near step 0
  the missing ones come from the batches after it. The batch of ``step`` itself is never
  used, so no sample pulls its own stand-in towards itself.

  They are where a converged proxy of each class would sit for this model, not proxies
  any training saw. A class none of those batches holds gets none (``len(proxies)``
  classes do): its samples then have no positive proxy. With the P×K sampler, two
  epochs' worth of batches (``2 · C // P``) hold every class that is dealt.
  """
  if num_batches < 1:
    raise ValueError(f"num_batches must be >= 1; got {num_batches}.")
  at = run.step if step is None else step
  first = max(0, at - num_batches)
  embedded = [e for s, e in zip(range(first, first + num_batches + 1),
                                _train_batch_embeddings(run, first, first + num_batches + 1))
              if s != at]
  emb = np.concatenate([e for e, _ in embedded])
  labels = np.concatenate([y for _, y in embedded])
  where = (f"the {num_batches} training batches before step {at}" if first + num_batches == at
           else f"{num_batches} training batches around step {at} (not its own)")
  return class_mean_proxies(
      emb, labels, source=f"stand-ins: the class means of {where}, embedded by this model")


def run_proxies(run: Run, *, num_batches: int = 16, step: int | None = None) -> Proxies:
  """``trained_proxies(run)`` for a run trained with a proxy loss, else its
  ``stand_in_proxies`` (``num_batches``, ``step`` as there); ``Proxies.stand_in`` says
  which."""
  if run.state.get("params", {}).get("proxies") is not None:
    return trained_proxies(run)
  return stand_in_proxies(run, num_batches=num_batches, step=step)


def proxy_pair_weights(emb, labels, proxies, loss: str = "proxy_anchor", proxy_labels=None,
                       *, per_anchor: bool = True, **hparams) -> PairWeights:
  """A proxy loss's weights on the ``[B, C]`` block of sample-to-proxy similarities,
  computed in float64, as ``PairWeights``: positives are each sample's own-class proxies,
  negatives the other classes' proxies, ``selected`` the pairs with a non-zero weight.

  ``per_anchor`` (default) gives the weight each anchor's term puts on a pair, before the
  loss averages over anchors, as ``pair_weights`` does for the pair losses; the anchors
  differ (``PROXY_ANCHOR_OF``):

  - Proxy-NCA averages over samples: ``∂L/∂S · B`` (``batch_size=1``), so
    ``w⁻_ip = 2σ² q_ip`` and ``w⁺_ip = 2σ²/|P_i|``.
  - Proxy-Anchor is a sum over proxies, not divided by the batch size (``batch_size=1``
    changes nothing): its anchors are the proxies, averaged over ``|P⁺|`` (the proxies
    with a positive in the batch) on the positive side and ``|P|`` (all of them) on the
    negative side, so ``∂L/∂S`` is multiplied by those: ``w⁺_xp = α e^{−α(S_xp−δ)} /
    (1 + Σ_{X⁺_p} e^{−α(S−δ)})`` and ``w⁻_xp = α e^{α(S_xp+δ)} / (1 + Σ_{X⁻_p} e^{α(S+δ)})``,
    which do not depend on how many proxies there are.

  ``per_anchor=False`` gives ``∂L/∂S`` itself, what training back-propagates.

  Args:
    emb: ``[B, D]`` the batch's (unit) embeddings.
    labels: ``[B]`` their classes.
    proxies: ``[C, D]`` proxies as trained (any norm; normalised here as the losses
      normalise them), or a ``Proxies`` (its labels then the default ``proxy_labels``).
    loss: a proxy loss, ``"proxy_anchor"`` or ``"proxy_nca"`` (``losses.PROXY_NAMES``).
    proxy_labels: ``[C]`` each proxy's class; default ``arange(C)``.
    hparams: the loss's keywords; default ``DEFAULT_HPARAMS[loss]``.
  """
  if loss not in losses.PROXY_NAMES:
    raise ValueError(f"{loss!r} is not a proxy loss; choose one of {losses.PROXY_NAMES} "
                     "(pair_weights takes the pair losses).")
  if isinstance(proxies, Proxies):
    proxy_labels = proxies.labels if proxy_labels is None else proxy_labels
    proxies = proxies.vectors
  emb, labels = np.asarray(emb, np.float64), np.asarray(labels)
  unit = _unit_rows(proxies)
  if emb.ndim != 2 or unit.ndim != 2 or unit.shape[1] != emb.shape[1]:
    raise ValueError(f"the embeddings [B, D] and proxies [C, D] must share D; got "
                     f"{emb.shape} and {unit.shape}.")
  proxy_labels = (np.arange(len(unit)) if proxy_labels is None else np.asarray(proxy_labels))
  if proxy_labels.shape != (len(unit),):
    raise ValueError(f"proxy_labels has shape {proxy_labels.shape}; pass one class per "
                     f"proxy ({len(unit)}).")
  sim = emb @ unit.T
  hp = {**DEFAULT_HPARAMS.get(loss, {}), **hparams}
  with jax.enable_x64(True):
    s = losses.pair_selection(jnp.asarray(sim), jnp.asarray(labels), loss=loss,
                              ref_labels=jnp.asarray(proxy_labels),
                              batch_size=1 if per_anchor else None, **hp)
    weights = np.asarray(jax.device_get(s.weights))
    # Every proxy of the sample's class is a positive, even one the sample sits on
    # (S = 1): a proxy is never a sample's self pair.
    pos, neg = np.array(s.pos), np.array(s.neg)
  if per_anchor and loss == "proxy_anchor":
    with_pos = max(int(pos.any(axis=0).sum()), 1)
    weights = np.where(pos, weights * with_pos, weights * len(unit))
  return PairWeights(sim, weights, pos, neg, weights != 0)


def autodiff_gap(sim, labels, loss: str = "ms", *, ref_labels=None, **hparams) -> dict:
  """How far ``jax.grad`` of the loss is from its analytic GPW weights, in float64.

  ``sim`` is the batch's ``[B, B]`` similarities for a pair loss, or for a proxy loss the
  ``[B, C]`` sample-to-proxy block with ``ref_labels`` the proxies' classes (default
  ``arange(C)``). Returns ``{"max_abs_diff", "max_abs_weight"}`` over that matrix of
  ``∂L/∂S``.
  """
  hp = {**DEFAULT_HPARAMS.get(loss, {}), **hparams}
  entry = losses.get(loss)
  with jax.enable_x64(True):
    s = jnp.asarray(np.asarray(sim, np.float64))
    y = jnp.asarray(labels)
    if ref_labels is not None:
      hp["ref_labels"] = jnp.asarray(ref_labels)
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
