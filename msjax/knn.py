"""Exact nearest neighbours by inner product, in tiles, on every device of a mesh.

This is the engine that retrieval evaluation (``msjax.evaluate``) and search
(``msjax.search``) share: nothing forms the ``[N_query, N_gallery]`` similarity matrix.
The matrix is cut into ``tile × tile`` blocks; the blocks are dealt round-robin to the
devices of a mesh (``pair_schedule``), each device computes its blocks with one matmul
each and keeps what its caller needs of them, and the devices' results are combined.
Embeddings are L2-normalised by the model's head, so the inner product is the cosine
similarity.

``top_k`` finds, for every query, the ``k`` most similar gallery items in two stages.
The pass over the blocks keeps only the maxima of groups of ``group`` consecutive gallery
items (a reduction as cheap as reading the block); each query's top k lie in the k groups
with the highest maxima, whose members are then scored again and sorted. The result is
exact: ties go to the lower gallery index (a stable sort), the same on any number of
devices and tile sizes, and exact duplicates tie bit for bit. (Only two *different*
similarities within float rounding of each other, ~1e-7, may be ordered differently by
the rescoring than by the blocks' matmul.) Memory per device is
O(tile² + (N_query + N_gallery)·D + N_query·N_gallery/group), the last term kept within
1 GiB by the choice of ``group``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DEFAULT_TILE_SIZE = 1024


# --------------------------------------------------------------------- the mesh, placing


def default_mesh() -> Mesh:
  """Every device, on one axis."""
  return Mesh(np.asarray(jax.devices()), ("eval",))


def mesh_axis(mesh: Mesh):
  """The axis name (or names) that ``shard_map`` shards over: all of the mesh's."""
  return mesh.axis_names if len(mesh.axis_names) > 1 else mesh.axis_names[0]


