"""Fills a PyTorch reference network with random weights: a stand-in checkpoint."""

import torch
from torch import nn


def randomize_(model, seed=0, first_conv_scale=1.0):
  """Random weights and non-trivial BatchNorm statistics, in place.

  Convolutions get He-scaled normal weights (the one on the 3 input channels also divided
  by ``first_conv_scale``, for inputs of a larger scale) and biases ~N(0, 0.1); each
  BatchNorm a random affine (weight ~U(0.5, 1.5), bias ~N(0, 0.1)) and running statistics
  (mean ~N(0, 0.1), var ~U(0.5, 1.5)); linear layers small normal weights. The scales
  keep activations O(1) through deep networks.
  """
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.Conv2d):
        fan_in = m.weight[0].numel()
        scale = (2.0 / fan_in) ** 0.5 / (first_conv_scale if m.in_channels == 3 else 1.0)
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * scale)
        if m.bias is not None:
          m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
      elif isinstance(m, nn.BatchNorm2d):
        n = m.num_features
        m.weight.copy_(0.5 + torch.rand(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
        m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
      elif isinstance(m, nn.Linear):
        m.weight.copy_(0.01 * torch.randn(m.weight.shape, generator=g))
        m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=g))
  return model
