"""Retrieval evaluation: exact Recall@K, P@1, R-Precision, MAP@R and NMI, on the device.

Protocol (class-disjoint retrieval, DESIGN.md §2). Each query ranks the gallery by
inner-product similarity (embeddings are L2-normalised by the head, so this is cosine
similarity). Without a separate gallery the queries search each other and a query never
retrieves itself (excluded by index, so an exact duplicate of the query still counts);
with one (In-Shop) the queries search the gallery only. A query's *positives* are the
gallery items with its label.

**Ties.** The ranking is a total order: similarity descending, and among equal
similarities the lower gallery index first (a stable sort). Every metric reads that one
order, so duplicate images and tied similarities give the same numbers on any number of
devices. The best positive and the pass that counts the items ranked before it use the
same ``tile × tile`` matmul (below), whose value for a pair does not depend on where in
the block the pair sits, so an exact duplicate of a gallery item ties with it bit for
bit. The top R for MAP@R are scored again by a matrix-vector product; two *different*
similarities within float rounding of each other (~1e-7) may be ordered differently
there than by the matmul. The released code counts a negative that exactly ties the best
positive in the query's favour; the two agree whenever no negative ties a positive.

**Metrics**, averaged over the queries that have at least one positive (a query without
one, such as a single-image class when queries search each other, has nothing to
retrieve; it is left out and counted in ``queries_without_positives``):

- ``recall@K``: a hit when the first positive is among the first K results.
- ``precision@1``: the first result is a positive (equal to ``recall@1``).
- ``r_precision``: with R the query's number of positives, the fraction of the first R
  results that are positives.
- ``map@r``: MAP@R of "A Metric Learning Reality Check": ``1/R · Σ_{i≤R} P(i)·rel(i)``,
  with ``P(i)`` the precision of the first i results.
- ``nmi`` (``clustering_metrics``): normalised mutual information between the labels and
  a k-means clustering of the embeddings into as many clusters as there are labels.

**How.** Nothing forms the ``[N_query, N_gallery]`` similarity matrix; memory is
O(tile² + N·D + N_query·N_gallery/group) per device.

1. Best positive. Whole classes are packed into tiles, so every query meets all its
   positives in one ``tile × tile`` block: its best positive (similarity, then index).
2. One pass over the ``tile × tile`` blocks of the similarity matrix. For each query it
   counts the negatives ranked before its best positive: the position of the first
   positive, which gives every Recall@K at once, however large K. It also keeps the
   maxima of groups of ``group`` consecutive gallery items. When the queries search
   each other the matrix is symmetric, so only the blocks on and above the diagonal are
   computed, and each serves its rows and its columns: half the matmul work.
3. Top R. A query's R best items (R at most the largest class) lie in its R groups with
   the highest maxima; their members are scored again and the top R taken. That is
   what R-Precision and MAP@R read.

The blocks are dealt round-robin to the devices of a mesh; their counts add up and each
device finishes its share of the queries.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from msjax import knn
from msjax.knn import DEFAULT_TILE_SIZE

_NO_INDEX = np.iinfo(np.int32).max  # sorts after every real index

# The Recall@K list each benchmark reports (DESIGN.md §2).
DATASET_KS = {
    "cub": (1, 2, 4, 8, 16, 32),
    "cars": (1, 2, 4, 8, 16, 32),
    "sop": (1, 10, 100, 1000),
    "inshop": (1, 10, 20, 30, 40, 50),
}



class Rankings(NamedTuple):
  """Per-query facts about the ranked gallery, from which every metric follows.

  Attributes:
    first_positive: ``[N_query]`` int64, the 0-based position of the query's first
      positive in its ranking (the number of negatives ranked before it); -1 for a
      query without positives.
    num_positives: ``[N_query]`` int64, R: the query's positives in the gallery.
    hits_in_top_r: ``[N_query]`` int64, positives among the first R results.
    ap_at_r: ``[N_query]`` float64, the query's average precision at R (0 when R = 0).
  """
  first_positive: np.ndarray
  num_positives: np.ndarray
  hits_in_top_r: np.ndarray
  ap_at_r: np.ndarray


# ----------------------------------------------------------------------------- inputs


def _labels(y, n, name, emb_name):
  y = np.asarray(y)
  if y.ndim != 1 or y.shape[0] != n:
    raise ValueError(f"{name} must be a 1-D array with one label per row of {emb_name} "
                     f"({n}); got shape {y.shape}.")
  return y


@dataclasses.dataclass(frozen=True)
class _Problem:
  """The host-side description of one retrieval problem, labels made dense."""
  query: np.ndarray            # [Nq, D]
  gallery: np.ndarray | None   # [Ng, D], None when the queries search each other
  query_ids: np.ndarray        # [Nq] int32 dense label ids
  gallery_ids: np.ndarray      # [Ng] int32
  num_positives: np.ndarray    # [Nq] int64

  @property
  def symmetric(self):
    return self.gallery is None

  @property
  def num_gallery(self):
    return self.query.shape[0] if self.symmetric else self.gallery.shape[0]


def _problem(query_emb, query_labels, gallery_emb, gallery_labels):
  if (gallery_emb is None) != (gallery_labels is None):
    raise ValueError("Pass gallery_emb and gallery_labels together (query against a "
                     "separate gallery, as In-Shop does), or neither (queries search each "
                     "other).")
  q = knn.check_embeddings(query_emb, "query_emb")
  ql = _labels(query_labels, q.shape[0], "query_labels", "query_emb")
  if gallery_emb is None:
    g, gl = None, ql
  else:
    g = knn.check_embeddings(gallery_emb, "gallery_emb")
    if g.shape[1] != q.shape[1]:
      raise ValueError(f"query_emb has dimension {q.shape[1]} but gallery_emb has "
                       f"{g.shape[1]}; both must come from the same model.")
    g = g.astype(np.result_type(q, g), copy=False)
    q = q.astype(g.dtype, copy=False)
    gl = _labels(gallery_labels, g.shape[0], "gallery_labels", "gallery_emb")
  try:
    _, ids = np.unique(np.concatenate([ql, gl]) if g is not None else ql,
                       return_inverse=True)
  except TypeError as e:
    raise ValueError(f"labels must be comparable values of one type (integers or "
                     f"strings): {e}") from None
  ids = ids.reshape(-1).astype(np.int32)
  qid = ids[:q.shape[0]]
  gid = ids[q.shape[0]:] if g is not None else qid
  counts = np.bincount(gid, minlength=ids.max() + 1)
  num_positives = counts[qid].astype(np.int64) - (1 if g is None else 0)  # not itself
  return _Problem(q, g, qid, gid, num_positives)


def _pack_classes(query_ids, gallery_ids, symmetric, tile):
  """Packs whole classes into tiles: ``(query slots, gallery slots)``, ``[P, tile]`` each.

  Tile p holds every query and every gallery item of its classes (-1 fills the rest), so
  each query meets all its positives in one ``tile × tile`` block, computed by the same
  matmul as the blocks of the main pass: the best positive's similarity is then the very
  number the main pass compares against, bit for bit, which keeps exact ties (duplicate
  images) tied. Only classes that give some query a positive are packed.
  """
  num_ids = int(max(query_ids.max(), gallery_ids.max())) + 1
  qc = np.bincount(query_ids, minlength=num_ids)
  gc = qc if symmetric else np.bincount(gallery_ids, minlength=num_ids)
  useful = np.flatnonzero((qc >= 2) if symmetric else ((qc > 0) & (gc > 0)))
  q_order = np.argsort(query_ids, kind="stable").astype(np.int32)
  g_order = q_order if symmetric else np.argsort(gallery_ids, kind="stable").astype(np.int32)
  q_start = np.concatenate([[0], np.cumsum(qc)])
  g_start = np.concatenate([[0], np.cumsum(gc)])
  tiles, current, fill_q, fill_g = [], [], 0, 0
  for c in useful:
    if fill_q + qc[c] > tile or fill_g + gc[c] > tile:
      tiles.append(current)
      current, fill_q, fill_g = [], 0, 0
    current.append(c)
    fill_q, fill_g = fill_q + qc[c], fill_g + gc[c]
  if current:
    tiles.append(current)
  q_slots = np.full((len(tiles), tile), -1, np.int32)
  g_slots = np.full((len(tiles), tile), -1, np.int32)
  for p, classes in enumerate(tiles):
    q = np.concatenate([q_order[q_start[c]:q_start[c + 1]] for c in classes])
    g = np.concatenate([g_order[g_start[c]:g_start[c + 1]] for c in classes])
    q_slots[p, :q.size], g_slots[p, :g.size] = q, g
  return q_slots, g_slots


# ------------------------------------------------------------------- device: one mesh


def _count_before(block, col0, row_ids, col_ids, best_sim, best_idx, *, num_cols, axis):
  """For each query of ``block``, the negatives ranked before its best positive.

  ``axis=1``: the rows of ``block`` are the queries. ``axis=0``: its columns are (the
  block read transposed, without materialising the transpose).
  """
  expand = (lambda x: x[:, None]) if axis == 1 else (lambda x: x[None, :])
  other = (lambda x: x[None, :]) if axis == 1 else (lambda x: x[:, None])
  col = col0 + jnp.arange(block.shape[axis], dtype=jnp.int32)
  negative = (other(col_ids) != expand(row_ids)) & other(col < num_cols)
  before = (block > expand(best_sim)) | ((block == expand(best_sim))
                                         & (other(col) < expand(best_idx)))
  return jnp.sum(negative & before, axis=axis, dtype=jnp.int32)


def _ranking_kernel(query, query_ids, gallery, gallery_ids, q_slots, g_slots, schedule,
                    *, axis, devices, tile, group, k, cols, num_gallery, symmetric,
                    precision):
  """Runs on one device inside shard_map.

  ``q_slots``/``g_slots`` (the class-packed tiles) and ``schedule`` (the tile pairs) are
  this device's shares; the embeddings and ids are replicated. The schedule's tiles
  cover the queries and the ``cols`` gallery items (both padded to whole tiles); the
  query array is longer by the padding that makes it divide among the devices, and
  each device finishes its slice of queries. Returns that slice's counts and top-k gallery indices.
  """
  neg_inf = jnp.array(-jnp.inf, query.dtype)
  local = query.shape[0] // devices
  first = jax.lax.axis_index(axis) * local
  local_q = jax.lax.dynamic_slice_in_dim(query, first, local)
  dot = lambda a, b: jnp.dot(a, b.T, precision=precision)

  # 1. The best positive (highest similarity, then lowest index) of every query, from
  #    the class-packed tiles; each query is in one tile of one device.
  def best(_, slots):
    qs, gs = slots
    qv, gv = qs >= 0, gs >= 0
    qb = jnp.where(qv[:, None], query[jnp.maximum(qs, 0)], 0)
    gb = jnp.where(gv[:, None], gallery[jnp.maximum(gs, 0)], 0)
    block = dot(qb, gb)
    positive = ((gallery_ids[jnp.maximum(gs, 0)][None, :]
                 == query_ids[jnp.maximum(qs, 0)][:, None]) & qv[:, None] & gv[None, :])
    if symmetric:
      positive = positive & (gs[None, :] != qs[:, None])
    values = jnp.where(positive, block, neg_inf)
    top = values.max(axis=1)
    at = jnp.where(positive & (values == top[:, None]), gs[None, :], _NO_INDEX).min(axis=1)
    return None, (top, jnp.where(top > neg_inf, at, -1))

  _, (top, at) = jax.lax.scan(best, None, (q_slots, g_slots))
  where = jnp.where(q_slots >= 0, q_slots, query.shape[0]).reshape(-1)  # -1 slots: dropped
  best_sim = jnp.full(query.shape[0], neg_inf).at[where].set(top.reshape(-1), mode="drop")
  best_idx = jnp.full(query.shape[0], -1, jnp.int32).at[where].set(at.reshape(-1),
                                                                   mode="drop")
  best_sim = jax.lax.pmax(best_sim, axis)
  best_idx = jax.lax.pmax(best_idx, axis)

  # 2. One pass over this device's tile pairs: the counts, and the group maxima.
  count_before = functools.partial(_count_before, num_cols=num_gallery)
  group_max = functools.partial(knn.group_max, group=group, num_cols=num_gallery)

  def step(carry, pair):
    count, table = carry
    i, j, active = pair[0] * tile, pair[1] * tile, pair[2] > 0
    block = dot(jax.lax.dynamic_slice_in_dim(query, i, tile),
                jax.lax.dynamic_slice_in_dim(gallery, j, tile))

    def update(count, table, r0, c0, axis, active):
      rs = lambda x: jax.lax.dynamic_slice_in_dim(x, r0, tile)
      n = count_before(block, c0, rs(query_ids),
                       jax.lax.dynamic_slice_in_dim(gallery_ids, c0, tile),
                       rs(best_sim), rs(best_idx), axis=axis)
      count = jax.lax.dynamic_update_slice_in_dim(
          count, rs(count) + jnp.where(active, n, 0), r0, 0)
      m = group_max(block, c0, axis=axis)
      old = jax.lax.dynamic_slice(table, (r0, c0 // group), m.shape)
      table = jax.lax.dynamic_update_slice(table, jnp.where(active, m, old),
                                           (r0, c0 // group))
      return count, table

    count, table = update(count, table, i, j, 1, active)
    if symmetric:  # the same block, read down its columns, serves the rows of tile j
      count, table = update(count, table, j, i, 0, active & (i != j))
    return (count, table), None

  init = (jnp.zeros(query.shape[0], jnp.int32),
          jnp.zeros((query.shape[0], cols // group), query.dtype))
  (count, table), _ = jax.lax.scan(step, init, schedule[0])

  # 3. Each device finishes its own queries. Every table entry was written by one device
  #    only (the others hold 0), so a sum gathers them exactly.
  if devices > 1:
    count = jax.lax.psum_scatter(count, axis, scatter_dimension=0, tiled=True)
    table = jax.lax.psum_scatter(table, axis, scatter_dimension=0, tiled=True)
  own = first + jnp.arange(local, dtype=jnp.int32)
  top_i, _ = knn.top_k_from_group_maxima(local_q, gallery, table, k, group=group,
                                         num_gallery=num_gallery,
                                         exclude=own if symmetric else None,
                                         precision=precision)
  return count, top_i


@functools.lru_cache(maxsize=32)
def _compiled_kernel(mesh, axis, **static):
  shard, repl = P(axis), P()
  kernel = jax.shard_map(
      functools.partial(_ranking_kernel, axis=axis, **static),
      mesh=mesh, in_specs=(repl, repl, repl, repl, shard, shard, shard),
      out_specs=(shard, shard), check_vma=False)
  return jax.jit(kernel)


# ----------------------------------------------------------------------------- public


def retrieval_rankings(query_emb, query_labels, gallery_emb=None, gallery_labels=None, *,
                       tile_size: int | None = None, mesh: Mesh | None = None,
                       precision=jax.lax.Precision.HIGHEST,
                       group_size: int | None = None) -> Rankings:
  """Per-query ranking facts (first positive, R, hits in the top R, AP@R).

  Args:
    query_emb: ``[Nq, D]`` query embeddings (NumPy or JAX; every process passes all).
    query_labels: ``[Nq]`` labels (integers or strings).
    gallery_emb, gallery_labels: a separate gallery (In-Shop); without one the queries
      search each other, a query never retrieving itself.
    tile_size: the side of the similarity blocks (default 1024, or less for small sets;
      more when a class is larger).
    mesh: the devices to share the work; default every device, on one axis.
    precision: matmul precision. HIGHEST (default) keeps float32 rankings exact on TPU
      and GPU, whose default would round the similarities to bfloat16 or TF32.
    group_size: columns per group when pre-selecting each query's top R (a power of two
      dividing the tile); default: the smallest that keeps the per-device table of
      group maxima, ``N_query × N_gallery / group`` floats, within 1 GiB (16 for SOP).

  Returns:
    ``Rankings`` with one entry per query, in order.
  """
  prob = _problem(query_emb, query_labels, gallery_emb, gallery_labels)
  mesh = mesh or knn.default_mesh()
  axis, devices = knn.mesh_axis(mesh), mesh.size
  nq, ng = prob.query.shape[0], prob.num_gallery
  k = int(prob.num_positives.max())
  if k <= 0:
    raise ValueError(
        "No query has a positive in the gallery (every query's label is missing from the "
        "gallery, or every class has a single image when queries search each other), so "
        "no retrieval metric is defined. Check that the query and gallery labels come "
        "from the same label space.")
  tile = int(tile_size or DEFAULT_TILE_SIZE)
  if tile < 1:
    raise ValueError(f"tile_size must be positive; got {tile_size}.")
  tile = min(tile, knn.round_up(max(nq, ng), 8))
  # A class must fit in one tile (see _pack_classes): if not, the next power of two.
  largest = int(max(np.bincount(prob.query_ids).max(), np.bincount(prob.gallery_ids).max()))
  if largest > tile:
    tile = 1 << (largest - 1).bit_length()
  rows = knn.round_up(nq, tile)                         # queries, in whole tiles
  cols = rows if prob.symmetric else knn.round_up(ng, tile)
  padded = knn.round_up(rows, devices)                  # ... and dividing among the devices
  group = knn.group_size(tile, padded, cols, group_size)
  d = prob.query.shape[1]
  dtype = prob.query.dtype

  query = np.zeros((padded, d), dtype)
  query[:nq] = prob.query
  query_ids = np.full(padded, -1, np.int32)
  query_ids[:nq] = prob.query_ids
  q_slots, g_slots = _pack_classes(prob.query_ids, prob.gallery_ids, prob.symmetric, tile)
  extra = -len(q_slots) % devices
  q_slots = np.pad(q_slots, ((0, extra), (0, 0)), constant_values=-1)
  g_slots = np.pad(g_slots, ((0, extra), (0, 0)), constant_values=-1)
  schedule = knn.pair_schedule(rows // tile, cols // tile, prob.symmetric, devices)

  kernel = _compiled_kernel(mesh, axis, devices=devices, tile=tile, group=group, k=k,
                            cols=cols, num_gallery=ng, symmetric=prob.symmetric,
                            precision=precision)
  put = lambda x, spec: knn.put(x, NamedSharding(mesh, spec))
  query_dev = put(query, P())
  if prob.symmetric:
    gallery_dev, gallery_ids = query_dev, np.where(np.arange(padded) < nq, query_ids, -2)
  else:
    gallery = np.zeros((cols, d), dtype)
    gallery[:ng] = prob.gallery
    gallery_ids = np.full(cols, -2, np.int32)
    gallery_ids[:ng] = prob.gallery_ids
    gallery_dev = put(gallery, P())
  count, top_i = kernel(query_dev, put(query_ids, P()), gallery_dev, put(gallery_ids, P()),
                        put(q_slots, P(axis)), put(g_slots, P(axis)), put(schedule, P(axis)))
  count, top_i = knn.fetch(count)[:nq].astype(np.int64), knn.fetch(top_i)[:nq]

  r = prob.num_positives
  has = r > 0
  first_positive = np.where(has, count, -1)
  top_ids = prob.gallery_ids[np.minimum(top_i, ng - 1)]
  slot = np.arange(k)
  rel = (top_ids == prob.query_ids[:, None]) & (top_i < ng) & (slot[None, :] < r[:, None])
  hits = rel.sum(axis=1)
  precision_at = np.cumsum(rel, axis=1) / (slot + 1.0)
  ap = np.where(has, (precision_at * rel).sum(axis=1) / np.maximum(r, 1), 0.0)
  return Rankings(first_positive, r, hits.astype(np.int64), ap)


def metrics_from_rankings(rankings: Rankings, ks: Sequence[int] = (1, 2, 4, 8)) -> dict:
  """Averages per-query rankings into the metrics dict of ``retrieval_metrics``."""
  ks = _check_ks(ks)
  has = rankings.num_positives > 0
  first = rankings.first_positive[has]
  r = rankings.num_positives[has]
  out = {f"recall@{k}": float(np.mean(first < k)) for k in ks}
  out["precision@1"] = float(np.mean(first == 0))
  out["r_precision"] = float(np.mean(rankings.hits_in_top_r[has] / r))
  out["map@r"] = float(np.mean(rankings.ap_at_r[has]))
  out["num_queries"] = int(has.sum())
  out["queries_without_positives"] = int((~has).sum())
  return out


def _check_ks(ks):
  ks = tuple(int(k) for k in ks)
  if not ks or any(k < 1 for k in ks):
    raise ValueError(f"ks must be a non-empty list of positive integers; got {ks}.")
  return ks


def retrieval_metrics(query_emb, query_labels, gallery_emb=None, gallery_labels=None, *,
                      ks: Sequence[int] = (1, 2, 4, 8), tile_size: int | None = None,
                      mesh: Mesh | None = None, precision=jax.lax.Precision.HIGHEST,
                      group_size: int | None = None) -> dict:
  """Recall@K, P@1, R-Precision and MAP@R of exact nearest-neighbour retrieval.

  Args:
    query_emb, query_labels, gallery_emb, gallery_labels, tile_size, mesh, precision,
      group_size: as in ``retrieval_rankings``.
    ks: the K of Recall@K (``DATASET_KS[name]`` for the benchmarks). Any K costs the same.

  Returns:
    ``{"recall@K": ..., "precision@1", "r_precision", "map@r"}`` as fractions in [0, 1],
    plus ``num_queries`` (queries with a positive, over which they are averaged) and
    ``queries_without_positives``.
  """
  ks = _check_ks(ks)
  return metrics_from_rankings(
      retrieval_rankings(query_emb, query_labels, gallery_emb, gallery_labels,
                         tile_size=tile_size, mesh=mesh, precision=precision,
                         group_size=group_size), ks)


# -------------------------------------------------------------------------- clustering


def _assign(x, centres, chunk, precision):
  """Nearest centre of each point (squared Euclidean; ties: the lower centre index)."""
  half_norms = 0.5 * jnp.sum(centres * centres, axis=1)

  def nearest(xs):
    scores = jnp.dot(xs, centres.T, precision=precision) - half_norms[None, :]
    return jnp.argmax(scores, axis=1).astype(jnp.int32)

  return jax.lax.map(nearest, x.reshape(-1, chunk, x.shape[1])).reshape(-1)


@functools.partial(jax.jit, static_argnames=("max_iters", "chunk", "precision", "n"))
def _lloyd(x, centres, *, n, max_iters, chunk, precision):
  """Lloyd's iterations until no assignment changes (or ``max_iters``); an empty cluster
  keeps its centre. ``x`` is padded to whole chunks; its first ``n`` rows are real."""
  num_clusters = centres.shape[0]
  real = jnp.arange(x.shape[0]) < n

  def update(assign):
    weights = real.astype(x.dtype)
    sums = jax.ops.segment_sum(x * weights[:, None], assign, num_clusters)
    counts = jax.ops.segment_sum(weights, assign, num_clusters)
    return sums, counts

  def body(state):
    i, centres, assign, _ = state
    sums, counts = update(assign)
    centres = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1)[:, None], centres)
    new = _assign(x, centres, chunk, precision)
    changed = jnp.any((new != assign) & real)
    return i + 1, centres, new, changed

  assign = _assign(x, centres, chunk, precision)
  state = (jnp.int32(0), centres, assign, jnp.bool_(True))
  iters, centres, assign, _ = jax.lax.while_loop(
      lambda s: (s[0] < max_iters) & s[3], body, state)
  return assign, centres, iters


@functools.partial(jax.jit, static_argnames=("num_clusters", "n"))
def _kmeans_plus_plus(x, key, *, num_clusters, n):
  """k-means++ seeding: each new centre drawn with probability ∝ squared distance."""
  real = jnp.arange(x.shape[0]) < n
  key, sub = jax.random.split(key)
  first = jax.random.randint(sub, (), 0, n, dtype=jnp.int32)
  d2 = jnp.where(real, jnp.sum((x - x[first]) ** 2, axis=1), 0.0)
  chosen = jnp.zeros(num_clusters, jnp.int32).at[0].set(first)

  def body(i, state):
    key, d2, chosen = state
    key, sub = jax.random.split(key)
    logits = jnp.where(d2 > 0, jnp.log(jnp.where(d2 > 0, d2, 1.0)), -jnp.inf)
    # All remaining points coincide with a centre: take any real point.
    logits = jnp.where(jnp.any(d2 > 0), logits, jnp.where(real, 0.0, -jnp.inf))
    nxt = jax.random.categorical(sub, logits).astype(jnp.int32)
    d2 = jnp.minimum(d2, jnp.where(real, jnp.sum((x - x[nxt]) ** 2, axis=1), 0.0))
    return key, d2, chosen.at[i].set(nxt)

  _, _, chosen = jax.lax.fori_loop(1, num_clusters, body, (key, d2, chosen))
  return x[chosen]


def kmeans(x, num_clusters: int, *, seed: int = 0, init: str | np.ndarray = "random",
           max_iters: int = 100, chunk: int = 1024,
           precision=jax.lax.Precision.HIGHEST) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means on the device, deterministic for a seed.

  Args:
    x: ``[N, D]`` points.
    num_clusters: C, at most N.
    seed: seeds the initial centres.
    init: ``"random"`` (C distinct points, uniformly; cheap at SOP scale, where C is in
      the tens of thousands), ``"kmeans++"`` (C sequential passes over the points), or a
      ``[C, D]`` array of initial centres.
    max_iters: the most Lloyd iterations; stops earlier when no assignment changes.
    chunk: points per block when assigning (memory ``chunk × C``).

  Returns:
    ``(assignments [N] int32, centres [C, D])``. Ties go to the lower centre index.
  """
  x = knn.check_embeddings(x, "x")
  n = x.shape[0]
  if not 1 <= num_clusters <= n:
    raise ValueError(f"num_clusters must be between 1 and the number of points ({n}); "
                     f"got {num_clusters}.")
  chunk = max(1, min(chunk, n))
  xp = np.zeros((knn.round_up(n, chunk), x.shape[1]), x.dtype)
  xp[:n] = x
  xp = jnp.asarray(xp)
  if isinstance(init, str):
    if init == "random":
      pick = np.random.default_rng(seed).choice(n, num_clusters, replace=False)
      centres = xp[np.sort(pick)]
    elif init == "kmeans++":
      centres = _kmeans_plus_plus(xp, jax.random.key(seed), num_clusters=num_clusters, n=n)
    else:
      raise ValueError(f"init must be 'random', 'kmeans++' or an array; got {init!r}.")
  else:
    centres = np.asarray(init, x.dtype)
    if centres.shape != (num_clusters, x.shape[1]):
      raise ValueError(f"init centres must have shape {(num_clusters, x.shape[1])}; got "
                       f"{centres.shape}.")
    centres = jnp.asarray(centres)
  assign, centres, _ = _lloyd(xp, centres, n=n, max_iters=int(max_iters), chunk=chunk,
                              precision=precision)
  return np.asarray(assign)[:n], np.asarray(centres)


