"""Layers with PyTorch's exact semantics, for backbones that load PyTorch weights.

Images are NHWC. Convolutions are ``nnx.Conv`` with explicit symmetric padding (PyTorch
``padding=p``); their kernels are HWIO (the converter transposes PyTorch's OIHW).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class BatchNorm(nnx.Module):
  """BatchNorm over the last axis with PyTorch's semantics, and a frozen switch.

  Training mode (``model.train()``) normalises with the batch's biased variance and
  moves the running statistics by ``momentum`` towards the batch mean and *unbiased*
  variance, as ``torch.nn.BatchNorm2d`` does. Eval mode (``model.eval()``) uses the
  running statistics. ``frozen=True`` uses the running statistics in both modes and
  never updates them, while ``scale`` and ``bias`` remain trainable parameters: the
  released MS code's frozen BatchNorm.

  Attributes: ``scale``/``bias`` (``nnx.Param``, PyTorch's weight/bias), ``mean``/``var``
  (``nnx.BatchStat``, running_mean/running_var).
  """

  def __init__(self, features: int, *, epsilon: float = 1e-5, momentum: float = 0.1,
               frozen: bool = False, dtype=None, param_dtype=jnp.float32):
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((features,), param_dtype))
    self.var = nnx.BatchStat(jnp.ones((features,), param_dtype))
    self.epsilon = epsilon
    self.momentum = momentum
    self.frozen = frozen
    self.use_running_average = True
    self.dtype = dtype

  def __call__(self, x):
    dtype = self.dtype or x.dtype
    axes = tuple(range(x.ndim - 1))
    if self.frozen or self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axis=axes)
      var = jnp.mean(jnp.square(xf - mean), axis=axes)
      n = math.prod(x.shape[:-1])
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = ((1 - m) * self.mean[...] + m * mean).astype(self.mean.dtype)
      self.var[...] = ((1 - m) * self.var[...] + m * unbiased).astype(self.var.dtype)
    mul = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    add = self.bias[...] - mean * mul
    return (x * mul.astype(dtype) + add.astype(dtype)).astype(dtype)


def conv(in_features, out_features, kernel, *, stride=1, padding=0, bias=True, rngs,
         dtype=None, param_dtype=jnp.float32):
  """``torch.nn.Conv2d(in, out, kernel, stride, padding, bias=bias)`` as an ``nnx.Conv``."""
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
  stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
  return nnx.Conv(in_features, out_features, kernel, strides=stride,
                  padding=((padding[0], padding[0]), (padding[1], padding[1])),
                  use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _pool_padding(size, kernel, stride, pad, ceil_mode):
  """(low, high) padding so a VALID window gives PyTorch's output size on one axis."""
  span = size + 2 * pad - kernel
  out = (-(-span // stride) if ceil_mode else span // stride) + 1
  if ceil_mode and (out - 1) * stride >= size + pad:  # last window must start inside
    out -= 1
  return pad, (out - 1) * stride + kernel - size - pad


def max_pool(x, kernel, stride=None, padding=0, ceil_mode=False):
  """``torch.nn.MaxPool2d`` on NHWC (padding is -inf)."""
  stride = stride or kernel
  pads = [(0, 0)] + [_pool_padding(n, kernel, stride, padding, ceil_mode)
                     for n in x.shape[1:3]] + [(0, 0)]
  # A scalar identity, so JAX sees the max monoid (reduce_window_max, differentiable).
  init = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
  return jax.lax.reduce_window(x, init, jax.lax.max, (1, kernel, kernel, 1),
                               (1, stride, stride, 1), pads)


def avg_pool(x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True):
  """``torch.nn.AvgPool2d`` on NHWC.

  With ``count_include_pad`` the divisor counts the zero padding but, as in PyTorch, not
  the extra cells a ceil-mode window hangs past the padded input.
  """
  stride = stride or kernel
  pads = [(0, 0)] + [_pool_padding(n, kernel, stride, padding, ceil_mode)
                     for n in x.shape[1:3]] + [(0, 0)]
  window, strides = (1, kernel, kernel, 1), (1, stride, stride, 1)
  zero = 0.0  # a scalar identity: the add monoid (reduce_window_sum, differentiable)
  total = jax.lax.reduce_window(x, zero, jax.lax.add, window, strides, pads)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  if count_include_pad:  # count input and symmetric padding, not the ceil overhang
    ones = jnp.pad(ones, [(0, 0), (padding, padding), (padding, padding), (0, 0)],
                   constant_values=1)
    pads = [(0, 0)] + [(0, hi - padding) for _, hi in pads[1:3]] + [(0, 0)]
  count = jax.lax.reduce_window(ones, zero, jax.lax.add, window, strides, pads)
  return total / count


# Global poolings: max (the released MS code), average, and their sum (the Proxy-Anchor
# release's BN-Inception and ResNet heads).
POOLINGS = ("max", "avg", "avg+max")


def check_pooling(kind, choices=POOLINGS, owner: str = ""):
  """Raises ``ValueError`` unless ``kind`` is one of ``choices`` (``owner``: whose)."""
  if kind not in choices:
    whose = f"{owner}'s " if owner else ""
    raise ValueError(f"{whose}pooling must be one of {choices}; got {kind!r}.")


def global_pool(x, kind="max"):
  """``[B, H, W, C] -> [B, C]`` by max, average, or the sum of both (``"avg+max"``)."""
  check_pooling(kind)
  if kind == "max":
    return jnp.max(x, axis=(1, 2))
  if kind == "avg":
    return jnp.mean(x, axis=(1, 2))
  return jnp.mean(x, axis=(1, 2)) + jnp.max(x, axis=(1, 2))
