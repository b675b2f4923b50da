"""msjax's BN-Inception against an independent PyTorch oracle, tests/torch_bninception.py.

The oracle carries the published checkpoint's state-dict keys and shapes; it is filled
with random weights and BatchNorm statistics, converted with msjax's generic converter
and loaded, and the two networks must then agree in eval mode, with frozen BatchNorm in
training mode, with live BatchNorm in training mode (outputs and updated running
statistics), for both global poolings, and roughly in bfloat16.

Images are 163 x 163: odd, so ceil-mode max pooling rounds up (82 -> 41 after pool1,
20 -> 10 in 3c, 10 -> 5 in 4e) while the network still ends on a 5 x 5 map, and small
enough for two CPU cores. Models are traced with ``nnx.eval_shape`` (the same
constructor, without running its random initialisers, whose per-shape compilation alone
takes ~45 s on two CPU cores) and then filled by ``weights.assign``; forward passes run
under ``nnx.jit``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from msjax.models import bninception, weights
from msjax.models.bninception import BNInception
from torch_bninception import TorchBNInception, randomize_

SIZE, BATCH = 163, 2
# Parameters of the published bninception (11,295,240) minus last_linear (1024 x 1000
# weights + 1000 biases = 1,025,000): the trunk msjax builds.
TRUNK_PARAMS = 10_270_240
RTOL = 1e-4


@pytest.fixture(scope="module")
def reference():
  return randomize_(TorchBNInception(), seed=0).eval()


@pytest.fixture(scope="module")
def state_dict(reference):
  return {k: v.clone() for k, v in reference.state_dict().items()}


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return rng.uniform(-128.0, 128.0, (BATCH, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_maps(reference, images):
  with torch.no_grad():
    return reference.trunk(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


@functools.cache
def _structure(**kw):
  return nnx.split(nnx.eval_shape(lambda: BNInception(rngs=nnx.Rngs(1), **kw)))


def _model(**kw):
  """``BNInception(**kw)`` with zero weights, built without running its initialisers."""
  graphdef, state = _structure(**kw)
  state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)
  return nnx.merge(graphdef, state)


def _loaded(state_dict, **kw):
  model = _model(param_dtype=jnp.float32, **kw)
  arrays = weights.convert_state_dict(model, state_dict,
                                      ignore_prefixes=bninception.TORCH_IGNORE)
  weights.assign(model, arrays)
  return model


@nnx.jit
def _forward(model, x):
  return model(x)


def _pool(maps, kind):
  return maps.max(axis=(2, 3)) if kind == "max" else maps.mean(axis=(2, 3))


def _assert_close(got, want, rtol=RTOL):
  got = np.asarray(got, np.float32)
  assert got.shape == want.shape
  want = np.asarray(want, np.float64)
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err <= rtol, f"max relative error {err:.3g} > {rtol}"


def _stats(model):
  return {k: np.asarray(v[...]) for k, v in weights.flat_variables(model).items()
          if k.endswith(("/mean", "/var"))}


def test_final_map_is_valid(reference, images, torch_maps):
  assert torch_maps.shape == (BATCH, 1024, 5, 5)
  assert np.isfinite(torch_maps).all() and torch_maps.std() > 0.1


@pytest.fixture(scope="module")
def eval_features(state_dict, images):
  """msjax's eval-mode features with the default (max) pooling."""
  model = _loaded(state_dict)
  model.eval()
  return np.asarray(_forward(model, jnp.asarray(images)))


def test_eval_matches_torch(eval_features, torch_maps):
  assert eval_features.shape == (BATCH, 1024) and eval_features.dtype == np.float32
  _assert_close(eval_features, _pool(torch_maps, "max"))


def test_avg_pooling_matches_torch(state_dict, images, torch_maps):
  model = _loaded(state_dict, pooling="avg")
  model.eval()
  out = _forward(model, jnp.asarray(images))
  assert out.shape == (BATCH, model.num_features) and out.dtype == jnp.float32
  _assert_close(out, _pool(torch_maps, "avg"))


def test_defaults_and_batchnorm_hyperparameters(reference):
  model = _model()
  assert model.pooling == "max" and model.num_features == bninception.NUM_FEATURES == 1024
  bns = {p.rsplit("/", 1)[0] for p in weights.flat_variables(model) if p.endswith("/var")}
  assert len(bns) == 69
  for name in bns:  # eps 1e-5 and PyTorch momentum 0.1, as the oracle's BatchNorm2d
    bn, ref = getattr(model, name), getattr(reference, name)
    assert (bn.epsilon, bn.momentum) == (ref.eps, ref.momentum) == (1e-5, 0.1)
    assert not bn.frozen
  assert _model(frozen_bn=True).inception_5b_pool_proj_bn.frozen
  with pytest.raises(ValueError, match="pooling"):
    _model(pooling="sum")
  with pytest.raises(ValueError, match="pooling"):
    _model(pooling="sum")


