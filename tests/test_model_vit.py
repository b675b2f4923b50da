"""msjax's Vision Transformers against timm's ``VisionTransformer`` (CPU, no download).

For every size of ``vit.SIZES`` the oracle is timm's architecture of the same layout
(``Size.timm_name``) with random weights, perturbed so that nothing is at a trivial
value (zero biases, timm's 1e-6 CLS token, LayerScale at 1e-5 would hide a wrong
branch); its state dict goes through msjax's converter, and every token after the final
norm must match timm's ``forward_features``, at the checkpoint's resolution and at a
non-square one where the position embedding is resampled. timm's own
``checkpoint_filter_fn`` is the oracle for the original DINO and DINOv2 layouts and for a
position embedding of another grid. conftest enables x64, so every array here is
float32 explicitly; forward passes are jitted (one compile per shape is cheaper on a CPU
than eager ops).
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msjax import losses, models
from msjax.models import vit, weights
from timm_ref import import_timm

timm = import_timm()  # skips the module without the test extras
import torch  # noqa: E402  (installed with timm)
from timm.models.vision_transformer import checkpoint_filter_fn  # noqa: E402

TOL = 1e-4  # max |error| / max |timm|, float32
RTOL_REMAT = 1e-5  # max |remat − plain gradient| / max |plain gradient|, per parameter
# Besides the checkpoint's resolution, a non-square one: 16×12 patches, so the position
# grid is resampled with different factors per axis (14 -> 16 up and 14 -> 12 down for
# /16, 37 -> 16 and 37 -> 12 down for /14) and a transposed grid would show.
OTHER = {16: (256, 192), 14: (224, 168)}
# timm's parameter counts with num_classes=0 (timm 1.0.31).
PARAMS = {"vit_ti16": 5_524_416, "vit_s16": 21_665_664, "vit_b16": 85_798_656,
          "vit_s14": 22_056_192, "vit_s14_reg4": 22_057_344}


def _randomize_(model, seed):
  """Adds 0.02·N(0, 1) to every parameter; draws LayerScale from U(0.5, 1.5), so each
  block changes the residual stream by O(1) rather than by 1e-5, and the blocks'
  LayerNorm scales from U(1.5, 3), so attention is far from uniform and GELU's inputs
  reach its curved part (at timm's init both are nearly linear, and a wrong attention
  scale or tanh GELU would hide below the tolerance)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(".gamma"):
        p.uniform_(0.5, 1.5, generator=gen)
      elif name.endswith(("norm1.weight", "norm2.weight")):
        p.uniform_(1.5, 3.0, generator=gen)
      else:
        p.add_(0.02 * torch.randn(p.shape, generator=gen))
  return model


def _timm(name, seed=0):
  torch.manual_seed(seed)
  model = timm.create_model(vit.SIZES[name].timm_name, pretrained=False, num_classes=0,
                            dynamic_img_size=True)
  return _randomize_(model, seed).eval()


@functools.cache
def _structure(name, **kw):
  return nnx.split(nnx.eval_shape(lambda: models.backbone_class(name)(rngs=nnx.Rngs(0),
                                                                       **kw)))


def _abstract(name, **kw):
  """A fresh msjax model with shapes only (the converter needs no values); tracing the
  constructor once per configuration saves about a second a model."""
  return nnx.merge(*_structure(name, **kw))


def _loaded(name, arrays, **kw):
  model = _abstract(name, **kw)
  weights.assign(model, arrays)
  model.eval()
  return model


def _images(hw, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, *hw, 3)).astype(np.float32)


def _timm_tokens(model, images):
  with torch.no_grad():
    return model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


@nnx.jit
def _tokens_and_features(model, images):
  return model.tokens(images), model(images)  # XLA shares the trunk between the two


@nnx.jit
def _features(model, images):
  return model(images)


