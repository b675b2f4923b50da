"""GPW figures and ``python -m msjax.plot``: the plotted points are the loss's pairs;
the proxy losses' sample-to-proxy weights (``analysis.proxy_pair_weights``)."""

import math
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from msjax import analysis, losses, metric_writers, plot, telemetry
from batches import make_batch, unit


def _telemetry_run(workdir, steps=(10, 20, 30), resumed_from=None):
  """A metrics.jsonl as the training loop writes it (with a NaN, and optionally a resume)."""
  with metric_writers.MetricWriter(workdir) as w:
    for step in steps:
      values = {f"gpw/{k}": 0.5 + 0.01 * step for k in telemetry.KEYS}
      values["gpw/pos_weight_mean"] = math.nan if step == steps[0] else 0.3
      w.write_scalars(step, {"train/loss": 1.0 / step, **values})
      w.write_scalars(step, {"test/recall@1": 0.1})
    for step in resumed_from or ():
      w.write_scalars(step, {"train/loss": 2.0, "gpw/neg_mined_fraction": 0.9})


def test_telemetry_records_merge_steps_and_drop_resumed_over_ones(tmp_path):
  _telemetry_run(tmp_path, resumed_from=[20])
  records = analysis.telemetry_records(tmp_path)
  assert [r["step"] for r in records] == [10, 20]  # 30 was overwritten by the resume
  assert records[1] == {"step": 20, "loss": 2.0, "neg_mined_fraction": 0.9}
  assert math.isnan(records[0]["pos_weight_mean"]) and records[0]["loss"] == 0.1


