"""A PyTorch BN-Inception (torch.nn only): the oracle for msjax.models.bninception.

Its state dict has exactly the keys and shapes of the Caffe-converted checkpoint
``bn_inception-52deb4733.pth`` (``pretrainedmodels``' ``bninception``; the ImageNet
classifier ``last_linear`` 1024 -> 1000 included, plus BatchNorm's
``num_batches_tracked`` buffers, which converters ignore), so it stands in for that
checkpoint in the tests. Written independently of msjax: its own branch table, NCHW,
``nn.MaxPool2d``/``nn.AvgPool2d`` for the pooling semantics (ceil mode, padding counted).
"""

import torch
from torch import nn
from torch.nn import functional as F

import torch_common

# (module, in, 1x1 width or None, 3x3 (reduce, out), double 3x3 (reduce, out),
#  pool kind, pool projection width or None, stride of the 3x3 convolutions)
MODULES = [
    ("3a", 192, 64, (64, 64), (64, 96), "avg", 32, 1),
    ("3b", 256, 64, (64, 96), (64, 96), "avg", 64, 1),
    ("3c", 320, None, (128, 160), (64, 96), "max", None, 2),
    ("4a", 576, 224, (64, 96), (96, 128), "avg", 128, 1),
    ("4b", 576, 192, (96, 128), (96, 128), "avg", 128, 1),
    ("4c", 576, 160, (128, 160), (128, 160), "avg", 128, 1),
    ("4d", 608, 96, (128, 192), (160, 192), "avg", 128, 1),
    ("4e", 608, None, (128, 192), (192, 256), "max", None, 2),
    ("5a", 1056, 352, (192, 320), (160, 224), "avg", 128, 1),
    ("5b", 1024, 352, (192, 320), (192, 224), "max", 128, 1),
]


class TorchBNInception(nn.Module):
  """BN-Inception with the published checkpoint's module names (all flat attributes)."""

  def __init__(self, num_classes=1000, bn_momentum=0.1):
    super().__init__()
    self.bn_momentum = bn_momentum
    self._conv_bn("conv1_7x7_s2", 3, 64, 7, 2, 3)
    self.pool1_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    self._conv_bn("conv2_3x3_reduce", 64, 64, 1)
    self._conv_bn("conv2_3x3", 64, 192, 3, 1, 1)
    self.pool2_3x3_s2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
    for name, cin, n1, (r3, n3), (rd, nd), pool, proj, stride in MODULES:
      p = f"inception_{name}_"
      if n1:
        self._conv_bn(p + "1x1", cin, n1, 1)
      self._conv_bn(p + "3x3_reduce", cin, r3, 1)
      self._conv_bn(p + "3x3", r3, n3, 3, stride, 1)
      self._conv_bn(p + "double_3x3_reduce", cin, rd, 1)
      self._conv_bn(p + "double_3x3_1", rd, nd, 3, 1, 1)
      self._conv_bn(p + "double_3x3_2", nd, nd, 3, stride, 1)
      if stride == 2:
        pool_layer = nn.MaxPool2d(3, stride=2, ceil_mode=True)
      elif pool == "avg":
        pool_layer = nn.AvgPool2d(3, stride=1, padding=1, ceil_mode=True,
                                  count_include_pad=True)
      else:
        pool_layer = nn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True)
      setattr(self, p + "pool", pool_layer)
      if proj:
        self._conv_bn(p + "pool_proj", cin, proj, 1)
    self.last_linear = nn.Linear(1024, num_classes)

  def _conv_bn(self, name, cin, cout, kernel, stride=1, padding=0):
    setattr(self, name, nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding))
    setattr(self, name + "_bn", nn.BatchNorm2d(cout, eps=1e-5, momentum=self.bn_momentum))

  def _cbr(self, name, x):
    return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

  def trunk(self, x):
    """NCHW images -> the last feature map ``[B, 1024, h, w]``."""
    x = self.pool1_3x3_s2(self._cbr("conv1_7x7_s2", x))
    x = self.pool2_3x3_s2(self._cbr("conv2_3x3", self._cbr("conv2_3x3_reduce", x)))
    for name, _, n1, _, _, _, proj, _ in MODULES:
      p = f"inception_{name}_"
      outs = [self._cbr(p + "1x1", x)] if n1 else []
      outs.append(self._cbr(p + "3x3", self._cbr(p + "3x3_reduce", x)))
      y = self._cbr(p + "double_3x3_1", self._cbr(p + "double_3x3_reduce", x))
      outs.append(self._cbr(p + "double_3x3_2", y))
      y = getattr(self, p + "pool")(x)
      outs.append(self._cbr(p + "pool_proj", y) if proj else y)
      x = torch.cat(outs, dim=1)
    return x

  def features(self, x, pooling="max"):
    """NCHW images -> ``[B, 1024]`` by global max (the MS code's) or average pooling."""
    x = self.trunk(x)
    return x.amax(dim=(2, 3)) if pooling == "max" else x.mean(dim=(2, 3))

  def forward(self, x):
    return self.last_linear(self.features(x, "avg"))


def randomize_(model, seed=0):
  """Random weights and BatchNorm statistics (``torch_common.randomize_``). Caffe-scale inputs (~±128): the first convolution is scaled down by 64."""
  return torch_common.randomize_(model, seed, first_conv_scale=64.0)
