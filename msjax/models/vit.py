"""Vision Transformers in timm's ``VisionTransformer`` layout, for DINO, DINOv2 and
ImageNet weights.

Every submodule and parameter carries the name of the timm key it loads
(``blocks/3/attn/qkv/kernel`` <-> ``blocks.3.attn.qkv.weight``, ``cls_token`` <->
``cls_token``), so ``msjax.models.weights`` maps a timm, DINO or DINOv2 state dict
mechanically; ``convert_checkpoint`` first renames what the original DINOv2 files call
otherwise (``register_tokens``) and resamples a position embedding of another grid.

A block is pre-norm: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``, with
LayerNorm ε = 1e-6, exact (erf) GELU and LayerScale where the checkpoint has it
(DINOv2). The position embedding keeps the checkpoint's grid (14×14 for 224-pixel /16
weights, 37×37 for DINOv2's 518 pixels); an input of another size resamples it on the
fly, bicubic with antialiasing, as timm does with ``dynamic_img_size=True``.

Input: ``[B, H, W, 3]`` RGB normalised with the ImageNet mean and std, H and W
multiples of the patch size. Output: ``[B, F]`` features after the final LayerNorm:
the CLS token (``pooling="cls"``, DINO's and timm's), the mean of the patch tokens
(``"mean"``), or both concatenated (``"cls+mean"``, F = 2 × width).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msjax.models import layers

POOLINGS = ("cls", "mean", "cls+mean")
TORCH_IGNORE = ("head.",)  # a classifier (timm's supervised checkpoints)
LAYER_NORM_EPS = 1e-6
LAYER_SCALE_INIT = 1e-5  # DINOv2's init_values


@dataclasses.dataclass(frozen=True)
class Size:
  """A ViT's shape: patch size, width, depth, heads, the checkpoint's image size (which
  fixes the position-embedding grid), LayerScale, register tokens, and whether the
  position embedding leaves out the prefix tokens (timm's ``no_embed_class``)."""

  patch: int
  width: int
  depth: int
  heads: int
  img_size: int = 224
  mlp_ratio: int = 4
  layer_scale: bool = False
  reg_tokens: int = 0
  no_embed_class: bool = False
  timm_name: str = ""  # the timm architecture with the same layout and parameter count


SIZES = {
    "vit_ti16": Size(16, 192, 12, 3, timm_name="vit_tiny_patch16_224"),
    "vit_s16": Size(16, 384, 12, 6, timm_name="vit_small_patch16_224"),
    "vit_b16": Size(16, 768, 12, 12, timm_name="vit_base_patch16_224"),
    "vit_s14": Size(14, 384, 12, 6, img_size=518, layer_scale=True,
                    timm_name="vit_small_patch14_dinov2"),
    "vit_s14_reg4": Size(14, 384, 12, 6, img_size=518, layer_scale=True, reg_tokens=4,
                         no_embed_class=True, timm_name="vit_small_patch14_reg4_dinov2"),
}


def resample_pos_embed(pos, new_grid, old_grid, num_prefix: int):
  """``pos [1, num_prefix + gh·gw, D]`` on ``old_grid`` -> the same on ``new_grid``: the
  prefix rows unchanged, the grid resampled bicubic with antialiasing in float32 (timm's
  ``resample_abs_pos_embed``, i.e. ``F.interpolate(mode="bicubic", antialias=True)``)."""
  new_grid, old_grid = tuple(new_grid), tuple(old_grid)
  if new_grid == old_grid:
    return pos
  prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
  dim = pos.shape[-1]
  grid = grid.astype(jnp.float32).reshape(old_grid + (dim,))
  grid = jax.image.resize(grid, new_grid + (dim,), method="cubic", antialias=True)
  grid = grid.reshape(1, -1, dim).astype(pos.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


class PatchEmbed(nnx.Module):
  """``proj``: a ``patch × patch`` convolution of stride ``patch`` (timm's PatchEmbed)."""

  def __init__(self, patch, width, *, rngs, dtype, param_dtype):
    self.patch = patch
    self.proj = layers.conv(3, width, patch, stride=patch, rngs=rngs, dtype=dtype,
                            param_dtype=param_dtype)

  def __call__(self, x):
    if x.shape[1] % self.patch or x.shape[2] % self.patch:
      raise ValueError(f"image size {x.shape[1]}×{x.shape[2]} is not a multiple of the "
                       f"patch size {self.patch}; set config.data.image_size to a multiple "
                       f"of {self.patch}.")
    return self.proj(x)  # [B, H/p, W/p, D]


class LayerScale(nnx.Module):
  def __init__(self, width, param_dtype):
    self.gamma = nnx.Param(jnp.full((width,), LAYER_SCALE_INIT, param_dtype))

  def __call__(self, x):
    return x * self.gamma[...].astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head self-attention: ``qkv`` (one Linear, output ordered q|k|v × heads ×
  head_dim as timm's), scaled dot products, softmax in float32, ``proj``."""

  def __init__(self, width, heads, *, rngs, dtype, param_dtype):
    self.heads = heads
    linear = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = linear(width, 3 * width)
    self.proj = linear(width, width)

  def __call__(self, x):
    b, n, d = x.shape
    h = self.heads
    # [3, B, heads, N, head_dim]: batch and heads leading, so both products are plain
    # batched matmuls (a third faster on XLA:CPU than leaving the heads in the middle).
    q, k, v = self.qkv(x).reshape(b, n, 3, h, d // h).transpose(2, 0, 3, 1, 4)
    logits = jnp.einsum("bhqc,bhkc->bhqk", q * (d // h) ** -0.5, k)
    attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkc->bhqc", attn, v)
    return self.proj(out.transpose(0, 2, 1, 3).reshape(b, n, d))


class Mlp(nnx.Module):
  def __init__(self, width, hidden, *, rngs, dtype, param_dtype):
    self.fc1 = nnx.Linear(width, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  def __init__(self, size: Size, *, rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    norm = lambda: nnx.LayerNorm(size.width, epsilon=LAYER_NORM_EPS, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    self.norm1 = norm()
    self.attn = Attention(size.width, size.heads, **kw)
    self.ls1 = LayerScale(size.width, param_dtype) if size.layer_scale else None
    self.norm2 = norm()
    self.mlp = Mlp(size.width, size.width * size.mlp_ratio, **kw)
    self.ls2 = LayerScale(size.width, param_dtype) if size.layer_scale else None

  def __call__(self, x):
    y = self.attn(self.norm1(x))
    x = x + (self.ls1(y) if self.ls1 is not None else y)
    y = self.mlp(self.norm2(x))
    return x + (self.ls2(y) if self.ls2 is not None else y)


class ViT(nnx.Module):
  """A Vision Transformer trunk: ``[B, H, W, 3] -> [B, num_features]``.

  Args:
    size: the architecture (``SIZES[name]``).
    rngs: initialisation randomness (``create_backbone`` builds the network abstract and
      initialises it in one compiled call, ``weights.initialise``).
    pooling: ``"cls"``, ``"mean"`` (patch tokens, registers excluded) or ``"cls+mean"``.
    dtype: computation dtype (``jnp.bfloat16`` on accelerators); LayerNorm statistics,
      softmax and the position-embedding resampling run in float32.
    param_dtype: parameter dtype.
    remat: recompute each block's activations in the backward pass instead of keeping
      them (``nnx.remat``): less memory for large batches, about a third more compute.
  """

  def __init__(self, size: Size, *, rngs: nnx.Rngs, pooling: str = "cls", dtype=None,
               param_dtype=jnp.float32, remat: bool = False):
    layers.check_pooling(pooling, POOLINGS, "a ViT")
    self.size = size
    self.pooling = pooling
    self.remat = remat
    self.dtype = dtype
    self.num_features = size.width * (2 if pooling == "cls+mean" else 1)
    self.num_prefix = 1 + size.reg_tokens
    self.grid = (size.img_size // size.patch,) * 2
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.patch_embed = PatchEmbed(size.patch, size.width, **kw)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, size.width), param_dtype))
    self.reg_token = (nnx.Param(jnp.zeros((1, size.reg_tokens, size.width), param_dtype))
                      if size.reg_tokens else None)
    positions = math.prod(self.grid) + (0 if size.no_embed_class else self.num_prefix)
    self.pos_embed = nnx.Param(jnp.zeros((1, positions, size.width), param_dtype))
    self.blocks = nnx.List([Block(size, **kw) for _ in range(size.depth)])
    self.norm = nnx.LayerNorm(size.width, epsilon=LAYER_NORM_EPS, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)

  def tokens(self, x):
    """Every token after the final LayerNorm: ``[B, prefix + patches, width]`` (CLS,
    then the registers, then the patches in row-major order), timm's
    ``forward_features``."""
    x = self.patch_embed(x.astype(self.dtype) if self.dtype is not None else x)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    no_embed_class = self.size.no_embed_class
    pos = resample_pos_embed(self.pos_embed[...], (gh, gw), self.grid,
                             0 if no_embed_class else self.num_prefix).astype(x.dtype)
    prefix = [jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, d))]
    if self.reg_token is not None:
      prefix.append(jnp.broadcast_to(self.reg_token[...].astype(x.dtype),
                                     (b, self.size.reg_tokens, d)))
    if no_embed_class:
      x = jnp.concatenate(prefix + [x + pos], axis=1)
    else:
      x = jnp.concatenate(prefix + [x], axis=1) + pos
    for block in self.blocks:
      x = nnx.remat(type(block).__call__)(block, x) if self.remat else block(x)
    return self.norm(x)

  def __call__(self, x):
    x = self.tokens(x)
    cls = x[:, 0]
    if self.pooling == "cls":
      return cls
    mean = jnp.mean(x[:, self.num_prefix:].astype(jnp.float32), axis=1).astype(x.dtype)
    return mean if self.pooling == "mean" else jnp.concatenate([cls, mean], axis=-1)


def _named(name):
  def build(*, rngs, pooling="cls", dtype=None, param_dtype=jnp.float32, remat=False):
    return ViT(SIZES[name], rngs=rngs, pooling=pooling, dtype=dtype,
               param_dtype=param_dtype, remat=remat)
  build.__name__ = build.__qualname__ = name
  return build


def convert_checkpoint(state_dict, size: Size):
  """A DINO, DINOv2 or timm state dict in msjax's ViT key layout: DINOv2's
  ``register_tokens`` become ``reg_token`` (the CLS position folded into ``cls_token``
  for a ``no_embed_class`` model, as timm converts them), ``mask_token`` is dropped, and
  a position embedding of another grid is resampled to the model's."""
  sd = {k: np.asarray(v) for k, v in state_dict.items() if k != "mask_token"}
  if "register_tokens" in sd:
    sd["reg_token"] = sd.pop("register_tokens")
    if size.no_embed_class and "pos_embed" in sd and "cls_token" in sd:
      sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
      sd["pos_embed"] = sd["pos_embed"][:, 1:]
  pos = sd.get("pos_embed")
  prefix = 0 if size.no_embed_class else 1 + size.reg_tokens
  grid = size.img_size // size.patch
  if pos is not None and pos.ndim == 3 and pos.shape[1] != prefix + grid * grid:
    old = math.isqrt(pos.shape[1] - prefix)
    if old * old == pos.shape[1] - prefix:
      sd["pos_embed"] = np.asarray(resample_pos_embed(
          jnp.asarray(pos, jnp.float32), (grid, grid), (old, old), prefix))
  return sd


vit_ti16 = _named("vit_ti16")
vit_s16 = _named("vit_s16")
vit_b16 = _named("vit_b16")
vit_s14 = _named("vit_s14")
vit_s14_reg4 = _named("vit_s14_reg4")