def _rel_err(got, want):
  got = np.asarray(got, np.float32)
  assert got.shape == want.shape
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _cosines(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# --- every size against timm ---------------------------------------------------------------


@pytest.fixture(scope="module", params=list(vit.SIZES))
def name(request):
  return request.param


@pytest.fixture(scope="module")
def reference(name):
  return _timm(name)


@pytest.fixture(scope="module")
def arrays(name, reference):
  return weights.convert_state_dict(_abstract(name), reference.state_dict())


# "cls+mean" holds both poolings' values and is checked for every size; the "cls" and
# "mean" models differ from it only in what ``__call__`` returns, so they are compiled
# for one size with a single prefix token and for the one with registers.
SEPARATE_POOLINGS = ("vit_ti16", "vit_s14_reg4")


@pytest.fixture(scope="module")
def by_pooling(name, arrays):
  """The loaded model of each pooling tested for ``name``, on the same parameters."""
  out = {"cls+mean": _loaded(name, arrays, pooling="cls+mean")}
  for pooling in ("cls", "mean") if name in SEPARATE_POOLINGS else ():
    out[pooling] = _abstract(name, pooling=pooling)
    nnx.update(out[pooling], nnx.state(out["cls+mean"]))
    out[pooling].eval()
  return out


@pytest.mark.parametrize("where", ["checkpoint", "other"])
def test_tokens_and_poolings_match_timm(name, reference, by_pooling, where):
  size = vit.SIZES[name]
  if where == "checkpoint":  # one 518-pixel DINOv2 image (1,370 tokens) is enough
    hw, batch = (size.img_size,) * 2, 1 if size.img_size > 300 else 2
  else:
    hw, batch = OTHER[size.patch], 2
  images = _images(hw, batch)
  want = _timm_tokens(reference, images)
  prefix = reference.num_prefix_tokens
  assert prefix == 1 + size.reg_tokens
  assert want.shape == (batch, prefix + (hw[0] // size.patch) * (hw[1] // size.patch),
                        size.width)
  tokens, both = _tokens_and_features(by_pooling["cls+mean"], jnp.asarray(images))
  assert tokens.dtype == both.dtype == jnp.float32
  assert _rel_err(tokens, want) <= TOL
  cls, mean = want[:, 0], want[:, prefix:].mean(axis=1)  # mean: no CLS, no registers
  assert _rel_err(both, np.concatenate([cls, mean], -1)) <= TOL
  if where == "other" and name in SEPARATE_POOLINGS:
    for pooling, expected in (("cls", cls), ("mean", mean)):
      model = by_pooling[pooling]
      assert model.num_features == size.width
      assert _rel_err(_features(model, jnp.asarray(images)), expected) <= TOL, pooling
  assert by_pooling["cls+mean"].num_features == 2 * size.width


def test_parameters_and_keys_are_timms(name, reference, arrays, by_pooling):
  state = reference.state_dict()
  assert {weights.torch_key(path) for path in arrays} == set(state)
  assert len(arrays) == len(state)
  n_timm = sum(p.numel() for p in reference.parameters())
  params = nnx.to_flat_state(nnx.state(by_pooling["cls+mean"], nnx.Param))
  assert sum(p.size for _, p in params) == n_timm == PARAMS[name]
  # LayerNorm's ε (1e-6, not PyTorch's default 1e-5) moves the tokens by only ~1e-6,
  # below the tolerance of the comparison with timm, so it is checked here.
  norms = [node for _, node in nnx.iter_graph(by_pooling["cls+mean"])
           if isinstance(node, nnx.LayerNorm)]
  timm_norms = [m for m in reference.modules() if isinstance(m, torch.nn.LayerNorm)]
  assert len(norms) == len(timm_norms) == 2 * vit.SIZES[name].depth + 1
  assert {n.epsilon for n in norms} == {m.eps for m in timm_norms} == {1e-6}
  np.testing.assert_array_equal(arrays["blocks/0/attn/qkv/kernel"],
                                state["blocks.0.attn.qkv.weight"].numpy().T)
  np.testing.assert_array_equal(arrays["patch_embed/proj/kernel"],
                                state["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))


# --- original checkpoint layouts, with timm's filter as the oracle ----------------------


@functools.cache
def _oracle(name):
  """timm's model of ``name``, built once: each test loads all of its parameters."""
  return timm.create_model(vit.SIZES[name].timm_name, pretrained=False, num_classes=0,
                           dynamic_img_size=True).eval()


def _checkpoint(oracle, name, layout, grid, seed=1):
  """A random state dict of ``name`` (keys and shapes of timm's ``oracle``) in a
  published layout, its position embedding on a ``grid × grid`` patch grid: ``"timm"``
  (timm's keys, which DINO's are too), or ``"dinov2"`` (facebookresearch/dinov2:
  ``mask_token``, ``register_tokens``, and a position embedding with a CLS row and no
  register rows)."""
  size = vit.SIZES[name]
  gen = torch.Generator().manual_seed(seed)
  shapes = {k: tuple(v.shape) for k, v in oracle.state_dict().items()}
  if layout == "dinov2":
    prefix = 1
    shapes["mask_token"] = (1, size.width)
    if size.reg_tokens:
      shapes["register_tokens"] = shapes.pop("reg_token")
  else:
    prefix = 0 if size.no_embed_class else 1 + size.reg_tokens
  shapes["pos_embed"] = (1, prefix + grid * grid, size.width)
  return {k: 0.5 * torch.randn(shape, generator=gen) for k, shape in shapes.items()}


@pytest.mark.parametrize("name,layout,grid", [
    ("vit_s14", "dinov2", 37),  # DINOv2 ViT-S/14 as published
    ("vit_s14_reg4", "dinov2", 37),  # ... with registers: CLS row folded into cls_token
    ("vit_s14_reg4", "dinov2", 16),  # ... and then a 16×16 grid resampled to 37×37
    ("vit_s14_reg4", "timm", 16),  # no_embed_class: every row is a grid position
    ("vit_s16", "timm", 14),  # DINO ViT-S/16 (timm's keys, nothing to change)
    ("vit_s16", "timm", 24),  # a 384-pixel checkpoint into a 224-pixel model
])
def test_checkpoint_conversion_matches_timm_filter(name, layout, grid):
  size = vit.SIZES[name]
  oracle = _oracle(name)
  sd = _checkpoint(oracle, name, layout, grid)
  keys = set(sd)
  filtered = checkpoint_filter_fn(dict(sd), oracle)  # timm pops keys of its argument
  oracle.load_state_dict(filtered)  # strict: the filter yields exactly timm's keys

  converted = vit.convert_checkpoint(sd, size)
  assert set(sd) == keys  # the caller's dict is left alone
  abstract = _abstract(name, pooling="cls+mean")
  arrays = weights.convert_state_dict(abstract, converted)
  want = weights.convert_state_dict(abstract, filtered)
  assert set(arrays) == set(want)
  for path in want:
    if path == "pos_embed" and grid != size.img_size // size.patch:  # resampled
      assert _rel_err(arrays[path], want[path]) <= 1e-5
    else:
      np.testing.assert_array_equal(arrays[path], want[path], err_msg=path)

  # The resolution (and so the compiled program) of test_tokens_and_poolings_match_timm.
  images = _images(OTHER[size.patch], seed=2)
  tokens, _ = _tokens_and_features(_loaded(name, arrays, pooling="cls+mean"),
                                   jnp.asarray(images))
  assert _rel_err(tokens, _timm_tokens(oracle, images)) <= TOL


# --- errors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state():
  return dict(_timm("vit_ti16").state_dict())


def test_converter_names_missing_unexpected_and_misshapen_keys(tiny_state):
  model = _abstract("vit_ti16")
  missing = dict(tiny_state)
  del missing["blocks.3.mlp.fc1.bias"]
  with pytest.raises(ValueError, match=r"missing 1 key\(s\): blocks\.3\.mlp\.fc1\.bias$"):
    weights.convert_state_dict(model, missing)

  extra = dict(tiny_state, **{"head.weight": torch.zeros(1000, 192),
                              "blocks.12.norm1.weight": torch.ones(192)})
  with pytest.raises(ValueError, match=r"unexpected 2 key\(s\): blocks\.12\.norm1\.weight, "
                                       r"head\.weight$"):
    weights.convert_state_dict(model, extra)

  wide = dict(tiny_state, **{"blocks.0.attn.qkv.weight": torch.zeros(576, 200)})
  with pytest.raises(ValueError) as err:
    weights.convert_state_dict(model, wide)
  message = str(err.value)
  assert "blocks.0.attn.qkv.weight" in message
  assert "missing" not in message and "unexpected" not in message
  # Both shapes in PyTorch's [out, in] layout, as the checkpoint holds them.
  assert "checkpoint shape (576, 200), the architecture's (576, 192)" in message, message

  # A position embedding whose grid is not square cannot be resampled: named as misshapen.
  odd = dict(tiny_state, pos_embed=torch.zeros(1, 1 + 150, 192))
  with pytest.raises(ValueError, match=r"pos_embed: checkpoint shape \(1, 151, 192\), "
                     r"the architecture's \(1, 197, 192\)"):
    weights.convert_state_dict(model, vit.convert_checkpoint(odd, vit.SIZES["vit_ti16"]))


@pytest.mark.parametrize("name,hw,patch", [("vit_ti16", (33, 32), 16),
                                           ("vit_ti16", (32, 40), 16),
                                           ("vit_s14", (28, 32), 14)])
def test_input_not_a_multiple_of_the_patch_is_rejected(name, hw, patch):
  images = jax.ShapeDtypeStruct((1, *hw, 3), jnp.float32)
  with pytest.raises(ValueError, match=rf"not a multiple of the patch size {patch}\b"):
    nnx.eval_shape(lambda m, x: m(x), _abstract(name), images)


def test_poolings_and_defaults():
  for name in vit.SIZES:
    assert models.poolings(name) == vit.POOLINGS == ("cls", "mean", "cls+mean")
    assert models.DEFAULT_POOLING[name] == "cls"
  assert _abstract("vit_ti16").pooling == "cls"
  with pytest.raises(ValueError, match="pooling"):
    _abstract("vit_ti16", pooling="avg")
  with pytest.raises(ValueError, match="pooling"):
    models.create_backbone("vit_ti16", rngs=nnx.Rngs(0), pooling="max")


# --- compute dtype, rematerialisation, gradients ------------------------------------------


def test_bfloat16_compute():
  # DINOv2 with registers: LayerScale, and a mean that must leave the registers out.
  name = "vit_s14_reg4"
  arrays = weights.convert_state_dict(_abstract(name), _timm(name, seed=3).state_dict())
  images = jnp.asarray(_images((112, 84), seed=3))
  want = _features(_loaded(name, arrays, pooling="cls+mean"), images)
  model = _loaded(name, arrays, pooling="cls+mean", dtype=jnp.bfloat16)
  assert {v.dtype for v in weights.flat_variables(model).values()} == {jnp.dtype(jnp.float32)}
  got = _features(model, images)
  assert got.dtype == jnp.bfloat16 and got.shape == want.shape
  width = vit.SIZES[name].width
  for part in (slice(0, width), slice(width, None)):  # CLS and mean separately
    assert np.all(_cosines(got[:, part], want[:, part]) > 0.99)


def _remat_count(fn, *args):
  return len(re.findall(r"\b(?:remat\d*|checkpoint)\[", str(jax.make_jaxpr(fn)(*args))))


P, K = 4, 2  # the P×K batch of the gradient tests


def _ms_loss_and_grads(model):
  """The MS loss of ``model``'s embeddings of a P×K batch of 32-pixel images (a 2×2
  patch grid, the position embedding resampled from 14×14), its gradient with respect
  to every parameter, and how many rematerialised regions its forward pass has."""
  images = jnp.asarray(_images((32, 32), batch=P * K, seed=5))
  labels = jnp.repeat(jnp.arange(P, dtype=jnp.int32), K)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(params):
    return losses.ms_loss_from_embeddings(nnx.merge(graphdef, params, rest)(images), labels)

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  grads = {"/".join(map(str, path)): np.asarray(g[...])
           for path, g in nnx.to_flat_state(grads)}
  return float(value), grads, _remat_count(loss, params)


@pytest.fixture(scope="module")
def embedder():
  return models.create_model("vit_ti16", 64, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def plain_grads(embedder):
  return _ms_loss_and_grads(embedder)


def test_ms_loss_gradients_reach_every_parameter(plain_grads):
  value, grads, n_remat = plain_grads
  assert value > 0 and n_remat == 0
  # patch_embed (2), cls_token, pos_embed, 12 blocks × 12, final norm (2), head (2).
  assert len(grads) == 2 + 2 + 12 * 12 + 2 + 2
  assert {"backbone/cls_token", "backbone/pos_embed", "head/linear/kernel"} <= set(grads)
  norms = {path: float(np.linalg.norm(g)) for path, g in grads.items()}
  assert all(np.isfinite(n) and n > 0 for n in norms.values()), {
      path: n for path, n in norms.items() if not n > 0}


def test_remat_gives_the_same_gradients(embedder, plain_grads):
  model = models.create_model("vit_ti16", 64, rngs=nnx.Rngs(1), remat=True)
  nnx.update(model, nnx.state(embedder))
  value, grads, n_remat = _ms_loss_and_grads(model)
  assert n_remat == 12  # one rematerialised region per block
  want_value, want, _ = plain_grads
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  assert set(grads) == set(want)
  for path, g in want.items():
    # Recomputed activations may round differently once XLA fuses them anew.
    assert np.max(np.abs(grads[path] - g)) <= RTOL_REMAT * np.max(np.abs(g)), path


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_convert_command_reads_timm_and_dino_files(tmp_path, fmt):
  """``python -m msjax.models.convert --arch vit_ti16`` on a timm ``.safetensors`` file
  (with the ImageNet classifier, which is ignored) and on a DINO-style full training
  checkpoint (``{"teacher": {"backbone.…", "head.…"}, "args": …}``): the written ``.npz``
  loads into a model whose tokens equal timm's."""
  import subprocess
  import sys
  ref = _timm("vit_ti16", seed=3)
  state = {k: v.contiguous() for k, v in ref.state_dict().items()}
  src = tmp_path / f"ti16.{fmt}"
  if fmt == "safetensors":
    from safetensors.torch import save_file
    save_file({**state, "head.weight": torch.zeros(1000, 192),
               "head.bias": torch.zeros(1000)}, str(src))
  else:
    teacher = {**{f"backbone.{k}": v for k, v in state.items()},
               "head.mlp.0.weight": torch.zeros(8, 192),
               "head.last_layer.weight_g": torch.ones(1, 1)}
    torch.save({"teacher": teacher, "student": teacher, "epoch": 100}, src)
  out = tmp_path / "ti16.npz"
  done = subprocess.run([sys.executable, "-m", "msjax.models.convert", "--arch", "vit_ti16",
                         "--src", str(src), "--out", str(out)],
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "wrote" in done.stdout and f"{PARAMS['vit_ti16']:,} values" in done.stdout
  model = models.create_backbone("vit_ti16", rngs=nnx.Rngs(0), pretrained=out)
  x = np.random.default_rng(0).normal(size=(1, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want = ref.forward_features(torch.tensor(x)).numpy()
  tokens = jax.jit(lambda m, x: m.tokens(x))
  got = np.asarray(tokens(model, jnp.asarray(x.transpose(0, 2, 3, 1))))
  assert np.abs(got - want).max() <= TOL * np.abs(want).max()
