"""msjax.knn.top_k against a float64 brute-force stable sort; 8 devices against one."""

import jax.numpy as jnp
import numpy as np
import pytest

from msjax import knn
from scripts_run import run_json_script


def brute_force(q, g, k):
  """Each query's k best gallery rows by float64 inner product, ties to the lower row."""
  s = np.asarray(q, np.float64) @ np.asarray(g, np.float64).T
  order = np.stack([np.lexsort((np.arange(len(g)), -row))[:k] for row in s])
  return order, np.take_along_axis(s, order, axis=1)


def lattice(rng, n, d):
  """Embeddings whose float32 inner products are exact: many exact ties."""
  return (rng.integers(-2, 3, (n, d)) / 4.0).astype(np.float32)


def test_top_indices_match_a_stable_sort():
  rng = np.random.default_rng(0)
  for n, k in [(1000, 1), (1000, 3), (5000, 7), (65, 65), (600, 9)]:
    values = rng.integers(0, 6, size=(13, n)).astype(np.float32)  # heavy ties
    values[0] = -np.inf
    values[1, :] = 2.0
    got = np.asarray(knn.top_indices(jnp.asarray(values), k))
    for row, want_row in zip(got, values):
      order = np.lexsort((np.arange(n), -want_row))[:k]
      np.testing.assert_array_equal(row, np.sort(order))


@pytest.mark.parametrize("nq, ng, d, k, tile", [
    (5, 37, 4, 5, 8),        # several column tiles, the last one partial
    (70, 300, 6, 10, 64),    # several row tiles too
    (33, 33, 3, 33, 8),      # k = the whole gallery
    (1, 1, 2, 1, None),      # one query, one item
    (40, 2000, 5, 1, None),  # the default tile
])
def test_top_k_equals_a_stable_brute_force_sort(nq, ng, d, k, tile):
  rng = np.random.default_rng(nq + ng)
  q, g = lattice(rng, nq, d), lattice(rng, ng, d)
  if ng > 8:
    g[7] = g[3]    # exact duplicates in the collection tie: the lower row first
    q[0] = g[5]    # a query that is in the collection finds itself
  got = knn.top_k(q, g, k, tile_size=tile)
  want_i, want_s = brute_force(q, g, k)
  np.testing.assert_array_equal(got.indices, want_i)
  np.testing.assert_array_equal(got.similarities, want_s.astype(np.float32))
  assert got.indices.dtype == np.int64 and got.similarities.dtype == np.float32


@pytest.mark.parametrize("group", [8, 32, 64])
def test_every_group_size_gives_the_same_neighbours(group):
  rng = np.random.default_rng(group)
  q, g = lattice(rng, 20, 4), lattice(rng, 301, 4)  # 301: the last group mixes padding
  got = knn.top_k(q, g, 9, tile_size=64, group=group)
  want_i, want_s = brute_force(q, g, 9)
  np.testing.assert_array_equal(got.indices, want_i)
  np.testing.assert_array_equal(got.similarities, want_s.astype(np.float32))


def test_random_unit_vectors_within_float32_rounding():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(50, 32))
  g = rng.normal(size=(500, 32))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  got = knn.top_k(q.astype(np.float32), g.astype(np.float32), 20, tile_size=128)
  want_i, want_s = brute_force(q, g, 20)
  np.testing.assert_allclose(got.similarities, want_s, atol=2e-6)
  # Each returned item is the one of that rank, up to float32 rounding of a near-tie:
  # its exact similarity is the exact k-th best's, and most ranks are the very item.
  exact = np.take_along_axis(q @ g.T, got.indices, axis=1)
  np.testing.assert_allclose(exact, want_s, atol=2e-6)
  assert (got.indices == want_i).mean() > 0.95


def test_the_query_itself_is_found_first():
  rng = np.random.default_rng(1)
  g = rng.normal(size=(100, 16)).astype(np.float32)
  g /= np.linalg.norm(g, axis=1, keepdims=True)
  got = knn.top_k(g[[10, 42]], g, 3, tile_size=16)
  assert got.indices[:, 0].tolist() == [10, 42]
  np.testing.assert_allclose(got.similarities[:, 0], 1.0, atol=1e-6)


@pytest.mark.parametrize("args, message", [
    ((np.ones((3, 4)), np.ones((5, 3)), 2), "dimension 4 but gallery_emb has 3"),
    ((np.ones((3, 4)), np.ones((5, 4)), 6), "between 1 and the gallery size 5"),
    ((np.ones((3, 4)), np.ones((5, 4)), 0), "between 1 and the gallery size 5"),
    ((np.full((3, 4), np.nan), np.ones((5, 4)), 1), "query_emb has 3 row"),
    ((np.ones((3,)), np.ones((5, 4)), 1), "query_emb must be a non-empty"),
])
def test_bad_input_names_the_problem(args, message):
  with pytest.raises(ValueError, match=message):
    knn.top_k(*args)


def test_eight_devices_equal_one_bit_for_bit():
  r = run_json_script("knn_check.py", timeout=600)
  assert r["devices"] == 8 and not r["full_matrix_in_hlo"]
  for case in r["cases"]:
    want_i, want_s = brute_force(case["q"], case["g"], case["k"])
    for mesh in ("one", "eight", "four_by_two"):
      np.testing.assert_array_equal(case[f"{mesh}_indices"], want_i, err_msg=mesh)
      np.testing.assert_array_equal(case[f"{mesh}_sims"], want_s, err_msg=mesh)
