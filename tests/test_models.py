"""Layers against PyTorch, the embedding head, the small CNN, and weight loading."""

import numpy as np
import pytest
import torch

import jax
import jax.numpy as jnp
from flax import nnx

from msjax import models
from msjax.models import layers, weights
from msjax.models.head import EmbeddingHead

F32 = jnp.float32


def nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1), F32)


def nchw(y):
  return np.asarray(y).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("size", [7, 8, 13, 28, 56, 113])
def test_pooling_matches_torch(size):
  rng = np.random.default_rng(size)
  x = rng.normal(size=(2, 3, size, size + 1)).astype(np.float32)
  xt = torch.tensor(x)
  for k, s, p, ceil in [(3, 2, 0, True), (3, 2, 1, True), (3, 1, 1, True), (3, 2, 0, False),
                        (2, 2, 0, True), (3, 2, 1, False), (5, 3, 2, True)]:
    want = torch.nn.functional.max_pool2d(xt, k, s, p, ceil_mode=ceil).numpy()
    got = nchw(layers.max_pool(nhwc(x), k, s, p, ceil))
    assert got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    for cip in (True, False):
      want = torch.nn.functional.avg_pool2d(xt, k, s, p, ceil_mode=ceil,
                                            count_include_pad=cip).numpy()
      got = nchw(layers.avg_pool(nhwc(x), k, s, p, ceil, cip))
      assert got.shape == want.shape
      np.testing.assert_allclose(got, want, atol=1e-6)


def test_pooling_gradients_match_torch():
  x = np.random.default_rng(4).normal(size=(2, 3, 13, 12)).astype(np.float32)
  x[0, 0, :3, :3] = 1.0  # tied maxima inside windows
  for ours, theirs in (
      (lambda v: layers.max_pool(v, 3, 2, 1, True),
       lambda v: torch.nn.functional.max_pool2d(v, 3, 2, 1, ceil_mode=True)),
      (lambda v: layers.avg_pool(v, 3, 2, 1, True, True),
       lambda v: torch.nn.functional.avg_pool2d(v, 3, 2, 1, ceil_mode=True)),
      (lambda v: layers.avg_pool(v, 3, 1, 1, True, False),
       lambda v: torch.nn.functional.avg_pool2d(v, 3, 1, 1, ceil_mode=True,
                                                count_include_pad=False))):
    got = jax.grad(lambda v: jnp.sum(jnp.sin(ours(v))))(nhwc(x))
    xt = torch.tensor(x, requires_grad=True)
    torch.sin(theirs(xt)).sum().backward()
    np.testing.assert_allclose(nchw(got), xt.grad.numpy(), atol=1e-6)


def test_every_parameter_of_backbone_and_head_gets_a_gradient():
  from msjax.losses import ms_loss_from_embeddings
  model = models.create_model("small_cnn", 16, rngs=nnx.Rngs(0))
  model.train()
  x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 16, 16, 3)), F32)
  labels = jnp.repeat(jnp.arange(4), 2)
  grads = nnx.grad(lambda m: ms_loss_from_embeddings(m(x), labels))(model)
  for path, g in nnx.to_flat_state(grads):
    assert np.all(np.isfinite(g[...])) and np.abs(g[...]).sum() > 0, path


