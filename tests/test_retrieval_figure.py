"""Retrieval examples (``analysis.retrieval_examples``) and their figure: the neighbours
are a brute-force stable sort, the worst queries really rank their first positive
lowest, and the frames are green exactly where the labels match."""

import numpy as np
import pytest
from matplotlib import colors

import data_fixtures as fx
from msjax import analysis, embed, plot, sharding, train
from msjax import data as data_lib
from test_train import _config, _tiny


def _exact_embeddings(n, dim, num_classes, seed):
  """Rows of small multiples of 1/4: every inner product is exact in float32, so the
  brute force below sees the very similarities the device does, exact ties included.
  Some rows are copies of others (of the same and of other classes)."""
  rng = np.random.default_rng(seed)
  emb = rng.integers(-3, 4, size=(n, dim)).astype(np.float32) / 4
  labels = rng.integers(0, num_classes, size=n)
  emb[5] = emb[3]              # a duplicate that ties with an earlier row
  emb[9] = emb[n // 2]
  labels[9] = labels[n // 2] + 1  # ... of another class
  return emb, labels


def _brute_force(q, ql, g, gl, symmetric):
  """Every query's ranking (similarity descending, the lower index first among equal
  ones, itself left out) and the 0-based rank of its first positive (-1 if none)."""
  sim = q.astype(np.float64) @ g.astype(np.float64).T
  orders, first = [], []
  for i in range(len(q)):
    order = np.argsort(-sim[i], kind="stable")
    if symmetric:
      order = order[order != i]
    hits = np.flatnonzero(gl[order] == ql[i])
    orders.append(order)
    first.append(hits[0] if hits.size else -1)
  return np.asarray(orders), np.asarray(first), sim


@pytest.mark.parametrize("symmetric", [True, False])
def test_neighbours_and_worst_queries_match_a_brute_force_ranking(symmetric):
  emb, labels = _exact_embeddings(60, 6, 7, seed=1)
  if symmetric:
    q, ql, g, gl = emb, labels, emb, labels
    gallery = ()
  else:  # a separate gallery; queries of class 9 have no positive there
    q, ql, g, gl = emb[:25], labels[:25].copy(), emb[25:], labels[25:]
    ql[::6] = 9
    gallery = (g, gl)
  k = 6
  ex = analysis.pick_retrieval_examples(q, ql, *gallery, num_random=5, num_worst=4, k=k,
                                        seed=3, split="test")
  orders, first, sim = _brute_force(q, ql, g, gl, symmetric)

  assert ex.neighbour_index.shape == ex.similarity.shape == (9, k)
  np.testing.assert_array_equal(ex.neighbour_index, orders[ex.query_index, :k])
  np.testing.assert_array_equal(ex.first_positive, first[ex.query_index])
  np.testing.assert_array_equal(ex.neighbour_label, gl[ex.neighbour_index])
  np.testing.assert_array_equal(ex.query_label, ql[ex.query_index])
  np.testing.assert_allclose(
      ex.similarity, np.take_along_axis(sim[ex.query_index], ex.neighbour_index, axis=1))
  if symmetric:
    assert not (ex.neighbour_index == ex.query_index[:, None]).any()
  assert ex.symmetric == symmetric and ex.num_gallery == len(g) - symmetric

  # The worst: the largest first-positive ranks, the lower index first among equal ones;
  # queries without a positive are never chosen.
  valid = np.flatnonzero(first >= 0)
  want = valid[np.lexsort((valid, -first[valid]))][:4]
  assert list(ex.kind) == ["random"] * 5 + ["worst"] * 4
  np.testing.assert_array_equal(ex.query_index[ex.kind == "worst"], want)
  drawn = ex.query_index[ex.kind == "random"]
  assert (np.diff(drawn) > 0).all() and not np.isin(drawn, want).any()
  assert (first[ex.query_index] >= 0).all()
  if not symmetric:
    assert (first == -1).any()
  # Where the first positive is shown, it is the first green neighbour.
  for r in range(len(ex.kind)):
    if ex.first_positive[r] < k:
      assert np.flatnonzero(ex.matches[r])[0] == ex.first_positive[r]
    else:
      assert not ex.matches[r].any()

  again = analysis.pick_retrieval_examples(q, ql, *gallery, num_random=5, num_worst=4,
                                           k=k, seed=3)
  np.testing.assert_array_equal(again.query_index, ex.query_index)
  other = analysis.pick_retrieval_examples(q, ql, *gallery, num_random=5, num_worst=4,
                                           k=k, seed=4)
  assert not np.array_equal(other.query_index, ex.query_index)


def test_fewer_queries_with_a_positive_than_asked_for_and_duplicates_of_the_query():
  emb, _ = _exact_embeddings(12, 4, 3, seed=2)
  labels = np.arange(12)
  labels[[2, 7, 10]] = 100  # three queries of one class: the only ones with a positive
  # ... and identical, the vector no other row beats: each ties with the others and
  # itself at the top of its ranking.
  emb[[2, 7, 10]] = 0.75
  ex = analysis.pick_retrieval_examples(emb, labels, num_random=4, num_worst=2, k=3)
  assert sorted(ex.query_index) == [2, 7, 10] and list(ex.kind).count("worst") == 2
  orders, first, _ = _brute_force(emb, labels, emb, labels, symmetric=True)
  np.testing.assert_array_equal(ex.neighbour_index, orders[ex.query_index, :3])
  assert (ex.first_positive == 0).all()
  row = list(ex.query_index).index(10)  # its duplicates rank before it: dropped in place
  assert list(ex.neighbour_index[row, :2]) == [2, 7]


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=12), "k must be between 1 and the 11 items"),
    (dict(k=0), "k must be between 1"),
    (dict(num_random=0, num_worst=0), "nothing to show"),
    (dict(num_worst=-1), "num_worst must be >= 0"),
])
def test_bad_arguments_are_named(kwargs, message):
  emb, labels = _exact_embeddings(12, 4, 3, seed=2)
  with pytest.raises(ValueError, match=message):
    analysis.pick_retrieval_examples(emb, labels, **kwargs)


