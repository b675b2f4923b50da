"""Backbones (BN-Inception, ResNet-50, Vision Transformers, a small CNN) in Flax NNX, the
embedding head, and PyTorch-weight conversion.

``create_backbone(name, rngs=...)`` returns a module that maps images ``[B, H, W, 3]``,
already normalised in the backbone's input convention (``INPUT_CONVENTIONS``), to pooled
features ``[B, F]``; ``create_model`` puts the embedding head on top.
"""

from __future__ import annotations

import importlib

import jax.numpy as jnp
from flax import nnx

from msjax.models import layers, vit, weights
from msjax.models.head import EmbeddingHead

# name -> (module, class or builder); imported on first use.
BACKBONES = {
    "bninception": ("msjax.models.bninception", "BNInception"),
    "resnet50": ("msjax.models.resnet", "ResNet50"),
    "small_cnn": ("msjax.models.small_cnn", "SmallCNN"),
    **{name: ("msjax.models.vit", name) for name in vit.SIZES},
}

# How images must be normalised for each backbone (the data pipeline applies it):
# "caffe_bgr": BGR, 0-255, minus mean [104, 117, 128], std 1 (the Caffe-converted weights);
# "imagenet_rgb": RGB in [0, 1], minus mean [0.485, 0.456, 0.406], over std [0.229, 0.224,
# 0.225] (torchvision/timm weights, DINO and DINOv2).
INPUT_CONVENTIONS = {"bninception": "caffe_bgr", "resnet50": "imagenet_rgb",
                     "small_cnn": "imagenet_rgb", **{n: "imagenet_rgb" for n in vit.SIZES}}

# Global pooling by default: max for BN-Inception as in the released MS code; a ViT's
# CLS token.
DEFAULT_POOLING = {"bninception": "max", "resnet50": "avg", "small_cnn": "avg",
                   **{n: "cls" for n in vit.SIZES}}


def poolings(name: str) -> tuple[str, ...]:
  """The pooling choices of backbone ``name``."""
  return vit.POOLINGS if name in vit.SIZES else layers.POOLINGS


def check_pooling(name: str, pooling: str):
  layers.check_pooling(pooling, poolings(name), name)


def backbone_class(name: str):
  if name not in BACKBONES:
    raise ValueError(f"Unknown backbone {name!r}; choose one of {sorted(BACKBONES)}.")
  module, cls = BACKBONES[name]
  return getattr(importlib.import_module(module), cls)


def create_backbone(name: str, *, rngs: nnx.Rngs, pretrained=None, pooling: str | None = None,
                    frozen_bn: bool = False, dtype=None, param_dtype=jnp.float32,
                    remat: bool = False):
  """A backbone by name, optionally with converted pretrained weights.

  Args:
    name: one of ``BACKBONES``: ``"bninception"``, ``"resnet50"``, a ViT of
      ``vit.SIZES`` (``"vit_s16"``, ``"vit_b16"``, ``"vit_s14"`` ...) or ``"small_cnn"``.
    rngs: initialisation randomness.
    pretrained: a converted ``.npz`` (local or ``gs://``), from
      ``python -m msjax.models.convert``; every parameter and BatchNorm statistic is
      loaded, and a missing file, another architecture's file or a shape mismatch raises
      an error naming the problem.
    pooling: one of ``poolings(name)``: global ``"max"``, ``"avg"`` or ``"avg+max"`` for
      the CNNs, ``"cls"``, ``"mean"`` or ``"cls+mean"`` for a ViT (default:
      ``DEFAULT_POOLING[name]``; max for BN-Inception, as the released MS code).
    frozen_bn: BatchNorm uses its running statistics in training too (affine parameters
      still train), as the released MS code does. A ViT has no BatchNorm.
    dtype: compute dtype (``jnp.bfloat16`` on TPU/GPU); parameters stay ``param_dtype``.
    remat: a ViT recomputes each block in the backward pass (less activation memory).

  Returns:
    An ``nnx.Module`` in eval mode; ``module(images) -> [B, module.num_features]``.
  """
  cls = backbone_class(name)
  if pooling is not None:
    check_pooling(name, pooling)
  options = dict(remat=remat) if name in vit.SIZES else dict(frozen_bn=frozen_bn)
  # Built abstract, then filled in one go: flax's eager initialisers compile once per
  # kernel shape, about a minute for BN-Inception on a CPU.
  model = nnx.eval_shape(lambda: cls(
      rngs=nnx.Rngs(0), pooling=pooling or DEFAULT_POOLING[name], dtype=dtype,
      param_dtype=param_dtype, **options))
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
                 mlp_hidden: int | None = None, dtype=None, param_dtype=jnp.float32,
                 remat: bool = False):
  """``Embedder(create_backbone(...), EmbeddingHead(...))``, in eval mode."""
  if embedding_dim < 1:
    raise ValueError(f"embedding_dim must be positive; got {embedding_dim}.")
  body = create_backbone(backbone, rngs=rngs, pretrained=pretrained, pooling=pooling,
                         frozen_bn=frozen_bn, dtype=dtype, param_dtype=param_dtype,
                         remat=remat)
  head = EmbeddingHead(body.num_features, embedding_dim, rngs=rngs, mlp_hidden=mlp_hidden,
                       dtype=dtype, param_dtype=param_dtype)
  model = Embedder(body, head)
  model.eval()
  return model


__all__ = ["BACKBONES", "INPUT_CONVENTIONS", "DEFAULT_POOLING", "EmbeddingHead",
           "Embedder", "backbone_class", "check_pooling", "create_backbone", "create_model",
           "poolings", "vit", "weights"]