def normalized_mutual_information(labels_true, labels_pred) -> float:
  """NMI with the arithmetic-mean normalisation: ``I(U; V) / ((H(U) + H(V)) / 2)``.

  1.0 when both labelings put everything in one cluster (nothing to disagree on).
  """
  u = np.unique(np.asarray(labels_true), return_inverse=True)[1].reshape(-1)
  v = np.unique(np.asarray(labels_pred), return_inverse=True)[1].reshape(-1)
  if u.shape != v.shape:
    raise ValueError(f"labels_true and labels_pred differ in length: {u.size} vs {v.size}.")
  n = u.size
  joint = np.unique(u.astype(np.int64) * (v.max() + 1) + v, return_counts=True)[1]
  pu, pv, puv = np.bincount(u) / n, np.bincount(v) / n, joint / n
  h = lambda p: float(-np.sum(p * np.log(p)))
  hu, hv = h(pu), h(pv)
  if hu == 0.0 and hv == 0.0:
    return 1.0
  mi = hu + hv - h(puv)
  return float(max(0.0, mi) / ((hu + hv) / 2))


def clustering_metrics(emb, labels, *, num_clusters: int | None = None, seed: int = 0,
                       init: str = "random", max_iters: int = 100) -> dict:
  """``{"nmi": ...}``: k-means of the embeddings into as many clusters as labels."""
  labels = np.asarray(labels)
  num_clusters = num_clusters or int(np.unique(labels).size)
  assign, _ = kmeans(emb, num_clusters, seed=seed, init=init, max_iters=max_iters)
  return {"nmi": normalized_mutual_information(labels, assign)}


