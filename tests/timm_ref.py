"""timm for the reference networks of the ViT tests and benchmarks (CPU, no download).

timm imports torchvision, and PyPI's torchvision wheel is built against CUDA PyTorch: with
the CPU build of torch (``torch==2.13.0`` in the extras) its C++ ops do not load, and
importing it fails where it registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms``. Declaring those two operator schemas first lets it import; msjax
and these tests call neither operator.
"""

from __future__ import annotations

import pytest


def import_timm():
  """``timm``, or a skip when the test extras are not installed."""
  torch = pytest.importorskip("torch")
  for op in ("nms", "qnms"):
    try:
      torch.library.define(f"torchvision::{op}",
                           "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:  # already declared (torchvision's ops loaded, or a second call)
      pass
  return pytest.importorskip("timm")