def test_conv_matches_torch():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 17, 15)).astype(np.float32)
  for k, s, p, bias in [(7, 2, 3, True), (3, 1, 1, False), (1, 1, 0, True), (3, 2, 1, False)]:
    t = torch.nn.Conv2d(3, 5, k, s, p, bias=bias)
    c = layers.conv(3, 5, k, stride=s, padding=p, bias=bias, rngs=nnx.Rngs(0))
    c.kernel[...] = jnp.asarray(t.weight.detach().numpy().transpose(2, 3, 1, 0))
    if bias:
      c.bias[...] = jnp.asarray(t.bias.detach().numpy())
    want = t(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(nchw(c(nhwc(x))), want, atol=2e-5)


def test_batchnorm_train_eval_and_frozen_match_torch():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 6, 5, 5)).astype(np.float32) * 3 + 1
  t = torch.nn.BatchNorm2d(6, eps=1e-3, momentum=0.2)
  with torch.no_grad():
    t.weight.copy_(torch.tensor(rng.uniform(0.5, 2, 6)))
    t.bias.copy_(torch.tensor(rng.normal(size=6)))
    t.running_mean.copy_(torch.tensor(rng.normal(size=6)))
    t.running_var.copy_(torch.tensor(rng.uniform(0.5, 2, 6)))
  bn = layers.BatchNorm(6, epsilon=1e-3, momentum=0.2)
  for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("mean", "running_mean"),
                       ("var", "running_var")):
    # A copy: on CPU jnp.asarray may alias the tensor, which torch then updates in place.
    getattr(bn, ours)[...] = jnp.array(getattr(t, theirs).detach().numpy().copy(), F32)
  frozen = layers.BatchNorm(6, epsilon=1e-3, frozen=True)
  nnx.update(frozen, nnx.state(bn))
  t.eval()
  bn.use_running_average = True
  eval_want = t(torch.tensor(x)).detach().numpy()
  np.testing.assert_allclose(nchw(bn(nhwc(x))), eval_want, atol=1e-5)
  # Train mode: batch statistics, running ones moved towards mean and unbiased variance.
  t.train()
  bn.use_running_average = False
  for _ in range(2):
    want = t(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(nchw(bn(nhwc(x))), want, atol=1e-5)
  np.testing.assert_allclose(bn.mean[...], t.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(bn.var[...], t.running_var.numpy(), atol=1e-5)
  # Frozen: running statistics in training too, and they stay put.
  frozen.use_running_average = False
  before = np.asarray(frozen.var[...])
  np.testing.assert_allclose(nchw(frozen(nhwc(x))), eval_want, atol=1e-5)
  np.testing.assert_array_equal(frozen.var[...], before)


def test_frozen_batchnorm_still_trains_its_affine_parameters():
  bn = layers.BatchNorm(3, frozen=True)
  bn.use_running_average = False
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 2, 3)), F32)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(bn)
  assert float(jnp.abs(grads["scale"][...]).sum()) > 0
  assert float(jnp.abs(grads["bias"][...]).sum()) > 0
  assert "mean" not in grads and "var" not in grads  # statistics are not parameters


def test_head_initialisation_and_normalisation():
  head = EmbeddingHead(1024, 512, rngs=nnx.Rngs(0))
  kernel = np.asarray(head.linear.kernel[...])
  assert kernel.shape == (1024, 512)
  assert np.std(kernel) == pytest.approx(np.sqrt(2 / 512), rel=0.02)  # fan_out = 512
  assert abs(np.mean(kernel)) < 1e-3
  np.testing.assert_array_equal(head.linear.bias[...], 0)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 1024)), F32)
  out = head(x)
  assert out.dtype == F32
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=1), 1, atol=1e-6)
  mlp = EmbeddingHead(1024, 64, rngs=nnx.Rngs(0), mlp_hidden=256)
  assert mlp(x).shape == (5, 64) and mlp.hidden.kernel.shape == (1024, 256)


def test_small_cnn_shapes_parameters_and_live_batchnorm():
  model = models.create_backbone("small_cnn", rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), F32)
  assert model(x).shape == (3, 256)
  count = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  chans = (3, 32, 64, 128, 256)
  assert count == sum(9 * a * b + 2 * b for a, b in zip(chans, chans[1:]))
  model.train()
  before = np.asarray(model.bns[0].mean[...])
  model(x)
  assert not np.array_equal(model.bns[0].mean[...], before)  # live statistics
  frozen = models.create_backbone("small_cnn", rngs=nnx.Rngs(0), frozen_bn=True)
  frozen.train()
  np.testing.assert_allclose(frozen(x), models.create_backbone(
      "small_cnn", rngs=nnx.Rngs(0))(x), atol=1e-6)