# ------------------------------------------------------------------- the entry point


def _to_host(x):
  if isinstance(x, jax.Array):
    return knn.fetch(x)
  return np.asarray(x)


def embed(embed_fn: Callable[[Any], Any], batches: Iterable[Mapping[str, Any]]):
  """Embeds an evaluation split: every real image once, in order.

  Args:
    embed_fn: images ``[b, H, W, 3]`` -> embeddings ``[b, D]`` (the model in eval mode,
      typically jitted; it may return a sharded ``jax.Array``).
    batches: the eval pipeline's batches, mappings with ``image``, ``label`` and
      ``mask`` (False on the padding that fills the last batch; optional).

  Returns:
    ``(embeddings [N, D] float32, labels [N])`` as NumPy arrays on every process.
  """
  embs, labels = [], []
  for i, batch in enumerate(batches):
    missing = {"image", "label"} - set(batch)
    if missing:
      raise ValueError(f"eval batch {i} lacks {sorted(missing)}; an eval batch is a "
                       "mapping with 'image', 'label' and (for padding) 'mask'.")
    e = _to_host(embed_fn(batch["image"]))
    y = _to_host(batch["label"])
    m = _to_host(batch["mask"]).astype(bool) if "mask" in batch else np.ones(len(y), bool)
    if not len(e) == len(y) == len(m):
      raise ValueError(f"eval batch {i}: {len(e)} embeddings for {len(y)} labels and "
                       f"{len(m)} mask entries.")
    embs.append(np.asarray(e, np.float32)[m])
    labels.append(y[m])
  if not embs:
    raise ValueError("the eval split yielded no batches; check the dataset path and split.")
  return np.concatenate(embs), np.concatenate(labels)


