"""GPW figures: pair weights against similarity, with and without a cross-batch memory,
sample-to-proxy weights of the proxy losses, hyper-parameter sweeps, telemetry, and
retrieval examples (queries and their nearest neighbours).

    python -m msjax.plot --workdir runs/inshop-20261129-1200 [--out DIR]

renders a run's pair-weight telemetry (``gpw/`` in ``metrics.jsonl``) as PNG files with no
Jupyter, e.g. on a TPU VM; ``gs://`` workdirs work. The GPW notebook draws with the same
functions. Needs matplotlib (``pip install 'msjax[plot]'``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import numpy as np

from msjax import analysis

POS_COLOR, NEG_COLOR, OFF_COLOR = "#1b7837", "#b2182b", "#9a9a9a"
MEMORY_COLOR = "#5e3c99"  # pairs with a cross-batch memory's older entries
LOSS_TITLES = {"ms": "Multi-Similarity", "binomial": "Binomial deviance",
               "lifted": "Lifted structure", "contrastive": "Contrastive",
               "triplet": "Triplet", "circle": "Circle", "supcon": "Supervised contrastive",
               "proxy_anchor": "Proxy-Anchor", "proxy_nca": "Proxy-NCA"}
SWEEPS = {"alpha": (0.5, 2.0, 8.0), "beta": (10.0, 40.0, 100.0), "lam": (0.3, 0.5, 0.7),
          "epsilon": (0.0, 0.1, 0.3)}
SYMBOLS = {"alpha": "α", "beta": "β", "lam": "λ", "epsilon": "ε"}
SMALL_IMAGE = 64  # pixels a side: retrieval_figure enlarges an image this small or smaller


def _pyplot():
  try:
    import matplotlib
  except ImportError:
    raise ImportError("msjax.plot needs matplotlib: pip install 'msjax[plot]' (or "
                      "pip install matplotlib).") from None
  if "matplotlib.pyplot" not in sys.modules and "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # files only, no display needed
  import matplotlib.pyplot as plt
  return plt


def _scatter_pairs(ax, sim, weight, candidate, selected, color, label, symbol):
  """Selected pairs as filled dots, discarded ones as grey crosses (weight 0 or not).

  A selected pair of negative weight (``symbol`` < 0: a positive the loss pushes away,
  as SupCon's can be, or a negative it pulls closer) is drawn below a zero line as a
  hollow triangle of its own, named in the legend. Returns how many there are.
  """
  kept = candidate & selected
  dropped = candidate & ~selected
  flipped = kept & (weight < 0)
  kept = kept & ~flipped
  ax.scatter(sim[dropped], weight[dropped], s=8, marker="x", color=OFF_COLOR, alpha=0.5,
             linewidths=0.6, label=f"discarded ({dropped.sum()})", rasterized=True)
  ax.scatter(sim[kept], weight[kept], s=10, color=color, alpha=0.6, edgecolors="none",
             label=f"{label} ({kept.sum()})", rasterized=True)
  if flipped.any():
    ax.axhline(0.0, color="black", lw=0.8, zorder=1)
    ax.scatter(sim[flipped], weight[flipped], s=14, marker="v", facecolors="none",
               edgecolors=color, linewidths=0.7,
               label=f"{symbol} < 0 ({flipped.sum()})", rasterized=True)
  return int(flipped.sum())


def _weight_panels(axes, col, name, p: analysis.PairWeights, pos_label, neg_label):
  """One loss's column: w⁺ on ``p``'s positives (top) and w⁻ on its negatives (bottom),
  titled with what the weights depend on, each panel saying how many pairs are selected
  and how many weigh the wrong way round."""
  pos_frac, neg_frac = p.mined_fractions()
  top, bottom = axes[0, col], axes[1, col]
  for ax, weight, cand, color, label, symbol, frac, kind in (
      (top, p.w_pos, p.pos, POS_COLOR, pos_label, "w⁺", pos_frac, "positives"),
      (bottom, p.w_neg, p.neg, NEG_COLOR, neg_label, "w⁻", neg_frac, "negatives")):
    flipped = _scatter_pairs(ax, p.sim, weight, cand, p.selected, color, label, symbol)
    text = f"{100 * frac:.{0 if kind == 'positives' else 1}f}% of {kind} selected"
    if flipped:
      verb = "pushed apart" if kind == "positives" else "pulled together"
      text += f"\n{flipped} with {symbol} < 0: {verb}"
    ax.grid(alpha=0.3)
    # The counts head the legend, which "best" keeps off the points.
    ax.legend(loc="best", fontsize=7, frameon=False, title=text, title_fontsize=8,
              alignment="left")
  top.set_title(f"{LOSS_TITLES.get(name, name)}\nweights depend on "
                f"{analysis.DEPENDS_ON.get(name, '?')}", fontsize=10)
  return top, bottom


def weights_figure(selections: Mapping[str, analysis.PairWeights], *, title: str = ""):
  """Pair weight against similarity, one column per loss: w⁺ on positive pairs (top),
  w⁻ on negative pairs (bottom), selected pairs coloured and discarded pairs grey.

  A weight that depends on the pair's own similarity only (S) draws a single curve; one
  that depends on the anchor's other pairs (P, N) spreads into a band. A selected pair
  whose weight has the other sign (SupCon's positives that take more than their share of
  the softmax: ``w⁺ < 0``, pushed away) is drawn below a zero line as a hollow triangle,
  and the panel counts them.
  """
  plt = _pyplot()
  names = list(selections)
  fig, axes = plt.subplots(2, len(names), figsize=(3.3 * len(names), 6.2), squeeze=False,
                           constrained_layout=True)
  for col, name in enumerate(names):
    top, bottom = _weight_panels(axes, col, name, selections[name], "selected positives",
                                 "selected negatives")
    top.set_ylabel("w⁺ (positive pairs)" if col == 0 else "")
    bottom.set_ylabel("w⁻ (negative pairs)" if col == 0 else "")
    bottom.set_xlabel("similarity S_ij")
  if title:
    fig.suptitle(title)
  return fig


def proxy_figure(weights_by_loss: Mapping[str, analysis.PairWeights], *, title: str = ""):
  """Sample-to-proxy weight against similarity, one column per proxy loss
  (``analysis.proxy_pair_weights``): w⁺ of each sample and its own class's proxy (top),
  w⁻ of each sample and the other classes' proxies (bottom), weighted pairs coloured and
  pairs of weight 0 grey, in ``weights_figure``'s style.

  The weights are per anchor, and the anchors differ (``analysis.PROXY_ANCHOR_OF``):
  Proxy-NCA's are the samples, Proxy-Anchor's the proxies; the y labels say which.
  """
  plt = _pyplot()
  names = list(weights_by_loss)
  fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6.2), squeeze=False,
                           constrained_layout=True)
  for col, name in enumerate(names):
    p = weights_by_loss[name]
    top, bottom = _weight_panels(axes, col, name, p, "own-class proxy",
                                 "other classes' proxies")
    anchor = analysis.PROXY_ANCHOR_OF.get(name, "anchor")
    top.set_ylabel(f"w⁺ per {anchor} (own-class proxy)")
    bottom.set_ylabel(f"w⁻ per {anchor} (other proxies)")
    bottom.set_xlabel("similarity to the proxy S_ip")
    for ax in (top, bottom):  # from 0, so that a constant weight (Proxy-NCA's w⁺) reads as one
      low, high = ax.get_ylim()
      if low > 0:
        ax.set_ylim(-0.04 * high, high)
  if title:
    fig.suptitle(title)
  return fig


def _weighted_pairs(ax, p: analysis.PairWeights, side: str, style: dict, label: str):
  """``p``'s pairs of one side (``"pos"`` or ``"neg"``) with a non-zero weight, at
  their weight; returns how many were drawn."""
  weight = p.w_pos if side == "pos" else p.w_neg
  drawn = (p.pos if side == "pos" else p.neg) & (weight > 0)
  ax.scatter(p.sim[drawn], weight[drawn], label=f"{label} ({drawn.sum():,})",
             rasterized=True, **style)
  return int(drawn.sum())


def memory_figure(weights: analysis.MemoryWeights, *, title: str = ""):
  """What a cross-batch memory changes for one batch's anchors
  (``analysis.memory_weights``), in three panels: ``w⁻`` and ``w⁺`` against similarity
  for the batch alone (hollow) and, in the memory term, for the batch's own copies and
  the memory's older entries (only pairs with a non-zero weight); and each anchor's
  ``Σ w⁻`` alone and in the memory term, split between the batch's copies and the memory
  (anchors sorted by the memory term's total), the legend giving the mined negatives.

  Returns:
    The Figure, its three Axes in that order.
  """
  plt = _pyplot()
  fig, (neg_ax, pos_ax, sum_ax) = plt.subplots(1, 3, figsize=(14, 4.4),
                                               constrained_layout=True)
  n = weights.memory_size
  for ax, side, color in ((neg_ax, "neg", NEG_COLOR), (pos_ax, "pos", POS_COLOR)):
    _weighted_pairs(ax, weights.batch, side, dict(s=18, facecolors="none", edgecolors=color,
                                                  linewidths=0.6, alpha=0.7),
                    "batch alone")
    _weighted_pairs(ax, weights.memory_part, side,
                    dict(s=6, color=MEMORY_COLOR, alpha=0.35, edgecolors="none"),
                    f"with memory: its {n:,} older entries")
    _weighted_pairs(ax, weights.batch_part, side,
                    dict(s=10, color=color, alpha=0.8, edgecolors="none"),
                    "with memory: the batch's copies")
    ax.set_yscale("log")  # weights span orders of magnitude
    ax.set_xlabel("similarity S_ij")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, frameon=False, loc="lower right")
  neg_ax.set_title("Negative pairs: which carry w⁻", fontsize=10)
  neg_ax.set_ylabel("w⁻ (per anchor)")
  pos_ax.set_title("Positive pairs: w⁺", fontsize=10)
  pos_ax.set_ylabel("w⁺ (per anchor)")

  sums, mined = weights.neg_weight_sums(), weights.mined_negatives()
  total = sums["batch_part"] + sums["memory_part"]
  share = np.divide(sums["memory_part"], total, out=np.zeros_like(total), where=total > 0)
  order = np.argsort(-share, kind="stable")
  x = np.arange(len(order))
  sum_ax.bar(x, sums["memory_part"][order], width=1.0, color=MEMORY_COLOR, alpha=0.6,
             label=f"with memory: older entries ({mined['memory_part'].mean():.1f} mined)")
  sum_ax.bar(x, sums["batch_part"][order], bottom=sums["memory_part"][order], width=1.0,
             color=NEG_COLOR, alpha=0.8,
             label=f"with memory: the batch's copies ({mined['batch_part'].mean():.1f} mined)")
  sum_ax.plot(x, sums["batch"][order], "o", ms=3, color="black",
              label=f"batch alone ({mined['batch'].mean():.1f} mined)")
  sum_ax.set_title(f"Σw⁻ per anchor: {100 * weights.memory_neg_weight_share():.0f}% on the "
                   "memory with it", fontsize=10)
  sum_ax.set_xlabel("anchor (sorted by the memory's share of its Σw⁻)")
  sum_ax.set_ylabel("Σ_j w⁻_ij (mean mined negatives in brackets)")
  top = max(float(total.max(initial=0.0)), float(sums["batch"].max(initial=0.0)))
  sum_ax.set_ylim(0, 1.35 * top if top > 0 else 1.0)  # room for the legend
  sum_ax.grid(alpha=0.3, axis="y")
  sum_ax.legend(fontsize=7, frameon=False, loc="upper center")
  if title:
    fig.suptitle(title)
  return fig


def sweep_figure(emb_or_sim, labels, *, is_sim: bool = False, sweeps=None, base=None):
  """MS weights and mined sets as one hyper-parameter at a time moves (columns); the
  others stay at ``base`` (the released α=2, β=40, λ=0.5, ε=0.1 by default)."""
  plt = _pyplot()
  sweeps = dict(sweeps or SWEEPS)
  base = {**analysis.DEFAULT_HPARAMS["ms"], **(base or {})}
  fig, axes = plt.subplots(2, len(sweeps), figsize=(3.4 * len(sweeps), 6.2), squeeze=False,
                           constrained_layout=True)
  cmap = plt.get_cmap("viridis")
  for col, (name, values) in enumerate(sweeps.items()):
    top, bottom = axes[0, col], axes[1, col]
    for i, value in reversed(list(enumerate(values))):  # the widest mined set underneath
      p = analysis.pair_weights(emb_or_sim, labels, "ms", is_sim=is_sim,
                                **{**base, name: value})
      pos_frac, neg_frac = p.mined_fractions()
      color = cmap(i / max(len(values) - 1, 1) * 0.85)
      label = f"{SYMBOLS.get(name, name)}={value:g}"
      pos, neg = p.pos & (p.w_pos > 0), p.neg & (p.w_neg > 0)
      top.scatter(p.sim[pos], p.w_pos[pos], s=8, color=color, alpha=0.6, edgecolors="none",
                  label=f"{label}: {100 * pos_frac:.0f}% mined", rasterized=True)
      bottom.scatter(p.sim[neg], p.w_neg[neg], s=8, color=color, alpha=0.6,
                     edgecolors="none", label=f"{label}: {100 * neg_frac:.1f}% mined",
                     rasterized=True)
    bottom.set_yscale("log")  # w⁻ spans orders of magnitude
    top.set_title(f"sweeping {SYMBOLS.get(name, name)} "
                  f"(others at {_others(base, name)})", fontsize=9)
    top.set_ylabel("w⁺ (weighted positive pairs)" if col == 0 else "")
    bottom.set_ylabel("w⁻ (weighted negative pairs)" if col == 0 else "")
    bottom.set_xlabel("similarity S_ij")
    for ax in (top, bottom):
      ax.grid(alpha=0.3)
      ax.legend(fontsize=7, frameon=False, loc="best")
  fig.suptitle("Multi-Similarity weights as α, β, λ and ε move")
  return fig


def _others(base, name):
  return ", ".join(f"{SYMBOLS.get(k, k)}={v:g}" for k, v in base.items()
                   if k != name and k in SYMBOLS)


def _series(records: Sequence[Mapping], key: str):
  return np.array([float(r.get(key, np.nan)) for r in records])


def _band(ax, steps, records, kind, color, label):
  q = {p: _series(records, f"{kind}_q{p}") for p in ("05", "25", "50", "75", "95")}
  ax.fill_between(steps, q["05"], q["95"], color=color, alpha=0.15, linewidth=0)
  ax.fill_between(steps, q["25"], q["75"], color=color, alpha=0.3, linewidth=0)
  ax.plot(steps, q["50"], color=color, label=f"{label}: median, 25–75%, 5–95%")


def telemetry_figure(records: Sequence[Mapping], *, title: str = ""):
  """How the batch's pair weights, mined sets and similarities evolve over training,
  from ``analysis.telemetry_records``."""
  plt = _pyplot()
  steps = _series(records, "step")
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
  (w_ax, frac_ax), (sim_ax, loss_ax) = axes

  _band(w_ax, steps, records, "pos_weight", POS_COLOR, "w⁺")
  _band(w_ax, steps, records, "neg_weight", NEG_COLOR, "w⁻")
  w_ax.plot(steps, _series(records, "pos_weight_max"), ":", color=POS_COLOR, label="max w⁺")
  w_ax.plot(steps, _series(records, "neg_weight_max"), ":", color=NEG_COLOR, label="max w⁻")
  w_ax.plot(steps, _series(records, "pos_weight_mean"), "--", color=POS_COLOR, lw=1,
            label="mean w⁺")
  w_ax.plot(steps, _series(records, "neg_weight_mean"), "--", color=NEG_COLOR, lw=1,
            label="mean w⁻")
  w_ax.set_yscale("log")
  w_ax.set_title("Pair weights of the weighted pairs")
  w_ax.set_ylabel("weight (per anchor)")

  frac_ax.plot(steps, _series(records, "pos_mined_fraction"), color=POS_COLOR,
               label="positive pairs mined")
  frac_ax.plot(steps, _series(records, "neg_mined_fraction"), color=NEG_COLOR,
               label="negative pairs mined")
  frac_ax.plot(steps, _series(records, "empty_anchor_fraction"), color="black", ls="--",
               label="anchors with an empty mined set")
  frac_ax.set_ylim(-0.02, 1.02)
  frac_ax.set_title("Mining")
  frac_ax.set_ylabel("fraction")

  _band(sim_ax, steps, records, "pos_sim", POS_COLOR, "positive pairs")
  _band(sim_ax, steps, records, "neg_sim", NEG_COLOR, "negative pairs")
  sim_ax.set_title("Similarities of candidate pairs")
  sim_ax.set_ylabel("S_ij")

  loss_ax.plot(steps, _series(records, "loss"), color="#2166ac")
  loss_ax.set_title("Training loss")
  loss_ax.set_ylabel("loss")

  for ax in axes.ravel():
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax is not loss_ax:
      ax.legend(fontsize=7, frameon=False, loc="best")
  if title:
    fig.suptitle(title)
  return fig


def _short(text, width: int = 24) -> str:
  text = str(text)
  return text if len(text) <= width else text[:width - 1] + "…"


def _image_cell(ax, image, frame_color, frame_width):
  """One picture of the retrieval grid: the image (a grey square without one), no ticks,
  framed by the Axes' spines."""
  if image is None:
    ax.set_facecolor("#e6e6e6")
    ax.set_aspect("equal")
  else:
    # A small image (the synthetic set's 32 px) is enlarged in every rendering: its pixels
    # drawn as blocks stay sharp, and the PNG is half the size of a smoothed one. Larger
    # images keep matplotlib's antialiased resampling.
    small = max(image.shape[:2]) <= SMALL_IMAGE
    ax.imshow(image, interpolation="nearest" if small else None)
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_edgecolor(frame_color)
    spine.set_linewidth(frame_width)


def retrieval_figure(examples: analysis.RetrievalExamples, *, title: str = ""):
  """One row per chosen query (``analysis.retrieval_examples``): the query image, then its
  ``k`` nearest neighbours, most similar first, each framed green when it shares the
  query's label and red when not, titled with its rank and similarity.

  Each row's heading says whether its query is a random one or one of the worst
  failures, and the rank of its first positive, counted from 1 like Recall@K's K: the query is a hit
  for Recall@K exactly when that rank is at most K.
  """
  plt = _pyplot()
  rows, k = examples.neighbour_index.shape
  fig, axes = plt.subplots(rows, k + 1, figsize=(1.2 * (k + 1) + 0.5, 1.45 * rows + 0.7),
                           squeeze=False, constrained_layout=True)
  images = examples.images
  for r in range(rows):
    rank = int(examples.first_positive[r])
    kind = "random query" if examples.kind[r] == "random" else "failure"
    ax = axes[r, 0]
    _image_cell(ax, None if images is None else images[r, 0], "#404040", 1.0)
    ax.set_title(f"query {examples.query_index[r]}", fontsize=7)
    ax.set_xlabel(_short(examples.query_class[r]), fontsize=6)
    ax.set_ylabel(f"{kind}\nfirst positive\nat rank {rank + 1:,}", fontsize=7)
    for j in range(k):
      color = POS_COLOR if examples.matches[r, j] else NEG_COLOR
      ax = axes[r, j + 1]
      _image_cell(ax, None if images is None else images[r, j + 1], color, 3.0)
      ax.set_title(f"#{j + 1}  {examples.similarity[r, j]:.3f}", fontsize=7, color=color)
      ax.set_xlabel(_short(examples.neighbour_class[r, j]), fontsize=6)
  searched = ("The queries search each other" if examples.symmetric
              else "The queries search a separate gallery")
  fig.supxlabel(f"Green frame: the query's class; red: another class. Above each "
                f"neighbour: its rank and similarity.\n{searched}: "
                f"{examples.num_gallery:,} items ranked per query.", fontsize=7)
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def preview_png(fig, *, dpi: float = 64, colors: int = 256) -> bytes:
  """``fig`` as a small PNG for a notebook's inline preview: rendered at ``dpi`` with the
  inline backend's tight bounding box, then reduced to a dithered palette of ``colors``
  colours, about a third of the full-colour PNG's bytes. ``save`` writes the full figure."""
  import io

  from PIL import Image
  rendered = io.BytesIO()
  fig.savefig(rendered, format="png", dpi=dpi, bbox_inches="tight")
  rendered.seek(0)
  with Image.open(rendered) as image:
    palette = image.convert("RGB").quantize(colors)
  out = io.BytesIO()
  palette.save(out, format="PNG", optimize=True)
  return out.getvalue()


def use_compact_previews(*, dpi: float = 64, colors: int = 256) -> None:
  """Shows matplotlib figures inline in IPython/Jupyter as ``preview_png`` (call it after
  ``%matplotlib inline``): an executed notebook stays small, while ``save`` keeps writing
  the full figures. Does nothing outside IPython."""
  import functools

  from matplotlib.figure import Figure
  try:
    from IPython import get_ipython
  except ImportError:
    return
  shell = get_ipython()
  if shell is None:
    return
  shell.display_formatter.formatters["image/png"].for_type(
      Figure, functools.partial(preview_png, dpi=dpi, colors=colors))


def save(fig, path) -> str:
  """Writes ``fig`` as PNG to a local or ``gs://`` path; returns the path."""
  import io

  from etils import epath
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=110)
  _pyplot().close(fig)
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
  return str(path)


def render_workdir(workdir, out=None) -> list[str]:
  """Renders a run's telemetry to ``<out>/gpw_telemetry.png`` (default
  ``<workdir>/figures``); returns the files written."""
  from etils import epath
  records = analysis.telemetry_records(workdir)
  out = epath.Path(out) if out else epath.Path(workdir) / "figures"
  title = f"{workdir}: steps {int(records[0]['step'])}–{int(records[-1]['step'])}"
  return [save(telemetry_figure(records, title=title), out / "gpw_telemetry.png")]


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(
      prog="python -m msjax.plot",
      description="Render a training run's GPW telemetry (metrics.jsonl) as PNG files.")
  parser.add_argument("--workdir", required=True, help="the run's workdir (local or gs://)")
  parser.add_argument("--out", default=None, help="where to write (default: WORKDIR/figures)")
  args = parser.parse_args(argv)
  try:
    paths = render_workdir(args.workdir, args.out)
  except (FileNotFoundError, ValueError, ImportError) as e:
    print(f"msjax.plot: {e}", file=sys.stderr)
    return 1
  print("\n".join(paths))
  return 0


if __name__ == "__main__":
  sys.exit(main())
