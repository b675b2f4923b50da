"""BN-Inception (Inception v2 with BatchNorm), the MS loss paper's backbone.

The layers, names and shapes are those of the Caffe-converted PyTorch checkpoint
``bn_inception-52deb4733.pth`` (``pretrainedmodels``' ``bninception``), which the
released MS code loads. Every convolution and BatchNorm is an attribute named after its
PyTorch module (``conv1_7x7_s2``, ``conv1_7x7_s2_bn``, ``inception_3a_1x1``, ...,
``inception_5b_pool_proj_bn``), so ``msjax.models.weights`` maps the paths mechanically:
``inception_3a_1x1/kernel`` <-> ``inception_3a_1x1.weight``.

Semantics kept from the checkpoint's network:

* every convolution has a bias and is followed by BatchNorm (eps 1e-5) and ReLU;
* max pooling uses ceil mode (the output size rounds up, the overhanging window sees
  only real cells);
* the pool branch of the inception modules is a 3x3 stride-1 average pool with padding 1
  that counts the padding in its divisor, except in 5b, which max-pools; the stride-2
  modules 3c and 4e max-pool 3x3 stride 2 (ceil mode) and pass the result on unprojected;
* BatchNorm's running statistics move with PyTorch momentum 0.1 in training mode, as in
  the released MS code (whose ``nn.BatchNorm2d`` layers keep PyTorch's defaults). The
  Caffe-converted definition's ``momentum=0.9`` is Caffe's moving-average fraction
  copied verbatim; in PyTorch's convention it would weight each batch 0.9.

Input: ``[B, H, W, 3]`` BGR images in 0-255 minus the mean [104, 117, 128] (std 1).
Output: ``[B, 1024]``, the last feature map globally max- (default) or average-pooled.
As in the PyTorch network, the branches of the stride-2 modules 3c and 4e only agree in
size for inputs of 32k - 1 to 32k + 6 pixels (a k x k final map), e.g. 224 and 227 (the
MS code's crop); other sizes raise an error. The ImageNet classifier ``last_linear`` is
not built.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from msjax.models.layers import BatchNorm, avg_pool, check_pooling, conv, global_pool, max_pool

ARCH = "bninception"
TORCH_IGNORE = ("last_linear.",)  # the ImageNet classifier
NUM_FEATURES = 1024

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: new = (1 - m) * old + m * batch

# Inception modules in order: (name, in, 1x1, (3x3 reduce, 3x3), (double reduce, double),
# pool). 1x1 == 0: no 1x1 branch. pool is "avg" or "max" (3x3 stride 1, padding 1, then a
# 1x1 projection to the given width) or "max_s2" (3x3 stride 2, no projection; the module
# also strides its 3x3 and second double 3x3 convolutions by 2).
_MODULES = (
    ("3a", 192, 64, (64, 64), (64, 96), ("avg", 32)),
    ("3b", 256, 64, (64, 96), (64, 96), ("avg", 64)),
    ("3c", 320, 0, (128, 160), (64, 96), ("max_s2", 0)),
    ("4a", 576, 224, (64, 96), (96, 128), ("avg", 128)),
    ("4b", 576, 192, (96, 128), (96, 128), ("avg", 128)),
    ("4c", 576, 160, (128, 160), (128, 160), ("avg", 128)),
    ("4d", 608, 96, (128, 192), (160, 192), ("avg", 128)),
    ("4e", 608, 0, (128, 192), (192, 256), ("max_s2", 0)),
    ("5a", 1056, 352, (192, 320), (160, 224), ("avg", 128)),
    ("5b", 1024, 352, (192, 320), (192, 224), ("max", 128)),
)


class BNInception(nnx.Module):
  """BN-Inception trunk with global pooling: ``[B, H, W, 3] -> [B, 1024]``.

  Args:
    rngs: initialisation randomness (the weights are normally loaded afterwards).
    pooling: ``"max"`` (the released MS code's), ``"avg"`` or ``"avg+max"`` global pooling.
    frozen_bn: every BatchNorm uses its running statistics, also in ``model.train()``.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` follows the input.
    param_dtype: parameter and batch-statistic dtype.
  """

  def __init__(self, *, rngs: nnx.Rngs, pooling: str = "max", frozen_bn: bool = False,
               dtype=None, param_dtype=jnp.float32):
    check_pooling(pooling)
    self.pooling = pooling
    self.num_features = NUM_FEATURES
    self.dtype = dtype

    def unit(name, cin, cout, kernel, *, stride=1, padding=0):
      """Adds the convolution ``name`` and its BatchNorm ``name + "_bn"``."""
      setattr(self, name,
              conv(cin, cout, kernel, stride=stride, padding=padding, bias=True,
                   rngs=rngs, dtype=dtype, param_dtype=param_dtype))
      setattr(self, name + "_bn",
              BatchNorm(cout, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, frozen=frozen_bn,
                        dtype=dtype, param_dtype=param_dtype))

    unit("conv1_7x7_s2", 3, 64, 7, stride=2, padding=3)
    unit("conv2_3x3_reduce", 64, 64, 1)
    unit("conv2_3x3", 64, 192, 3, padding=1)
    for name, cin, n1x1, (r3, n3), (rd, nd), (pool, nproj) in _MODULES:
      p, s = f"inception_{name}_", 2 if pool == "max_s2" else 1
      if n1x1:
        unit(p + "1x1", cin, n1x1, 1)
      unit(p + "3x3_reduce", cin, r3, 1)
      unit(p + "3x3", r3, n3, 3, stride=s, padding=1)
      unit(p + "double_3x3_reduce", cin, rd, 1)
      unit(p + "double_3x3_1", rd, nd, 3, padding=1)
      unit(p + "double_3x3_2", nd, nd, 3, stride=s, padding=1)
      if nproj:
        unit(p + "pool_proj", cin, nproj, 1)

  def _apply(self, name, x):
    """Convolution ``name`` -> its BatchNorm -> ReLU."""
    return nnx.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

  def _inception(self, name, x, has_1x1, pool):
    p = f"inception_{name}_"
    branches = [self._apply(p + "1x1", x)] if has_1x1 else []
    branches.append(self._apply(p + "3x3", self._apply(p + "3x3_reduce", x)))
    y = self._apply(p + "double_3x3_reduce", x)
    branches.append(self._apply(p + "double_3x3_2", self._apply(p + "double_3x3_1", y)))
    if pool == "max_s2":
      branches.append(max_pool(x, 3, 2, 0, ceil_mode=True))
    else:
      if pool == "avg":
        y = avg_pool(x, 3, 1, 1, ceil_mode=True, count_include_pad=True)
      else:
        y = max_pool(x, 3, 1, 1, ceil_mode=True)
      branches.append(self._apply(p + "pool_proj", y))
    shapes = {b.shape[1:3] for b in branches}
    if len(shapes) != 1:
      raise ValueError(f"inception_{name}: branch maps {sorted(shapes)} differ; "
                       "BN-Inception needs inputs of 32k - 1 to 32k + 6 pixels (e.g. 224 "
                       "or 227).")
    return jnp.concatenate(branches, axis=-1)

  def features(self, x):
    """Images ``[B, H, W, 3]`` -> the last feature map ``[B, h, w, 1024]``."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = self._apply("conv1_7x7_s2", x)
    x = max_pool(x, 3, 2, 0, ceil_mode=True)
    x = self._apply("conv2_3x3", self._apply("conv2_3x3_reduce", x))
    x = max_pool(x, 3, 2, 0, ceil_mode=True)
    for name, _, n1x1, _, _, (pool, _) in _MODULES:
      x = self._inception(name, x, bool(n1x1), pool)
    return x

  def __call__(self, x):
    return global_pool(self.features(x), self.pooling)