_TABLE_ORDER = ("recall@", "precision@1", "r_precision", "map@r", "nmi")


def format_table(metrics: Mapping[str, Any], title: str | None = None) -> str:
  """The metrics as a Markdown table, in percent (as papers report them)."""
  rank = lambda k: next((i for i, p in enumerate(_TABLE_ORDER) if k.startswith(p)), 99)
  recall_k = lambda k: int(k.split("@")[1]) if k.startswith("recall@") else 0
  keys = sorted((k for k, v in metrics.items()
                 if rank(k) < 99 and isinstance(v, (int, float))),
                key=lambda k: (rank(k), recall_k(k)))
  lines = [f"**{title}**", ""] if title else []
  lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
            "| " + " | ".join(f"{100 * metrics[k]:.2f}" for k in keys) + " |"]
  return "\n".join(lines)


def write_json(path, payload: Mapping[str, Any]):
  """Writes JSON to a local or ``gs://`` path, replacing any old file only when complete."""
  write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")  # fails first


def write_text(path, text: str):
  """Writes ``text`` to a local or ``gs://`` path through a temporary file beside it, so
  a reader never sees half a file and an older one is replaced only when complete."""
  from etils import epath
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
  tmp.write_text(text)
  tmp.replace(path)  # over an older file: a finished run resumed, or evaluated again


