"""Retrieval metrics against a float64 brute-force ranking; NMI and k-means against loops."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

import oracles
from msjax import evaluate as E
from scripts_run import run_json_script

KEYS = ("recall@1", "recall@2", "recall@4", "recall@8", "precision@1", "r_precision",
        "map@r", "num_queries", "queries_without_positives")


def lattice(rng, n, d=6):
  """Small-integer embeddings: every similarity is exact in float32, and many tie."""
  return rng.integers(-2, 3, size=(n, d)).astype(np.float32)


def gaussian(rng, n, d=6):
  return rng.normal(size=(n, d))  # float64 (tests run with x64): no accidental ties


def labels_with_singletons(rng, n, classes):
  labels = rng.integers(0, classes, size=n)
  labels[: max(1, n // 10)] = 20_000 + np.arange(max(1, n // 10))  # single-image classes
  return labels


def assert_same(got, want):
  assert set(got) == set(want), (got, want)
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12), (k, got, want)


def assert_same_rankings(got, want):
  for field in E.Rankings._fields:
    np.testing.assert_allclose(getattr(got, field), want[field], atol=1e-12, err_msg=field)


CASES = [  # (n queries, n gallery or None, classes, kind, tile, group)
    (37, None, 9, lattice, None, None),
    (37, None, 9, gaussian, 8, 1),
    (120, None, 30, lattice, 16, 4),
    (120, None, 30, gaussian, 16, 8),
    (203, None, 7, lattice, 32, 16),   # big classes: R up to ~40
    (64, 90, 12, lattice, 16, 2),      # query vs gallery (In-Shop)
    (64, 90, 12, gaussian, None, None),
    (150, 41, 20, lattice, 8, 8),      # queries outnumber the gallery
    (9, 300, 3, gaussian, 32, 4),
]


@pytest.mark.parametrize("nq,ng,classes,kind,tile,group", CASES)
def test_metrics_and_rankings_equal_brute_force(nq, ng, classes, kind, tile, group):
  rng = np.random.default_rng(nq * 1000 + (ng or 0) + classes)
  q = kind(rng, nq)
  ql = labels_with_singletons(rng, nq, classes)
  g = gl = None
  if ng is not None:
    g = kind(rng, ng)
    gl = rng.integers(0, classes + 2, size=ng)  # some query classes absent from gallery
    g[:5] = q[:5]  # exact duplicates across the two sets
  else:
    q[-4:] = q[:4]  # exact duplicates within the set
  want, per_query = oracles.retrieval(q, ql, g, gl)
  got = E.retrieval_metrics(q, ql, g, gl, tile_size=tile, group_size=group)
  assert_same(got, want)
  assert_same_rankings(E.retrieval_rankings(q, ql, g, gl, tile_size=tile, group_size=group),
                       per_query)


def test_all_equal_embeddings_rank_by_index():
  """Every similarity ties: each query's ranking is the gallery in index order."""
  q = np.ones((10, 4), np.float32)
  labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1, 0])
  want, per_query = oracles.retrieval(q, labels, ks=(1, 2, 3))
  got = E.retrieval_metrics(q, labels, ks=(1, 2, 3), tile_size=8, group_size=2)
  assert_same(got, want)
  # Query 0's others in order: 1(1) 2(0) ... -> its first positive is at position 1.
  assert E.retrieval_rankings(q, labels, tile_size=8).first_positive[0] == 1


