"""timm for the reference networks of the ViT tests and benchmarks (CPU, no download).

timm imports torchvision, and PyPI's torchvision wheel is built against CUDA PyTorch: with
the CPU build of torch (``torch==2.13.0`` in the extras) its C++ ops do not load, and
importing it fails where it registers fake kernels for ``torchvision::nms`` and
``torchvision::qnms``. Declaring those two operator schemas first lets it import; msjax
and these tests call neither operator.
"""

from __future__ import annotations


def import_timm(skip_if_missing: bool = True):
  """``timm``; without it (or torch), a pytest skip, or with ``skip_if_missing=False``
  (the benchmarks) the ImportError."""
  try:
    import torch
    for op in ("nms", "qnms"):
      try:
        torch.library.define(f"torchvision::{op}",
                             "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      except RuntimeError:  # already declared (torchvision's ops loaded, or a second call)
        pass
    import timm
  except ImportError as e:
    if not skip_if_missing:
      raise
    import pytest
    pytest.skip(f"timm is not installed ({e}); pip install -e '.[test]'",
                allow_module_level=True)
  return timm
