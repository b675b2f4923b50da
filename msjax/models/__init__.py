"""Backbones (BN-Inception, ResNet-50, a small CNN) in Flax NNX, the embedding head, and
PyTorch-weight conversion.

``create_backbone(name, rngs=...)`` returns a module that maps images ``[B, H, W, 3]``,
already normalised in the backbone's input convention (``INPUT_CONVENTIONS``), to pooled
features ``[B, F]``; ``create_model`` puts the embedding head on top.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp
from flax import nnx

from msjax.models import layers, weights
from msjax.models.head import EmbeddingHead

# name -> (module, class); imported on first use.
BACKBONES = {
    "bninception": ("msjax.models.bninception", "BNInception"),
    "resnet50": ("msjax.models.resnet", "ResNet50"),
    "small_cnn": ("msjax.models.small_cnn", "SmallCNN"),
}

# How images must be normalised for each backbone (the data pipeline applies it):
# "caffe_bgr": BGR, 0-255, minus mean [104, 117, 128], std 1 (the Caffe-converted weights);
# "imagenet_rgb": RGB in [0, 1], minus mean [0.485, 0.456, 0.406], over std [0.229, 0.224,
# 0.225] (torchvision/timm weights).
INPUT_CONVENTIONS = {"bninception": "caffe_bgr", "resnet50": "imagenet_rgb",
                     "small_cnn": "imagenet_rgb"}

# Global pooling by default: max for BN-Inception as in the released MS code.
DEFAULT_POOLING = {"bninception": "max", "resnet50": "avg", "small_cnn": "avg"}


def backbone_class(name: str):
  if name not in BACKBONES:
    raise ValueError(f"Unknown backbone {name!r}; choose one of {sorted(BACKBONES)}.")
  module, cls = BACKBONES[name]
  return getattr(importlib.import_module(module), cls)


def create_backbone(name: str, *, rngs: nnx.Rngs, pretrained=None, pooling: str | None = None,
                    frozen_bn: bool = False, dtype=None, param_dtype=jnp.float32):
  """A backbone by name, optionally with converted pretrained weights.

  Args:
    name: ``"bninception"``, ``"resnet50"`` or ``"small_cnn"``.
    rngs: initialisation randomness.
    pretrained: a converted ``.npz`` (local or ``gs://``), from
      ``python -m msjax.models.convert``; every parameter and BatchNorm statistic is
      loaded, and a missing file, another architecture's file or a shape mismatch raises
      an error naming the problem.
    pooling: global ``"max"``, ``"avg"`` or ``"avg+max"`` pooling (default:
      ``DEFAULT_POOLING[name]``;
      max for BN-Inception, as the released MS code).
    frozen_bn: BatchNorm uses its running statistics in training too (affine parameters
      still train), as the released MS code does.
    dtype: compute dtype (``jnp.bfloat16`` on TPU/GPU); parameters stay ``param_dtype``.

  Returns:
    An ``nnx.Module`` in eval mode; ``module(images) -> [B, module.num_features]``.
  """
  cls = backbone_class(name)
  if pooling is not None:
    layers.check_pooling(pooling)
  # Built abstract, then filled in one go: flax's eager initialisers compile once per
  # kernel shape, about a minute for BN-Inception on a CPU.
  model = nnx.eval_shape(lambda: cls(
      rngs=nnx.Rngs(0), pooling=pooling or DEFAULT_POOLING[name], frozen_bn=frozen_bn,
      dtype=dtype, param_dtype=param_dtype))
  if pretrained:
    weights.load_pretrained(model, pretrained, arch=name)
  else:
    weights.initialise(model, rngs.params())
  model.eval()
  return model


class Embedder(nnx.Module):
  """Backbone + embedding head: images -> L2-normalised embeddings ``[B, embedding_dim]``."""

  def __init__(self, backbone: nnx.Module, head: EmbeddingHead):
    self.backbone = backbone
    self.head = head

  def __call__(self, images):
    return self.head(self.backbone(images))


def create_model(backbone: str, embedding_dim: int, *, rngs: nnx.Rngs, pretrained=None,
                 pooling: str | None = None, frozen_bn: bool = False,
                 mlp_hidden: int | None = None, dtype=None, param_dtype=jnp.float32):
  """``Embedder(create_backbone(...), EmbeddingHead(...))``, in eval mode."""
  if embedding_dim < 1:
    raise ValueError(f"embedding_dim must be positive; got {embedding_dim}.")
  body = create_backbone(backbone, rngs=rngs, pretrained=pretrained, pooling=pooling,
                         frozen_bn=frozen_bn, dtype=dtype, param_dtype=param_dtype)
  head = EmbeddingHead(body.num_features, embedding_dim, rngs=rngs, mlp_hidden=mlp_hidden,
                       dtype=dtype, param_dtype=param_dtype)
  model = Embedder(body, head)
  model.eval()
  return model


__all__ = ["BACKBONES", "INPUT_CONVENTIONS", "DEFAULT_POOLING", "EmbeddingHead",
           "Embedder", "backbone_class", "create_backbone", "create_model", "weights"]