def test_frozen_bn_in_train_mode_equals_eval(state_dict, images, torch_maps,
                                            eval_features):
  model = _loaded(state_dict, frozen_bn=True)
  before = _stats(model)
  model.train()
  assert not model.conv1_7x7_s2_bn.use_running_average
  out = np.asarray(_forward(model, jnp.asarray(images)))
  np.testing.assert_array_equal(out, eval_features)
  _assert_close(out, _pool(torch_maps, "max"))
  after = _stats(model)
  assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("size,side", [(224, 7), (227, 7), (99, 3)])
def test_input_sizes(size, side):
  x = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
  maps = nnx.eval_shape(lambda m, x: m.features(x), _model(), x)
  assert maps.shape == (BATCH, side, side, 1024)


def test_unsuitable_input_size_fails_like_torch():
  x = jax.ShapeDtypeStruct((1, 150, 150, 3), jnp.float32)
  with pytest.raises(ValueError, match=r"inception_4e: branch maps"):
    nnx.eval_shape(lambda m, x: m(x), _model(), x)
  with pytest.raises(RuntimeError), torch.no_grad():  # torch.cat of 4x4 and 5x5 maps
    TorchBNInception().eval().trunk(torch.zeros(1, 3, 150, 150))


def test_train_mode_matches_torch(state_dict, images):
  # A deep BatchNorm network in training mode amplifies rounding layer by layer (torch's
  # own float32 result is ~4e-5 off its float64 one here), so the oracle runs in float64.
  torch_model = TorchBNInception().double()
  torch_model.load_state_dict(state_dict)
  torch_model.train()
  with torch.no_grad():
    x = torch.from_numpy(images).double().permute(0, 3, 1, 2)
    want = torch_model.features(x, "max").numpy()
  model = _loaded(state_dict)
  model.train()
  _assert_close(_forward(model, jnp.asarray(images)), want)
  got = _stats(model)
  torch_sd = torch_model.state_dict()
  moved = 0
  for path, value in got.items():
    ref = torch_sd[weights.torch_key(path)].numpy()
    old = state_dict[weights.torch_key(path)].numpy()
    moved += not np.allclose(ref, old)
    scale = np.max(np.abs(ref))
    np.testing.assert_allclose(value, ref, rtol=RTOL, atol=RTOL * scale, err_msg=path)
  assert moved == len(got) == 2 * 69  # every running mean and var moved


def test_converter_accepts_the_published_keys(state_dict):
  model = _model()
  arrays = weights.convert_state_dict(model, state_dict,
                                      ignore_prefixes=bninception.TORCH_IGNORE)
  kept = {k for k in state_dict
          if not k.startswith("last_linear.") and not k.endswith("num_batches_tracked")}
  assert {weights.torch_key(p) for p in arrays} == kept
  assert len(arrays) == 69 * 6  # conv weight, bias; bn weight, bias, mean, var
  assert state_dict["last_linear.weight"].shape == (1000, 1024)
  assert arrays["conv1_7x7_s2/kernel"].shape == (7, 7, 3, 64)
  assert arrays["inception_5b_pool_proj_bn/var"].shape == (128,)


def test_converter_rejects_a_missing_key(state_dict):
  model = _model()
  broken = dict(state_dict)
  del broken["inception_4c_double_3x3_1_bn.running_var"]
  with pytest.raises(ValueError, match=r"missing 1 key.*inception_4c_double_3x3_1_bn\."
                                       r"running_var"):
    weights.convert_state_dict(model, broken, ignore_prefixes=bninception.TORCH_IGNORE)


def test_converter_rejects_an_extra_key(state_dict):
  model = _model()
  broken = dict(state_dict)  # 3c has no pool projection
  broken["inception_3c_pool_proj.weight"] = torch.zeros(96, 320, 1, 1)
  with pytest.raises(ValueError,
                     match=r"unexpected 1 key.*inception_3c_pool_proj\.weight"):
    weights.convert_state_dict(model, broken, ignore_prefixes=bninception.TORCH_IGNORE)


def test_converter_rejects_a_wrong_shape(state_dict):
  model = _model()
  broken = dict(state_dict)
  broken["inception_3a_pool_proj.weight"] = torch.zeros(64, 192, 1, 1)  # 32 outputs
  with pytest.raises(ValueError,
                     match=r"inception_3a_pool_proj\.weight: checkpoint shape "
                           r"\(64, 192, 1, 1\), the architecture's \(32, 192, 1, 1\)"):
    weights.convert_state_dict(model, broken, ignore_prefixes=bninception.TORCH_IGNORE)


def test_parameter_count(reference):
  model = _model()
  params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  torch_total = sum(p.numel() for p in reference.parameters())
  assert torch_total == TRUNK_PARAMS + 1024 * 1000 + 1000
  assert params == TRUNK_PARAMS


def test_bfloat16_compute(state_dict, images, torch_maps):
  model = _loaded(state_dict, dtype=jnp.bfloat16)
  model.eval()
  assert all(v.dtype == jnp.float32 for v in weights.flat_variables(model).values())
  out = _forward(model, jnp.asarray(images))
  assert out.dtype == jnp.bfloat16
  _assert_close(out, _pool(torch_maps, "max"), rtol=5e-2)
