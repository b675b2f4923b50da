"""A small CNN for the synthetic default and fast CPU tests: four conv-BN-ReLU stages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from msjax.models import layers

ARCH = "small_cnn"
TORCH_IGNORE = ()
WIDTHS = (32, 64, 128, 256)


class SmallCNN(nnx.Module):
  """``conv3x3-BN-ReLU`` stages of ``WIDTHS`` channels, 2×2 max pooling between them, then
  global pooling: ``[B, H, W, 3] -> [B, 256]``. BatchNorm is live (batch statistics in
  training) unless ``frozen_bn``."""

  def __init__(self, *, rngs: nnx.Rngs, pooling: str = "avg", frozen_bn: bool = False,
               dtype=None, param_dtype=jnp.float32, widths=WIDTHS):
    self.pooling = pooling
    self.num_features = widths[-1]
    chans = (3,) + tuple(widths)
    self.convs = nnx.List([
        layers.conv(chans[i], chans[i + 1], 3, padding=1, bias=False, rngs=rngs,
                    dtype=dtype, param_dtype=param_dtype) for i in range(len(widths))])
    self.bns = nnx.List([
        layers.BatchNorm(w, frozen=frozen_bn, dtype=dtype, param_dtype=param_dtype)
        for w in widths])

  def __call__(self, x):
    for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
      if i:
        x = layers.max_pool(x, 2)
      x = jax.nn.relu(bn(conv(x)))
    return layers.global_pool(x, self.pooling)
