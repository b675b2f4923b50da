"""ResNet-50 in torchvision's layout, for ImageNet weights from torchvision or timm.

The blocks are Bottleneck v1.5 (the stride sits on the 3x3 convolution), as in
torchvision's ``resnet50`` and timm's ``resnet50``. Every submodule carries the name of
the PyTorch module whose weights it loads, so ``msjax.models.weights`` maps the paths
mechanically: ``layer1/0/downsample/0/kernel`` <-> ``layer1.0.downsample.0.weight``.

Input: ``[B, H, W, 3]`` RGB images normalised with the ImageNet mean and std.
Output: ``[B, 2048]`` globally pooled features (the classifier ``fc`` is not built).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from msjax.models.layers import BatchNorm, check_pooling, conv, global_pool, max_pool

ARCH = "resnet50"
TORCH_IGNORE = ("fc.",)  # the ImageNet classifier
NUM_FEATURES = 2048

_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (width, blocks, stride)
_EXPANSION = 4


def _conv(in_features, out_features, kernel, *, stride=1, padding=0, rngs, dtype,
          param_dtype):
  return conv(in_features, out_features, kernel, stride=stride, padding=padding, bias=False,
              rngs=rngs, dtype=dtype, param_dtype=param_dtype)


class Bottleneck(nnx.Module):
  """1x1 reduce -> 3x3 (strided) -> 1x1 expand, plus the (projected) identity."""

  def __init__(self, in_features, width, stride, *, frozen_bn, rngs, dtype, param_dtype):
    out_features = width * _EXPANSION
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    bn = lambda n: BatchNorm(n, frozen=frozen_bn, dtype=dtype, param_dtype=param_dtype)
    self.conv1 = _conv(in_features, width, 1, **kw)
    self.bn1 = bn(width)
    self.conv2 = _conv(width, width, 3, stride=stride, padding=1, **kw)
    self.bn2 = bn(width)
    self.conv3 = _conv(width, out_features, 1, **kw)
    self.bn3 = bn(out_features)
    if stride != 1 or in_features != out_features:
      self.downsample = nnx.List([_conv(in_features, out_features, 1, stride=stride, **kw),
                                  bn(out_features)])
    else:
      self.downsample = None

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = nnx.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    if self.downsample is not None:
      proj, bn = self.downsample
      x = bn(proj(x))
    return nnx.relu(y + x)


class ResNet50(nnx.Module):
  """torchvision's ResNet-50 trunk with global pooling: ``[B, H, W, 3] -> [B, 2048]``.

  Args:
    rngs: initialisation randomness. ``create_backbone`` builds the network abstract and
      initialises every variable in one compiled call (``weights.initialise``).
    pooling: ``"avg"`` (torchvision's), ``"max"`` or ``"avg+max"`` global pooling.
    frozen_bn: every BatchNorm uses its running statistics, also in ``model.train()``.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` follows the input.
    param_dtype: parameter and batch-statistic dtype.
  """

  def __init__(self, *, rngs: nnx.Rngs, pooling: str = "avg", frozen_bn: bool = False,
               dtype=None, param_dtype=jnp.float32):
    check_pooling(pooling)
    self.pooling = pooling
    self.num_features = NUM_FEATURES
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv1 = _conv(3, 64, 7, stride=2, padding=3, **kw)
    self.bn1 = BatchNorm(64, frozen=frozen_bn, dtype=dtype, param_dtype=param_dtype)
    in_features = 64
    for i, (width, blocks, stride) in enumerate(_STAGES, start=1):
      stage = []
      for j in range(blocks):
        stage.append(Bottleneck(in_features, width, stride if j == 0 else 1,
                                frozen_bn=frozen_bn, **kw))
        in_features = width * _EXPANSION
      setattr(self, f"layer{i}", nnx.List(stage))

  def __call__(self, x):
    if self.dtype is not None:
      x = x.astype(self.dtype)
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = max_pool(x, 3, 2, 1)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x)
    return global_pool(x, self.pooling)
