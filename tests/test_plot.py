"""GPW figures and ``python -m msjax.plot``: the plotted points are the loss's pairs."""

import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from msjax import analysis, metric_writers, plot, telemetry
from batches import make_batch


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


def test_weights_figure_plots_each_selected_pair_at_its_weight():
  emb, labels = make_batch("k1_mixed", 6, 4, 8, seed=2, spread=2.0)
  sels = {name: analysis.pair_weights(emb, labels, name) for name in ("ms", "triplet")}
  fig = plot.weights_figure(sels)
  for col, (name, p) in enumerate(sels.items()):
    top, bottom = fig.axes[col], fig.axes[len(sels) + col]
    for ax, cand, w, label in ((top, p.pos, p.w_pos, "selected positives"),
                               (bottom, p.neg, p.w_neg, "selected negatives")):
      kept = cand & p.selected
      got = _offsets(ax, label)
      want = np.stack([p.sim[kept], w[kept]], axis=1)
      np.testing.assert_allclose(got[np.lexsort(got.T)], want[np.lexsort(want.T)])
      assert len(_offsets(ax, "discarded")) == (cand & ~p.selected).sum()
  # MS mines: some negatives are discarded, and they weigh 0.
  ms = sels["ms"]
  assert (ms.neg & ~ms.selected).any() and not ms.w_neg[ms.neg & ~ms.selected].any()
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