def put(x, sharding):
  """Places a host array that every process holds in full."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def fetch(x) -> np.ndarray:
  """A device array as one NumPy array on every process."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def pair_schedule(num_row_tiles, num_col_tiles, symmetric, num_devices) -> np.ndarray:
  """Tile pairs ``(row tile, column tile, active)`` dealt round-robin to the devices:
  ``[num_devices, pairs per device, 3]``.

  Row-major order, on and above the diagonal when the matrix is symmetric (the queries
  search each other); devices with fewer pairs get inactive ones. Within a device a row
  tile's column tiles come in increasing order.
  """
  if symmetric:
    pairs = [(i, j) for i in range(num_row_tiles) for j in range(i, num_col_tiles)]
  else:
    pairs = [(i, j) for i in range(num_row_tiles) for j in range(num_col_tiles)]
  per = -(-len(pairs) // num_devices)
  table = np.zeros((num_devices, per, 3), np.int32)
  for n, (i, j) in enumerate(pairs):
    table[n % num_devices, n // num_devices] = (i, j, 1)
  return table


def group_size(tile: int, rows: int, cols: int, requested: int | None = None,
               budget: int = 1 << 30) -> int:
  """Columns per group of the top-k pre-selection: a power of two dividing the tile.

  The table of group maxima is ``rows × cols/group`` per device; the smallest group (at
  least 8) that keeps it within ``budget`` bytes, so rescoring stays a small fraction of
  the work.
  """
  if requested is not None:
    if requested < 1 or tile % requested:
      raise ValueError(f"group_size must divide the tile size {tile}; got {requested}.")
    return int(requested)
  group = 8
  while group < tile and rows * (cols // group) * 4 > budget:
    group *= 2
  while tile % group:
    group //= 2
  return group


def group_max(block, col0, *, group, num_cols, axis):
  """Maxima of ``group`` consecutive gallery items, per query: ``[queries, items/group]``.

  ``axis=1``: the rows of ``block`` are the queries; ``axis=0``: its columns are (the
  block read transposed, without materialising the transpose). Groups made only of
  padding are -inf. Nothing else is masked, element by element, to keep this pass as
  cheap as a reduction: the query itself and the padding that shares a group with real
  items may be a group's maximum, and the selection takes one extra group for each.
  """
  n_rows, n_cols = (block.shape if axis == 1 else block.shape[::-1])
  if axis == 1:
    maxima = block.reshape(n_rows, n_cols // group, group).max(axis=2)
  else:
    maxima = block.reshape(n_cols // group, group, n_rows).max(axis=1).T
  first = col0 + group * jnp.arange(n_cols // group, dtype=jnp.int32)
  return jnp.where(first[None, :] < num_cols, maxima, -jnp.inf)


# ------------------------------------------------------------------------------ top k


class Neighbours(NamedTuple):
  """Each query's ``k`` most similar gallery items, most similar first.

  Attributes:
    indices: ``[N_query, k]`` int64 gallery rows; among equal similarities the lower
      index comes first.
    similarities: ``[N_query, k]`` their inner products with the query (float32, or
      float64 for float64 inputs with x64 enabled).
  """
  indices: np.ndarray
  similarities: np.ndarray


def top_indices(values, k: int, fan_in: int = 8):
  """Indices, ascending, of the ``k`` largest entries of each row of ``values`` (ties:
  the lower index first).

  ``top_k`` costs about the same per element whatever k is, so long rows are first cut
  down through maxima of ``fan_in`` consecutive entries: the top k entries always lie in
  the k super-groups with the largest maxima (each of those holds an entry ranked before
  any entry of an unselected one, ties included, since groups are runs of consecutive
  indices), so selecting on the maxima and then among their members is exact.
  """
  rows, n = values.shape
  k = min(k, n)
  if n > 64 * k:
    pad = -n % fan_in
    padded = jnp.pad(values, ((0, 0), (0, pad)), constant_values=-jnp.inf)
    supers = top_indices(padded.reshape(rows, -1, fan_in).max(axis=2), k, fan_in)
    members = (supers[:, :, None] * fan_in
               + jnp.arange(fan_in, dtype=jnp.int32)).reshape(rows, -1)
    _, at = jax.lax.top_k(jnp.take_along_axis(padded, members, axis=1), k)
    return jnp.sort(jnp.take_along_axis(members, at, axis=1), axis=1)
  _, at = jax.lax.top_k(values, k)
  return jnp.sort(at.astype(jnp.int32), axis=1)


def top_k_from_group_maxima(queries, gallery, table, k, *, group, num_gallery,
                            exclude=None, precision=jax.lax.Precision.HIGHEST):
  """Each query's top ``k`` gallery items, from its row of group maxima.

  The top k lie in the k groups with the highest maxima (ties: the lower group first;
  see ``top_indices``), plus one group for the query itself (``exclude``: each query's
  own gallery index, when queries search each other) and one for a group that padding
  shares with real items, either of which may have lent a group its maximum. The members
  of those groups, in increasing index, are scored again, one matrix-vector product per
  query, and the top k of them taken: ties go to the lower index.

  Args:
    queries: ``[n, D]``; ``gallery``: at least ``num_gallery`` rows of ``D``.
    table: ``[n, cols / group]`` group maxima (``group_max``).
  Returns:
    ``(indices [n, k] int32, similarities [n, k])``.
  """
  n, d = queries.shape
  extra = int(exclude is not None) + int(num_gallery % group != 0)
  groups = top_indices(table, k + extra)
  cand = (groups[:, :, None] * group + jnp.arange(group, dtype=jnp.int32)).reshape(n, -1)
  ok = cand < num_gallery
  if exclude is not None:
    ok = ok & (cand != exclude[:, None])
  neg_inf = jnp.array(-jnp.inf, queries.dtype)

  def top(args):
    q, index, ok = args
    sims = jnp.einsum("d,cd->c", q, gallery[jnp.clip(index, 0, gallery.shape[0] - 1)],
                      precision=precision)
    value, at = jax.lax.top_k(jnp.where(ok, sims, neg_inf), k)
    return index[at], value

  # Rescoring gathers [chunk, candidates, D] embeddings: a few MiB, to stay in cache.
  chunk = max(1, min(16, (1 << 20) // (cand.shape[1] * d)))
  return jax.lax.map(top, (queries, cand, ok), batch_size=chunk)


def _top_k_kernel(query, gallery, tail, schedule, *, axis, devices, tile, group, k, cols,
                  num_gallery, precision):
  """Runs on one device inside shard_map; ``schedule`` is this device's tile pairs, the
  embeddings are replicated. The query array is longer than the schedule's row tiles by
  the padding that makes it divide among the devices; the gallery is not padded (a
  padded copy of a large collection would double its memory): ``tail`` is its last
  tile, zero-padded. One pass over the blocks keeps the maxima of groups of ``group``
  gallery items; then each device finishes its slice of the queries."""
  last = (cols // tile - 1) * tile

  def step(table, pair):
    i, j, active = pair[0] * tile, pair[1] * tile, pair[2] > 0
    # A slice running past the gallery's end would be moved back to fit: the last
    # tile comes from ``tail`` instead.
    columns = jnp.where(j == last, tail, jax.lax.dynamic_slice_in_dim(
        gallery, jnp.minimum(j, max(num_gallery - tile, 0)), tile))
    block = jnp.dot(jax.lax.dynamic_slice_in_dim(query, i, tile), columns.T,
                    precision=precision)
    m = group_max(block, j, group=group, num_cols=num_gallery, axis=1)
    old = jax.lax.dynamic_slice(table, (i, j // group), m.shape)
    return jax.lax.dynamic_update_slice(table, jnp.where(active, m, old),
                                        (i, j // group)), None

  table, _ = jax.lax.scan(step, jnp.zeros((query.shape[0], cols // group), query.dtype),
                          schedule[0])
  local = query.shape[0] // devices
  if devices > 1:  # every entry was written by one device (the others hold 0): a sum
    table = jax.lax.psum_scatter(table, axis, scatter_dimension=0, tiled=True)
  local_q = jax.lax.dynamic_slice_in_dim(query, jax.lax.axis_index(axis) * local, local)
  return top_k_from_group_maxima(local_q, gallery, table, k, group=group,
                                 num_gallery=num_gallery, precision=precision)


@functools.lru_cache(maxsize=32)
def _compiled_top_k(mesh, axis, **static):
  kernel = jax.shard_map(functools.partial(_top_k_kernel, axis=axis, **static), mesh=mesh,
                         in_specs=(P(), P(), P(), P(axis)), out_specs=(P(axis), P(axis)),
                         check_vma=False)
  return jax.jit(kernel)


def check_embeddings(x, name: str) -> np.ndarray:
  """``x`` as a finite ``[N, D]`` float array (float32, or float64 with x64 enabled);
  a ``ValueError`` naming ``name`` otherwise."""
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} must be a non-empty [N, D] array of embeddings; got shape "
                     f"{x.shape}.")
  if not (np.issubdtype(x.dtype, np.floating) or x.dtype == jnp.bfloat16):
    raise ValueError(f"{name} must hold floating-point embeddings; got dtype {x.dtype}.")
  bad = ~np.isfinite(x.astype(np.float32) if x.dtype == jnp.bfloat16 else x).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)
    raise ValueError(
        f"{name} has {rows.size} row(s) with NaN or inf (first: row {rows[0]}); the model "
        "produced non-finite embeddings, so no ranking is defined. Check the checkpoint "
        "or the training loss for divergence.")
  dtype = np.float64 if (x.dtype == np.float64 and jax.config.jax_enable_x64) else np.float32
  return x.astype(dtype, copy=False)


def top_k(query_emb, gallery_emb, k: int, *, tile_size: int | None = None,
          mesh: Mesh | None = None, precision=jax.lax.Precision.HIGHEST,
          group: int | None = None) -> Neighbours:
  """The ``k`` gallery items most similar to each query (inner product), exactly.

  Args:
    query_emb: ``[Nq, D]`` queries (NumPy or JAX; every process passes all).
    gallery_emb: ``[Ng, D]`` the collection searched. A query that is also in the
      collection finds itself (similarity 1 for unit vectors).
    k: neighbours per query, ``1 <= k <= Ng``.
    tile_size: the side of the similarity blocks (default 1024, less for small sets).
    mesh: the devices that share the blocks; default every device, on one axis.
    precision: matmul precision; HIGHEST (default) keeps float32 similarities exact on
      TPU and GPU, whose default would round them to bfloat16 or TF32.
    group: gallery items per group of the pre-selection (a power of two dividing
      the tile); default: the smallest (at least 8) that keeps the per-device table of
      group maxima, ``N_query × N_gallery / group`` floats, within 1 GiB.

  Returns:
    ``Neighbours(indices, similarities)``, ``[Nq, k]`` each, most similar first, ties
    broken by the lower gallery index.
  """
  q = check_embeddings(query_emb, "query_emb")
  g = check_embeddings(gallery_emb, "gallery_emb")
  if g.shape[1] != q.shape[1]:
    raise ValueError(f"query_emb has dimension {q.shape[1]} but gallery_emb has "
                     f"{g.shape[1]}; both must come from the same model.")
  dtype = np.result_type(q, g)
  nq, ng = q.shape[0], g.shape[0]
  if not 1 <= k <= ng:
    raise ValueError(f"k must be between 1 and the gallery size {ng}; got {k}.")
  tile = int(tile_size or DEFAULT_TILE_SIZE)
  if tile < 1:
    raise ValueError(f"tile_size must be positive; got {tile_size}.")
  tile = min(tile, round_up(max(nq, ng), 8))
  mesh = mesh or default_mesh()
  axis, devices = mesh_axis(mesh), mesh.size
  rows = round_up(nq, tile)                  # queries, in whole tiles
  padded = round_up(rows, devices)           # ... and dividing among the devices
  cols = round_up(ng, tile)
  query = np.zeros((padded, q.shape[1]), dtype)
  query[:nq] = q
  tail = np.zeros((tile, g.shape[1]), dtype)  # the last gallery tile, zero-padded
  tail[:ng - (cols - tile)] = g[cols - tile:]
  schedule = pair_schedule(rows // tile, cols // tile, False, devices)
  group = group_size(tile, padded, cols, group)
  kernel = _compiled_top_k(mesh, axis, devices=devices, tile=tile, group=group, k=int(k),
                           cols=cols, num_gallery=ng, precision=precision)
  replicated = NamedSharding(mesh, P())
  # A gallery smaller than one tile is the tail alone (a tile cannot be sliced from it).
  gallery = g.astype(dtype, copy=False) if ng >= tile else tail
  indices, values = kernel(put(query, replicated), put(gallery, replicated),
                           put(tail, replicated), put(schedule, NamedSharding(mesh, P(axis))))
  return Neighbours(fetch(indices)[:nq].astype(np.int64), fetch(values)[:nq])