def evaluate(embed_fn: Callable[[Any], Any], query_batches: Iterable[Mapping[str, Any]],
             gallery_batches: Iterable[Mapping[str, Any]] | None = None, *,
             ks: Sequence[int] = (1, 2, 4, 8), nmi: bool = False, seed: int = 0,
             json_path=None, extra: Mapping[str, Any] | None = None,
             mesh: Mesh | None = None, title: str | None = None,
             print_fn: Callable[[str], None] | None = print) -> dict:
  """Embeds an eval split (query, and gallery for In-Shop), computes every metric, prints
  a table and optionally writes JSON. This is what ``msjax.main --mode eval`` runs.

  Args:
    embed_fn, query_batches, gallery_batches: as in ``embed``.
    ks: Recall@K list (``DATASET_KS[dataset]``).
    nmi: also cluster the query embeddings (k-means, as many clusters as labels).
    seed: the k-means seed.
    json_path: where to write the metrics (local or ``gs://``); merged with ``extra``
      (e.g. ``{"step": ...}``).
    mesh: devices for the retrieval pass.
    title, print_fn: the table's heading, and where it goes (None: not printed).

  Returns:
    The metrics dict of ``retrieval_metrics`` (plus ``nmi``), with ``extra``.
  """
  ks = _check_ks(ks)
  q_emb, q_labels = embed(embed_fn, query_batches)
  if gallery_batches is not None:
    g_emb, g_labels = embed(embed_fn, gallery_batches)
  else:
    g_emb = g_labels = None
  metrics = retrieval_metrics(q_emb, q_labels, g_emb, g_labels, ks=ks, mesh=mesh)
  if nmi:
    metrics.update(clustering_metrics(q_emb, q_labels, seed=seed))
  metrics.update(extra or {})
  if print_fn is not None and jax.process_index() == 0:
    print_fn(format_table(metrics, title))
  if json_path is not None and jax.process_index() == 0:
    write_json(json_path, metrics)
  return metrics