def _color(c):
  return colors.to_hex(c, keep_alpha=False)


@pytest.mark.parametrize("with_images", [True, False])
def test_figure_frames_green_exactly_where_labels_match(with_images):
  emb, labels = _exact_embeddings(60, 6, 7, seed=1)
  k = 4
  ex = analysis.pick_retrieval_examples(emb, labels, num_random=3, num_worst=2, k=k)
  assert ex.matches.any() and not ex.matches.all()
  if with_images:
    rng = np.random.default_rng(0)
    ex.images = rng.integers(0, 256, size=(len(ex.kind), k + 1, 8, 8, 3), dtype=np.uint8)
  fig = plot.retrieval_figure(ex, title="test")
  assert len(fig.axes) == len(ex.kind) * (k + 1)
  green, red = _color(plot.POS_COLOR), _color(plot.NEG_COLOR)
  for ax in fig.axes:
    spec = ax.get_subplotspec()
    r, c = spec.rowspan.start, spec.colspan.start
    assert spec.get_gridspec().get_geometry() == (len(ex.kind), k + 1)
    frame = {_color(s.get_edgecolor()) for s in ax.spines.values()}
    if with_images:
      np.testing.assert_array_equal(ax.images[0].get_array(), ex.images[r, c])
    else:
      assert not ax.images
    if c == 0:  # the query: neither green nor red, and the row says what it is
      assert not frame & {green, red}
      kind = "random query" if ex.kind[r] == "random" else "failure"
      assert ax.get_ylabel() == f"{kind}\nfirst positive\nat rank {ex.first_positive[r] + 1}"
    else:
      assert frame == {green if ex.matches[r, c - 1] else red}
      assert ax.get_title() == f"#{c}  {ex.similarity[r, c - 1]:.3f}"
  plot._pyplot().close(fig)


# ------------------------------------------------------------------------ on a run


def _untrained_run(config):
  """A ``Run`` of a freshly initialised model (nothing needs training to be ranked)."""
  mesh = sharding.make_mesh()
  dataset = data_lib.load_dataset(config.data)
  tx = train.build_optimizer(config.optim, config.train.num_steps)
  model, state = train.init_state(config, tx, mesh, seed=config.seed)
  return analysis.Run(config, model, state, dataset, mesh, 0)


def test_run_examples_are_the_evaluation_ranking_with_the_images_the_model_saw():
  """Synthetic: the test images search each other; with no resize the eval transform
  is the identity on the 16-px renders."""
  c = _tiny(_config())
  run = _untrained_run(c)
  ex = analysis.retrieval_examples(run, num_random=3, num_worst=2, k=4, seed=1)
  test = run.dataset.test
  e = embed.embed_split(run, test, progress=False)
  want = analysis.pick_retrieval_examples(e.embeddings, e.labels, num_random=3,
                                          num_worst=2, k=4, seed=1)
  for field in ("kind", "query_index", "first_positive", "neighbour_index", "similarity"):
    np.testing.assert_array_equal(getattr(ex, field), getattr(want, field))
  assert ex.split == "test" and ex.symmetric and ex.images.shape == (5, 5, 16, 16, 3)
  for r, row in enumerate(np.concatenate([ex.query_index[:, None], ex.neighbour_index], 1)):
    for col, i in enumerate(row):
      np.testing.assert_array_equal(ex.images[r, col], test.images.read(int(i)))
  np.testing.assert_array_equal(ex.neighbour_class,
                                np.asarray(test.class_names)[test.labels[ex.neighbour_index]])
  with pytest.raises(embed.EmbedError, match="val_fraction"):
    analysis.retrieval_examples(run, split="val")


def test_run_examples_search_inshops_gallery(tmp_path):
  fixture = fx.make_inshop(str(tmp_path), num_items=12, sizes=4)
  c = _tiny(_config())
  c.data.update(dataset="inshop", root=fixture.root, resize_to=16, image_size=16,
                eval_batch_size=8)
  run = _untrained_run(c)
  ex = analysis.retrieval_examples(run, num_random=2, num_worst=2, k=3)
  assert ex.split == "query" and not ex.symmetric
  assert ex.num_gallery == len(fixture.splits["gallery"])
  query, gallery = fixture.splits["query"], fixture.splits["gallery"]
  for r in range(len(ex.kind)):
    assert fx.image_id_of(ex.images[r, 0]) == query[ex.query_index[r]].image_id
    for j, g in enumerate(ex.neighbour_index[r]):
      assert fx.image_id_of(ex.images[r, j + 1]) == gallery[g].image_id
      assert ex.neighbour_class[r, j] == gallery[g].class_name
    assert ex.query_class[r] == query[ex.query_index[r]].class_name
  np.testing.assert_array_equal(ex.matches, ex.neighbour_class == ex.query_class[:, None])