def test_large_k_and_few_positives_use_the_coarse_selection():
  """Classes of two (R=1) over many groups: the group selection recurses (>64k groups)."""
  rng = np.random.default_rng(3)
  n = 700
  labels = np.repeat(np.arange(n // 2), 2)
  q = lattice(rng, n, d=5)
  want, per_query = oracles.retrieval(q, labels, ks=(1, 5, 50, 1000))
  got = E.retrieval_metrics(q, labels, ks=(1, 5, 50, 1000), tile_size=64, group_size=1)
  assert_same(got, want)
  assert_same_rankings(E.retrieval_rankings(q, labels, tile_size=64, group_size=1),
                       per_query)


def test_string_labels_and_float32_jax_inputs():
  rng = np.random.default_rng(5)
  q = lattice(rng, 40)
  labels = np.array([f"class-{i % 7}" for i in range(40)])
  want, _ = oracles.retrieval(q, labels)
  assert_same(E.retrieval_metrics(jnp.asarray(q), labels), want)


def test_bfloat16_embeddings_are_ranked_in_float32():
  rng = np.random.default_rng(6)
  q = lattice(rng, 30)
  labels = rng.integers(0, 5, 30)
  want, _ = oracles.retrieval(q, labels)
  assert_same(E.retrieval_metrics(jnp.asarray(q, jnp.bfloat16), labels), want)


def test_recall_at_k_larger_than_gallery_and_every_k_costs_one_pass():
  rng = np.random.default_rng(7)
  q = gaussian(rng, 25)
  labels = rng.integers(0, 4, 25)
  ks = (1, 3, 24, 1000)
  want, _ = oracles.retrieval(q, labels, ks=ks)
  got = E.retrieval_metrics(q, labels, ks=ks)
  assert_same(got, want)
  assert got["recall@1000"] == 1.0


def test_perfect_and_worst_embeddings():
  labels = np.repeat(np.arange(4), 3)
  perfect = np.eye(4)[labels]
  m = E.retrieval_metrics(perfect, labels)
  assert m["recall@1"] == m["map@r"] == m["r_precision"] == 1.0
  # Each class's members point away from each other: positives always rank last.
  angle = np.linspace(0, 2 * np.pi, 12, endpoint=False)
  worst = np.stack([np.cos(angle), np.sin(angle)], 1)
  labels = np.arange(12) % 3  # members 120 degrees apart, neighbours of other classes
  m = E.retrieval_metrics(worst, labels, ks=(1, 2))
  assert m["recall@1"] == 0.0 and m["recall@2"] == 0.0 and m["map@r"] == 0.0


def test_errors_name_the_problem():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(6, 4))
  labels = np.array([0, 0, 1, 1, 2, 2])
  bad = q.copy()
  bad[3, 1] = np.nan
  with pytest.raises(ValueError, match=r"query_emb has 1 row\(s\) with NaN or inf \(first: row 3\)"):
    E.retrieval_metrics(bad, labels)
  with pytest.raises(ValueError, match="one label per row of query_emb"):
    E.retrieval_metrics(q, labels[:5])
  with pytest.raises(ValueError, match="together"):
    E.retrieval_metrics(q, labels, gallery_emb=q)
  with pytest.raises(ValueError, match="dimension 4 but gallery_emb has 3"):
    E.retrieval_metrics(q, labels, q[:, :3], labels)
  with pytest.raises(ValueError, match="No query has a positive"):
    E.retrieval_metrics(q, np.arange(6))
  with pytest.raises(ValueError, match="No query has a positive"):
    E.retrieval_metrics(q, labels, q, labels + 10)
  with pytest.raises(ValueError, match="ks must be"):
    E.retrieval_metrics(q, labels, ks=(0, 1))
  with pytest.raises(ValueError, match="group_size must divide"):
    E.retrieval_metrics(q, labels, tile_size=8, group_size=3)
  with pytest.raises(ValueError, match="floating-point"):
    E.retrieval_metrics(np.ones((6, 4), np.int32), labels)


# ----------------------------------------------------------------------- clustering


def test_nmi_matches_loop_and_sklearn():
  rng = np.random.default_rng(0)
  for n, a, b in [(50, 3, 4), (200, 10, 10), (31, 1, 5), (20, 20, 3)]:
    u, v = rng.integers(0, a, n), rng.integers(0, b, n)
    got = E.normalized_mutual_information(u, v)
    assert got == pytest.approx(oracles.nmi(list(u), list(v)), abs=1e-12)
    assert got == pytest.approx(normalized_mutual_info_score(u, v), abs=1e-12)
  assert E.normalized_mutual_information([1, 1, 1], [5, 5, 5]) == 1.0
  assert E.normalized_mutual_information([0, 0, 1, 1], ["b", "b", "a", "a"]) == pytest.approx(1.0)


def test_lloyd_matches_a_loop_from_the_same_centres():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(90, 5)) + 3 * rng.normal(size=(6, 5))[rng.integers(0, 6, 90)]
  init = x[[0, 10, 20, 30, 40, 50]]
  want_assign, want_centres = oracles.lloyd(x, init, max_iters=100)
  got_assign, got_centres = E.kmeans(x, 6, init=init, chunk=16)
  np.testing.assert_array_equal(got_assign, want_assign)
  np.testing.assert_allclose(got_centres, want_centres, atol=1e-12)


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_kmeans_recovers_separated_clusters(init):
  rng = np.random.default_rng(2)
  labels = np.repeat(np.arange(8), 12)
  centres = 10 * np.eye(16)[:8]
  x = centres[labels] + 0.1 * rng.normal(size=(96, 16))
  if init == "kmeans++":  # k-means++ seeds one centre per cluster here
    assert E.clustering_metrics(x, labels, init=init, seed=3)["nmi"] == pytest.approx(1.0)
  m = E.clustering_metrics(x, labels, init=init, seed=3)
  assert 0.8 < m["nmi"] <= 1.0 + 1e-12
  again = E.clustering_metrics(x, labels, init=init, seed=3)
  assert again == m  # deterministic for a seed