def test_create_model_embeds_to_unit_vectors_in_bfloat16_too():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 24, 24, 3)), F32)
  for dtype in (None, jnp.bfloat16):
    model = models.create_model("small_cnn", 32, rngs=nnx.Rngs(0), dtype=dtype)
    out = model(x)
    assert out.shape == (2, 32) and out.dtype == F32
    np.testing.assert_allclose(jnp.linalg.norm(out, axis=1), 1, atol=1e-5)
    assert all(v.dtype == F32 for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_pretrained_round_trip_and_errors(tmp_path):
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 16, 16, 3)), F32)
  source = models.create_backbone("small_cnn", rngs=nnx.Rngs(7))
  arrays = {k: np.asarray(v[...]) for k, v in weights.flat_variables(source).items()}
  path = tmp_path / "small.npz"
  weights.save_npz(path, arrays, "small_cnn")
  loaded = models.create_backbone("small_cnn", rngs=nnx.Rngs(0), pretrained=path)
  np.testing.assert_array_equal(loaded(x), source(x))

  with pytest.raises(FileNotFoundError, match="python -m msjax.models.convert"):
    models.create_backbone("small_cnn", rngs=nnx.Rngs(0), pretrained=tmp_path / "nope.npz")
  weights.save_npz(tmp_path / "other.npz", arrays, "resnet50")
  with pytest.raises(ValueError, match="holds 'resnet50' weights but the backbone is 'small_cnn'"):
    models.create_backbone("small_cnn", rngs=nnx.Rngs(0), pretrained=tmp_path / "other.npz")
  bad = dict(arrays)
  bad["convs/0/kernel"] = np.zeros((5, 5, 3, 32), np.float32)
  del bad["bns/3/var"]
  weights.save_npz(tmp_path / "bad.npz", bad, "small_cnn")
  with pytest.raises(ValueError) as err:
    models.create_backbone("small_cnn", rngs=nnx.Rngs(0), pretrained=tmp_path / "bad.npz")
  assert "missing 1 parameter(s): bns/3/var" in str(err.value)
  assert "convs/0/kernel: " in str(err.value) and "(5, 5, 3, 32)" in str(err.value)
  assert "(3, 3, 3, 32)" in str(err.value)


def test_unknown_backbone_and_pooling_are_rejected():
  with pytest.raises(ValueError, match="Unknown backbone 'vgg'"):
    models.create_backbone("vgg", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pooling must be"):
    models.create_backbone("small_cnn", rngs=nnx.Rngs(0), pooling="mean")


def test_convert_command_end_to_end(tmp_path):
  """A torchvision-layout checkpoint (DataParallel-wrapped) -> .npz -> the same features;
  a checkpoint of another architecture is refused and nothing is written."""
  import subprocess
  import sys

  from torch_bninception import TorchBNInception
  from torch_resnet import TorchResNet50, randomize_

  net = TorchResNet50()
  randomize_(net, seed=3)
  net.eval()
  src = tmp_path / "resnet50.pth"
  torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}}, src)
  out = tmp_path / "resnet50.npz"
  cmd = [sys.executable, "-m", "msjax.models.convert", "--arch", "resnet50", "--src",
         str(src), "--out", str(out)]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr
  assert "wrote" in done.stdout and "23,5" in done.stdout  # parameters + BN statistics
  model = models.create_backbone("resnet50", rngs=nnx.Rngs(0), pretrained=out)
  x = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want = net.features(torch.tensor(x)).numpy()
  got = np.asarray(model(nhwc(x)))
  assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()

  wrong = tmp_path / "bninception.pth"
  torch.save(TorchBNInception().state_dict(), wrong)
  cmd[cmd.index(str(src))] = str(wrong)
  cmd[cmd.index(str(out))] = str(tmp_path / "never.npz")
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert done.returncode != 0
  assert "is not a resnet50 checkpoint" in done.stderr and "missing" in done.stderr
  assert not (tmp_path / "never.npz").exists()
