"""msjax's ResNet-50 against a PyTorch ResNet-50 with torchvision's state-dict layout.

The oracle (``torch_resnet.py``) gets random weights and non-trivial BatchNorm running
statistics; its state dict goes through the real converter, and msjax's pooled features
must match PyTorch's in eval mode, with frozen BatchNorm in train mode, and with live
BatchNorm in train mode (running statistics included). conftest enables x64, so every
array here is float32 explicitly. Forward passes are jitted: one whole-network compile
is cheaper on a CPU than compiling each op eagerly.
"""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import torch  # noqa: E402  (a test extra: the reference network)

from msjax import models
from msjax.models import resnet, weights  # noqa: E402
from torch_resnet import TorchResNet50, randomize_  # noqa: E402

TOL = 1e-4  # max |error| / max |torch feature|, float32


@nnx.jit
def _forward(model, images):
  return model(images)  # in train mode, BatchNorm's updates reach the model


def _model(**kw):
  return resnet.ResNet50(rngs=nnx.Rngs(0), **kw)


def _loaded(arrays, **kw):
  model = _model(**kw)
  weights.assign(model, arrays)
  model.eval()
  return model


def _images(size, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, size, size, 3)).astype(np.float32)


def _torch_features(model, images, pooling="avg"):
  with torch.no_grad():
    return model.features(torch.from_numpy(images).permute(0, 3, 1, 2), pooling).numpy()


def _rel_err(got, want):
  got = np.asarray(got, np.float32)
  assert got.shape == want.shape
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.fixture(scope="module")
def reference():
  return randomize_(TorchResNet50().eval(), seed=0)


@pytest.fixture(scope="module")
def abstract_model():
  return nnx.eval_shape(_model)  # the converter needs only the shapes


@pytest.fixture(scope="module")
def arrays(reference, abstract_model):
  return weights.convert_state_dict(abstract_model, reference.state_dict(),
                                    ignore_prefixes=resnet.TORCH_IGNORE)


@pytest.fixture(scope="module")
def avg_model(arrays):
  return _loaded(arrays)


def test_eval_matches_torch(reference, avg_model):
  images = _images(97)  # odd: 97 -> 49 -> 25 -> 25 -> 13 -> 7 -> 4
  got = _forward(avg_model, jnp.asarray(images))
  assert got.shape == (2, resnet.NUM_FEATURES) and got.dtype == jnp.float32
  assert _rel_err(got, _torch_features(reference, images)) <= TOL


def test_frozen_bn_in_train_mode_is_eval_and_max_pooling(reference, arrays):
  """Frozen BatchNorm in train mode computes eval mode's features and moves nothing."""
  images = _images(97, seed=1)
  model = _loaded(arrays, frozen_bn=True, pooling="max")
  model.train()
  got = _forward(model, jnp.asarray(images))
  assert _rel_err(got, _torch_features(reference, images, "max")) <= TOL  # torch in eval
  for path, var in weights.flat_variables(model).items():
    np.testing.assert_array_equal(np.asarray(var[...]), arrays[path], err_msg=path)


def test_live_bn_train_mode_matches_torch(reference, arrays):
  images = _images(97, seed=2)
  ref = copy.deepcopy(reference).train()
  want = _torch_features(ref, images)  # also moves ref's running statistics
  model = _loaded(arrays)
  model.train()
  assert _rel_err(_forward(model, jnp.asarray(images)), want) <= TOL
  updated = weights.convert_state_dict(model, ref.state_dict(),
                                       ignore_prefixes=resnet.TORCH_IGNORE)
  stats = {path: np.asarray(var[...]) for path, var in weights.flat_variables(model).items()
           if path.endswith(("/mean", "/var"))}
  assert len(stats) == 2 * 53
  for path, mine in stats.items():
    theirs = updated[path]
    assert not np.array_equal(theirs, arrays[path]), path  # the statistics did move
    err = np.max(np.abs(mine - theirs)) / np.max(np.abs(theirs))
    assert err <= TOL, (path, err)


def test_converter_takes_exactly_torchvision_keys(reference, abstract_model):
  state = reference.state_dict()
  # torchvision resnet50: 53 convolutions, 53 BatchNorms x 5 entries, fc weight and bias.
  assert len(state) == 320
  assert sum(k.endswith("num_batches_tracked") for k in state) == 53
  arrays = weights.convert_state_dict(abstract_model, state,
                                      ignore_prefixes=resnet.TORCH_IGNORE)
  assert set(arrays) == set(weights.flat_variables(abstract_model))
  assert len(arrays) == 53 + 53 * 4
  assert arrays["layer1/0/downsample/0/kernel"].shape == (1, 1, 64, 256)
  np.testing.assert_array_equal(arrays["layer2/0/conv2/kernel"],
                                state["layer2.0.conv2.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(arrays["layer4/2/bn3/var"],
                                state["layer4.2.bn3.running_var"].numpy())

  missing = dict(state)
  del missing["layer3.4.bn2.running_var"]
  with pytest.raises(ValueError, match=r"missing 1 key\(s\): layer3\.4\.bn2\.running_var"):
    weights.convert_state_dict(abstract_model, missing, ignore_prefixes=resnet.TORCH_IGNORE)
  extra = dict(state)
  extra["layer4.3.conv1.weight"] = state["layer4.2.conv1.weight"]
  with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): layer4\.3\.conv1\.weight"):
    weights.convert_state_dict(abstract_model, extra, ignore_prefixes=resnet.TORCH_IGNORE)
  with pytest.raises(ValueError, match=r"unexpected 2 key\(s\): fc\.bias, fc\.weight"):
    weights.convert_state_dict(abstract_model, state)  # the classifier is not in the trunk


def test_parameter_count_and_init(reference):
  model = models.create_backbone("resnet50", rngs=nnx.Rngs(0))  # initialises in one call
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  n_torch = sum(p.numel() for p in reference.parameters())
  n_fc = sum(p.numel() for p in reference.fc.parameters())
  assert (n_torch, n_fc) == (25_557_032, 2_049_000)
  assert sum(p.size for _, p in params) == n_torch - n_fc == 23_508_032
  assert model.num_features == resnet.NUM_FEATURES == 2048
  assert resnet.ARCH == "resnet50"
  # torchvision's init: kaiming normal (fan_out, relu) kernels, BatchNorm at identity.
  for path, var in weights.flat_variables(model).items():
    value = np.asarray(var[...])
    assert value.dtype == np.float32, path
    if path.endswith("/kernel"):
      kh, kw, _, out = value.shape
      np.testing.assert_allclose(value.std(), np.sqrt(2 / (kh * kw * out)), rtol=0.1,
                                 err_msg=path)
    else:
      np.testing.assert_array_equal(value, 1.0 if path.endswith(("/scale", "/var")) else 0.0)


def test_bfloat16_compute(arrays, avg_model):
  images = jnp.asarray(_images(97, seed=3))
  want = np.asarray(_forward(avg_model, images))
  model = _loaded(arrays, dtype=jnp.bfloat16)
  assert {v.dtype for v in weights.flat_variables(model).values()} == {jnp.dtype(jnp.float32)}
  got = _forward(model, images)
  assert got.dtype == jnp.bfloat16 and got.shape == (2, 2048)
  assert _rel_err(got, want) <= 5e-2


def test_unknown_pooling_is_rejected():
  with pytest.raises(ValueError, match="pooling"):
    _model(pooling="sum")
