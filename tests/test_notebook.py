"""The GPW analysis notebook: runs headless end to end, and is readable without running."""

import pathlib

import nbclient
import nbformat
from PIL import Image

from msjax import losses

NOTEBOOK = pathlib.Path(__file__).parents[1] / "notebooks" / "gpw_analysis.ipynb"
FIGURES = ("gpw_weights.png", "gpw_sweeps.png", "gpw_telemetry.png", "retrieval.png",
           "gpw_memory.png", "proxy_weights.png")
MAX_BYTES = 1 << 20  # the committed, executed notebook


def _parameters_index(nb):
  return next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))


def test_notebook_runs_headless_on_a_fresh_machine(tmp_path):
  """No WORKDIR: it trains the synthetic default briefly, then draws every figure; any
  failing cell (the autodiff check raises on a mismatch) fails the test."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  overrides = nbformat.v4.new_code_cell(
      f"FALLBACK_WORKDIR = {str(tmp_path / 'run')!r}\nFALLBACK_STEPS = 20\n"
      f"FIGURE_DIR = {str(tmp_path / 'figures')!r}")
  nb.cells.insert(_parameters_index(nb) + 1, overrides)
  nbclient.NotebookClient(nb, timeout=170, kernel_name="python3",
                          resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
  for name in FIGURES:
    with Image.open(tmp_path / "figures" / name) as im:
      assert im.format == "PNG" and min(im.size) > 400
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  for loss in losses.ALL_NAMES:  # the autodiff check covers every registry loss
    assert f"\n{loss} " in text or text.startswith(f"{loss} ")
  assert "4 logged steps, 5–20" in text  # telemetry every 5 steps of the brief run
  assert "random queries [" in text and "worst queries [" in text  # retrieval examples
  # The memory: the 16 batches before step 20, each anchor's negatives in both parts.
  assert "memory: 1,024 entries, the 16 training batches before step 20" in text
  assert "negatives mined per anchor: " in text and "% of the memory term's w⁻" in text
  # The proxy losses on stand-in proxies: the class means of two epochs of P×K batches
  # (16 of 8 batches an epoch), so every one of the 128 training classes has one.
  assert ("proxies: 128 classes, stand-ins: the class means of the 16 training batches "
          "before step 20, embedded by this model") in text
  assert "100% of the batch's images have their class's proxy" in text
  assert "proxy_anchor per proxy: w⁺ from " in text
  assert "proxy_nca    per sample: w⁺ from 18 to 18;" in text  # Proxy-NCA's constant 2σ²


def test_committed_notebook_is_readable_without_running():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
  assert not any(o.output_type == "error" for c in code for o in c.outputs)
  drawing = [c for c in code if "plot.save(" in c.source]
  assert len(drawing) == len(FIGURES)
  for cell in drawing:
    assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source[:80]
  text = "".join(o.get("text", "") for c in code for o in c.outputs)
  assert "negatives mined per anchor: " in text  # the cross-batch memory's section
  assert "stand-ins: the class means" in text  # the proxy section, on the MS run
  # Small inline previews (plot.use_compact_previews) keep the file in the repository small.
  assert NOTEBOOK.stat().st_size < MAX_BYTES