def test_kmeans_rejects_bad_arguments():
  x = np.zeros((5, 2))
  with pytest.raises(ValueError, match="num_clusters must be between 1 and the number"):
    E.kmeans(x, 6)
  with pytest.raises(ValueError, match="init must be"):
    E.kmeans(x, 2, init="forgy")
  with pytest.raises(ValueError, match=r"init centres must have shape \(2, 2\)"):
    E.kmeans(x, 2, init=np.zeros((3, 2)))


# ------------------------------------------------------------------- entry point


def batches(emb, labels, size):
  """An eval pipeline's batches: fixed size, the last one padded and masked."""
  n = len(emb)
  for s in range(0, n, size):
    e, y = emb[s:s + size], labels[s:s + size]
    pad = size - len(e)
    yield {"image": np.pad(e, ((0, pad), (0, 0)), constant_values=7.0),
           "label": np.pad(y, (0, pad), constant_values=-1),
           "mask": np.arange(size) < len(e)}


def test_evaluate_embeds_every_image_once_and_writes_json(tmp_path):
  rng = np.random.default_rng(4)
  q, ql = gaussian(rng, 45), rng.integers(0, 6, 45)
  g, gl = gaussian(rng, 33), rng.integers(0, 6, 33)
  embed_fn = jax.jit(lambda x: 2.0 * x)  # a "model": scaling does not change rankings
  printed = []
  path = tmp_path / "out" / "metrics.json"
  got = E.evaluate(embed_fn, batches(q, ql, 8), batches(g, gl, 8), ks=(1, 10), nmi=True,
                   json_path=path, extra={"step": 12}, print_fn=printed.append,
                   title="inshop")
  want, _ = oracles.retrieval(q, ql, g, gl, ks=(1, 10))
  for k, v in want.items():
    assert got[k] == pytest.approx(v, abs=1e-6), k
  assert got["step"] == 12 and 0.0 <= got["nmi"] <= 1.0
  assert json.loads(path.read_text()) == pytest.approx(got)
  assert "| recall@1 | recall@10 | precision@1 | r_precision | map@r | nmi |" in printed[0]
  assert f"| {100 * got['recall@1']:.2f} |" in printed[0]


def test_embed_rejects_batches_without_labels():
  with pytest.raises(ValueError, match=r"eval batch 0 lacks \['label'\]"):
    E.embed(lambda x: x, [{"image": np.zeros((2, 3))}])
  with pytest.raises(ValueError, match="no batches"):
    E.embed(lambda x: x, [])


def test_write_json_keeps_the_old_file_when_the_payload_cannot_be_written(tmp_path):
  path = tmp_path / "m.json"
  E.write_json(path, {"recall@1": 0.5})
  with pytest.raises(TypeError):
    E.write_json(path, {"bad": object()})
  assert json.loads(path.read_text()) == {"recall@1": 0.5}


def test_write_json_replaces_an_older_file(tmp_path):
  """A finished run started again, or a second --mode eval, rewrites its results."""
  path = tmp_path / "m.json"
  E.write_json(path, {"recall@1": 0.5})
  E.write_json(path, {"recall@1": 0.75})
  assert json.loads(path.read_text()) == {"recall@1": 0.75}
  assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


# ------------------------------------------------------------------- 8 devices

@pytest.fixture(scope="module")
def sharded_report():
  return run_json_script("evaluate_check.py")


def test_sharded_rankings_equal_one_device_and_brute_force(sharded_report):
  assert sharded_report["devices"] == 8
  assert len(sharded_report["cases"]) == 4
  for case in sharded_report["cases"]:
    assert case["flat"] and case["grid"], case["name"]  # bitwise equal per-query rankings
    assert case["metrics_flat"] == case["metrics_grid"] == case["metrics_one"]
    assert_same(case["metrics_one"], case["oracle"])


def test_sharded_pass_never_forms_the_full_similarity_matrix(sharded_report):
  for case in sharded_report["cases"]:
    if case["tile"] is None:
      continue
    for key in ("dots_flat", "dots_grid"):
      shapes = [tuple(int(v) for v in s.split(",")) for s in case[key]]
      assert (case["tile"], case["tile"]) in shapes, case
      assert all(np.prod(s) < case["nq"] * case["ng"] for s in shapes), case
