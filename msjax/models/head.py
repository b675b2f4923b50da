"""The embedding head: backbone features -> L2-normalised embeddings."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# Kaiming-normal with fan_out, as the released code initialises its linear layer.
KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


class EmbeddingHead(nnx.Module):
  """``Linear(features -> embedding_dim)`` (Kaiming-normal fan_out, zero bias) then L2
  normalisation, as released; ``mlp_hidden`` puts a ``Linear-ReLU`` of that width first.

  The normalisation runs in float32 whatever the compute dtype, and the result is float32
  (the loss takes similarities of unit vectors).
  """

  def __init__(self, in_features: int, embedding_dim: int, *, rngs: nnx.Rngs,
               mlp_hidden: int | None = None, dtype=None, param_dtype=jnp.float32):
    linear = lambda i, o: nnx.Linear(i, o, kernel_init=KAIMING_FAN_OUT,
                                     bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.hidden = linear(in_features, mlp_hidden) if mlp_hidden else None
    self.linear = linear(mlp_hidden or in_features, embedding_dim)
    self.embedding_dim = embedding_dim

  def __call__(self, features):
    x = features
    if self.hidden is not None:
      x = jax.nn.relu(self.hidden(x))
    x = self.linear(x).astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))
