"""A minimal PyTorch ResNet-50 (torch.nn only): the oracle for msjax.models.resnet.

Its state dict has exactly torchvision ``resnet50``'s keys and shapes (``fc`` and the
BatchNorm ``num_batches_tracked`` buffers included), so it stands in for a torchvision
or timm ImageNet checkpoint in the tests without needing torchvision.
"""

import torch
from torch import nn

import torch_common


class Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, in_features, width, stride):
    super().__init__()
    out_features = width * self.expansion
    self.conv1 = nn.Conv2d(in_features, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out_features, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out_features)
    self.relu = nn.ReLU(inplace=True)
    self.downsample = None
    if stride != 1 or in_features != out_features:
      self.downsample = nn.Sequential(
          nn.Conv2d(in_features, out_features, 1, stride=stride, bias=False),
          nn.BatchNorm2d(out_features))

  def forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    y = self.relu(self.bn1(self.conv1(x)))
    y = self.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return self.relu(y + identity)


class TorchResNet50(nn.Module):
  """torchvision's resnet50 module tree; ``features`` gives the globally pooled trunk."""

  def __init__(self, num_classes=1000):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
    in_features = 64
    for i, (width, blocks, stride) in enumerate(
        ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), start=1):
      stage = []
      for j in range(blocks):
        stage.append(Bottleneck(in_features, width, stride if j == 0 else 1))
        in_features = width * Bottleneck.expansion
      setattr(self, f"layer{i}", nn.Sequential(*stage))
    self.avgpool = nn.AdaptiveAvgPool2d(1)
    self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

  def trunk(self, x):
    """NCHW images -> the last feature map ``[B, 2048, h, w]``."""
    x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
    return self.layer4(self.layer3(self.layer2(self.layer1(x))))

  def features(self, x, pooling="avg"):
    """NCHW images -> ``[B, 2048]`` by global average or max pooling."""
    x = self.trunk(x)
    return x.mean(dim=(2, 3)) if pooling == "avg" else x.amax(dim=(2, 3))

  def forward(self, x):
    return self.fc(torch.flatten(self.avgpool(self.trunk(x)), 1))


def randomize_(model, seed=0):
  """Random weights and BatchNorm statistics (``torch_common.randomize_``). He-scaled, so activations stay O(1) through the 50 layers."""
  return torch_common.randomize_(model, seed)