def test_cli_renders_png(tmp_path):
  _telemetry_run(tmp_path / "run")
  out = subprocess.run([sys.executable, "-m", "msjax.plot", "--workdir", str(tmp_path / "run"),
                        "--out", str(tmp_path / "figs")], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr
  path = tmp_path / "figs" / "gpw_telemetry.png"
  assert out.stdout.strip() == str(path)
  with Image.open(path) as im:
    assert im.format == "PNG" and im.size[0] > 800 and im.size[1] > 600


@pytest.mark.parametrize("setup, message", [
    ("missing", "is not an msjax training workdir"),
    ("no_telemetry", "config.train.telemetry=False"),
])
def test_cli_names_what_is_wrong(tmp_path, setup, message):
  if setup == "no_telemetry":
    with metric_writers.MetricWriter(tmp_path) as w:
      w.write_scalars(10, {"train/loss": 1.0})
  out = subprocess.run([sys.executable, "-m", "msjax.plot", "--workdir", str(tmp_path / "x"
                        if setup == "missing" else tmp_path)], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 1 and message in out.stderr, out.stderr
  assert "Traceback" not in out.stderr


def _offsets(ax, label_start):
  for coll in ax.collections:
    if coll.get_label().startswith(label_start):
      return np.asarray(coll.get_offsets())
  raise AssertionError(f"no {label_start!r} in {[c.get_label() for c in ax.collections]}")


def _sorted_rows(x):
  x = np.asarray(x).reshape(-1, 2)
  return x[np.lexsort(x.T)]


def _assert_panels_plot_each_pair(fig, weights, *, pos_label, neg_label):
  """Every column's panels hold exactly the candidate pairs of ``weights[name]``, each at
  its (S, w): selected ones at w ≥ 0 under ``*_label``, selected ones at w < 0 as their
  own collection, the others as "discarded"; returns the number of w < 0 points drawn."""
  flipped_drawn = 0
  for col, (name, p) in enumerate(weights.items()):
    top, bottom = fig.axes[col], fig.axes[len(weights) + col]
    for ax, cand, w, label, symbol in ((top, p.pos, p.w_pos, pos_label, "w⁺"),
                                       (bottom, p.neg, p.w_neg, neg_label, "w⁻")):
      kept = cand & p.selected & (w >= 0)
      flipped = cand & p.selected & (w < 0)
      dropped = cand & ~p.selected
      for start, mask in ((label, kept), ("discarded", dropped)):
        got = _offsets(ax, start)
        assert len(got) == mask.sum(), (name, start)
        np.testing.assert_allclose(_sorted_rows(got),
                                   _sorted_rows(np.stack([p.sim[mask], w[mask]], axis=1)))
      names = [c.get_label() for c in ax.collections]
      if flipped.any():
        got = _offsets(ax, f"{symbol} < 0")
        np.testing.assert_allclose(
            _sorted_rows(got), _sorted_rows(np.stack([p.sim[flipped], w[flipped]], axis=1)))
        assert (got[:, 1] < 0).all()
        assert any(np.allclose(line.get_ydata(), 0.0) for line in ax.lines), name  # zero line
        assert f"{flipped.sum()} with {symbol} < 0" in ax.get_legend().get_title().get_text()
        flipped_drawn += len(got)
      else:
        assert not any(n.startswith(f"{symbol} < 0") for n in names), (name, names)
      # Every candidate pair is one point, and nothing else is drawn.
      assert sum(len(c.get_offsets()) for c in ax.collections) == cand.sum(), name
  return flipped_drawn


def test_weights_figure_plots_each_selected_pair_at_its_weight():
  emb, labels = make_batch("k1_mixed", 6, 4, 8, seed=2, spread=2.0)
  sels = {name: analysis.pair_weights(emb, labels, name)
          for name in ("ms", "triplet", "circle", "supcon")}
  fig = plot.weights_figure(sels)
  _assert_panels_plot_each_pair(fig, sels, pos_label="selected positives",
                                neg_label="selected negatives")
  # MS mines: some negatives are discarded, and they weigh 0.
  ms = sels["ms"]
  assert (ms.neg & ~ms.selected).any() and not ms.w_neg[ms.neg & ~ms.selected].any()
  for col, name in enumerate(sels):
    assert fig.axes[col].get_title().startswith(plot.LOSS_TITLES[name])
  plot._pyplot().close(fig)


def test_weights_figure_draws_supcons_positives_with_negative_weights():
  """SupCon pushes away a positive that takes more than 1/|P| of the anchor's softmax:
  w⁺ < 0. The figure draws each such pair below a zero line and counts them."""
  emb, labels = make_batch("pk", 8, 4, 16, seed=3, spread=2.0)
  p = analysis.pair_weights(emb, labels, "supcon")
  flipped = p.pos & (p.w_pos < 0)
  assert flipped.sum() >= 3 and (p.pos & (p.w_pos > 0)).any()
  # Each anchor's positive weights still sum to (1 − Σ_P softmax)/τ_b ≥ 0.
  assert (p.w_pos.sum(axis=1) >= 0).all()
  fig = plot.weights_figure({"supcon": p})
  assert _assert_panels_plot_each_pair(fig, {"supcon": p}, pos_label="selected positives",
                                       neg_label="selected negatives") == flipped.sum()
  low, _ = fig.axes[0].get_ylim()
  assert low < p.w_pos[flipped].min()  # drawn inside the panel, not clipped
  plot._pyplot().close(fig)


def _proxies(num_classes=6, dim=8, seed=4):
  """Raw proxies (any norm) near the class centres of ``make_batch``'s pk batches."""
  rng = np.random.default_rng(seed)
  return 3.0 * rng.normal(size=(num_classes, dim))


def test_proxy_pair_weights_are_the_per_anchor_closed_forms():
  emb, labels = make_batch("pk", 6, 4, 8, seed=5, spread=2.0)
  raw = _proxies()
  proxy_labels = np.arange(len(raw))
  anchor = analysis.proxy_pair_weights(emb, labels, raw, "proxy_anchor")
  nca = analysis.proxy_pair_weights(emb, labels, raw, "proxy_nca")
  sim = emb @ unit(raw).T
  pos = labels[:, None] == proxy_labels[None, :]
  for p in (anchor, nca):
    np.testing.assert_allclose(p.sim, sim, rtol=1e-12)
    np.testing.assert_array_equal(p.pos, pos)
    np.testing.assert_array_equal(p.neg, ~pos)
    np.testing.assert_array_equal(p.selected, p.weights != 0)
  # Proxy-Anchor, per proxy (the anchor): MS's Similarity-S and -N over the proxy's column.
  a, d = analysis.DEFAULT_HPARAMS["proxy_anchor"]["alpha"], 0.1
  e_pos = np.where(pos, np.exp(-a * (sim - d)), 0.0)
  e_neg = np.where(~pos, np.exp(a * (sim + d)), 0.0)
  np.testing.assert_allclose(anchor.w_pos, a * e_pos / (1 + e_pos.sum(0)), rtol=1e-10,
                             atol=1e-300)
  np.testing.assert_allclose(anchor.w_neg, a * e_neg / (1 + e_neg.sum(0)), rtol=1e-10)
  # Proxy-NCA, per sample: 2σ² times the softmax over the other proxies, a constant pull.
  z = 2 * 3.0 ** 2 * np.where(~pos, sim, -np.inf)
  q = np.exp(z - z.max(1, keepdims=True))
  np.testing.assert_allclose(nca.w_neg, 18.0 * q / q.sum(1, keepdims=True), rtol=1e-10)
  np.testing.assert_allclose(nca.w_pos, np.where(pos, 18.0, 0.0), rtol=1e-12)
  # per_anchor=False: ∂L/∂S itself, what training back-propagates (Proxy-Anchor's sum
  # over proxies is not divided by the batch size; Proxy-NCA's mean over samples is).
  for name in losses.PROXY_NAMES:
    raw_w = analysis.proxy_pair_weights(emb, labels, raw, name, per_anchor=False).weights
    want = np.asarray(losses.get(name).weights(sim, labels, ref_labels=proxy_labels))
    np.testing.assert_allclose(raw_w, want, rtol=1e-6, atol=1e-12)
  np.testing.assert_allclose(nca.weights / len(labels),
                             analysis.proxy_pair_weights(emb, labels, raw, "proxy_nca",
                                                         per_anchor=False).weights, rtol=1e-12)


def test_proxy_pair_weights_keep_a_sample_on_its_proxy_and_a_missing_class():
  """A proxy is never a sample's self pair: a sample sitting on its proxy (S = 1) is a
  positive; a class without a proxy leaves its samples without positives."""
  emb, labels = make_batch("pk", 4, 3, 8, seed=6)
  proxies = analysis.class_mean_proxies(emb[:9], labels[:9])  # class 3 has none
  proxies.vectors[0] = emb[0]
  for name in losses.PROXY_NAMES:
    p = analysis.proxy_pair_weights(emb, labels, proxies, name)
    assert p.sim.shape == (12, 3) and p.pos[0, 0] and np.isclose(p.sim[0, 0], 1.0)
    assert not p.pos[9:].any() and p.neg[9:].all()
    assert p.selected[0, 0] and p.w_pos[0, 0] > 0
  nca = analysis.proxy_pair_weights(emb, labels, proxies, "proxy_nca")
  assert nca.w_pos[0, 0] == 18.0 and not nca.weights[9:].any()  # no positive: no term


def test_class_mean_and_trained_proxies():
  emb = np.array([[1.0, 0.0], [0.0, 1.0], [-0.6, 0.8], [0.6, 0.8]])
  got = analysis.class_mean_proxies(emb, np.array([7, 7, 2, 2]))
  assert got.stand_in and got.labels.tolist() == [2, 7] and len(got) == 2
  np.testing.assert_allclose(got.vectors, [[0.0, 1.0], [np.sqrt(0.5), np.sqrt(0.5)]],
                             rtol=1e-9, atol=1e-15)  # classes in increasing order
  config = types.SimpleNamespace(loss=types.SimpleNamespace(name="proxy_anchor"))
  raw = np.array([[3.0, 4.0], [0.0, -2.0]], np.float32)
  run = types.SimpleNamespace(config=config, state={"params": {"proxies": raw}}, step=5)
  for got in (analysis.trained_proxies(run), analysis.run_proxies(run)):
    assert not got.stand_in and got.labels.tolist() == [0, 1]
    np.testing.assert_allclose(got.vectors, [[0.6, 0.8], [0.0, -1.0]], rtol=1e-6)
    assert got.vectors.dtype == np.float64 and "trained" in got.source
  run.state, config.loss.name = {"params": {}}, "ms"
  with pytest.raises(ValueError, match="stand_in_proxies"):
    analysis.trained_proxies(run)


def test_stand_in_proxies_are_the_class_means_of_other_batches(monkeypatch):
  """The batches before the step (after it near step 0), never the studied batch."""
  batches = {s: (unit(np.random.default_rng(s).normal(size=(4, 3))),
                 np.array([s % 3, s % 3, 5, 5])) for s in range(12)}

  def fake(run, first, stop):
    yield from (batches[s] for s in range(first, stop))

  monkeypatch.setattr(analysis, "_train_batch_embeddings", fake)
  run = types.SimpleNamespace(step=8, state={"params": {}})
  for step, used in ((None, [4, 5, 6, 7]), (8, [4, 5, 6, 7]), (2, [0, 1, 3, 4])):
    got = analysis.stand_in_proxies(run, num_batches=4, step=step)
    want = analysis.class_mean_proxies(np.concatenate([batches[s][0] for s in used]),
                                       np.concatenate([batches[s][1] for s in used]))
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.vectors, want.vectors, rtol=1e-12)
    assert got.stand_in and "stand-ins" in got.source
  assert analysis.run_proxies(run, num_batches=4).stand_in


def test_proxy_losses_have_autodiff_checks_and_are_kept_out_of_pair_weights():
  emb, labels = make_batch("pk", 6, 4, 8, seed=5, spread=2.0)
  sim = emb @ unit(_proxies()).T
  for name in losses.PROXY_NAMES:
    gap = analysis.autodiff_gap(sim, labels, name, ref_labels=np.arange(6))
    assert gap["max_abs_diff"] <= 1e-12 * max(gap["max_abs_weight"], 1.0), name
    with pytest.raises(ValueError, match="proxy_pair_weights"):
      analysis.pair_weights(emb, labels, name)
  with pytest.raises(ValueError, match="not a proxy loss"):
    analysis.proxy_pair_weights(emb, labels, _proxies(), "ms")
  for name in losses.ALL_NAMES:
    assert name in analysis.DEFAULT_HPARAMS and name in analysis.DEPENDS_ON
    assert name in plot.LOSS_TITLES


def test_proxy_figure_plots_each_sample_to_proxy_pair_at_its_weight():
  emb, labels = make_batch("pk", 6, 4, 8, seed=5, spread=2.0)
  weights = {name: analysis.proxy_pair_weights(emb, labels, _proxies(), name)
             for name in losses.PROXY_NAMES}
  fig = plot.proxy_figure(weights, title="proxies")
  _assert_panels_plot_each_pair(fig, weights, pos_label="own-class proxy",
                                neg_label="other classes' proxies")
  b, c = len(labels), 6
  for col, name in enumerate(weights):
    top, bottom = fig.axes[col], fig.axes[len(weights) + col]
    # One own-class proxy per sample on top, every other class's proxy below.
    assert sum(len(x.get_offsets()) for x in top.collections) == b
    assert sum(len(x.get_offsets()) for x in bottom.collections) == b * (c - 1)
    anchor = analysis.PROXY_ANCHOR_OF[name]
    assert top.get_ylabel().startswith(f"w⁺ per {anchor}")
    assert bottom.get_ylabel().startswith(f"w⁻ per {anchor}")
    assert top.get_title().startswith(plot.LOSS_TITLES[name])
  # Proxy-NCA's constant pull: every sample's w⁺ is 2σ², drawn from a y axis that starts at 0.
  nca_top = fig.axes[1]
  np.testing.assert_allclose(_offsets(nca_top, "own-class proxy")[:, 1], 18.0)
  assert nca_top.get_ylim()[0] <= 0
  assert fig._suptitle.get_text() == "proxies"
  plot._pyplot().close(fig)


def test_sweep_figure_shows_the_mined_set_growing_with_epsilon():
  emb, labels = make_batch("pk", 6, 4, 8, seed=3, spread=2.0)
  fig = plot.sweep_figure(emb, labels, sweeps={"epsilon": (0.0, 0.3)})
  bottom = fig.axes[1]
  counts = {c.get_label().split(":")[0]: len(c.get_offsets()) for c in bottom.collections}
  small, large = counts["ε=0"], counts["ε=0.3"]
  assert small < large
  p = analysis.pair_weights(emb, labels, "ms", epsilon=0.3)
  assert large == (p.neg & (p.w_neg > 0)).sum()
  plot._pyplot().close(fig)


def test_preview_png_is_a_small_palette_copy_of_the_figure():
  """The notebook's inline previews: the figure at the preview dpi in 256 colours, a
  fraction of the bytes of the full-colour PNG that ``save`` writes."""
  import io
  emb, labels = make_batch("pk", 6, 4, 8, seed=3, spread=2.0)
  fig = plot.weights_figure({"ms": analysis.pair_weights(emb, labels, "ms")})
  full = io.BytesIO()
  fig.savefig(full, format="png", dpi=64, bbox_inches="tight")
  small = plot.preview_png(fig, dpi=64)
  with Image.open(io.BytesIO(small)) as im, Image.open(full) as ref:
    assert im.format == "PNG" and im.mode == "P" and len(im.getpalette()) <= 3 * 256
    assert im.size == ref.size
  assert len(small) < 0.6 * len(full.getvalue())
  plot.use_compact_previews()  # outside IPython: nothing to do, no error
  plot._pyplot().close(fig)
