"""ms_loss against a per-anchor NumPy transcription of the released PyTorch loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import msjax.losses as L
import oracles
from batches import KINDS, make_batch


def random_batches(count, kinds=("pk",), seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(count):
    kind = kinds[rng.integers(len(kinds))]
    # Few distinct shapes, so compiled kernels are reused across the hundreds of batches.
    classes, per_class = int(rng.choice([3, 8])), int(rng.choice([2, 5]))
    emb, labels = make_batch(kind, classes, per_class, dim=int(rng.integers(8, 33)),
                             seed=int(rng.integers(2**31)), spread=float(rng.choice([0.5, 1.5, 4.0])))
    yield emb @ emb.T, labels


@pytest.fixture(scope="module")
def jitted():
  """ms_loss and its gradient, compiled once per shape (hundreds of batches)."""
  loss = jax.jit(L.ms_loss, static_argnames=("alpha", "beta", "lam", "epsilon"))
  grad = jax.jit(jax.grad(L.ms_loss), static_argnames=("alpha", "beta", "lam", "epsilon"))
  return loss, grad


@pytest.mark.parametrize("preset", ["released", "paper"])
def test_value_matches_released_loop(jitted, preset):
  loss, _ = jitted
  hp = L.ms_preset(preset)
  checked = 0
  # A fixed seed per preset: str hashes change with every interpreter (PYTHONHASHSEED).
  for sim, labels in random_batches(150, kinds=KINDS, seed={"released": 0, "paper": 1}[preset]):
    expected, _ = oracles.released_ms_loss(sim, labels, **hp)
    got = float(loss(sim, labels, **hp))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-12)
    checked += expected != 0
  assert checked > 60  # most batches have a non-trivial loss


def test_gradient_matches_finite_differences_of_released_loop(jitted):
  """Directional derivatives of the loop (central differences) vs msjax's gradient.

  The perturbation leaves the diagonal (S = 1) alone and is tiny compared to the
  distance of any similarity from a mining boundary on these batches, so the masks do
  not change between the two evaluations.
  """
  _, grad = jitted
  rng = np.random.default_rng(1)
  h = 1e-6
  compared = 0
  for sim, labels in random_batches(120, seed=2):
    g = np.asarray(grad(sim, labels))
    for _ in range(2):
      direction = rng.normal(size=sim.shape)
      np.fill_diagonal(direction, 0.0)
      plus, _ = oracles.released_ms_loss(sim + h * direction, labels)
      minus, _ = oracles.released_ms_loss(sim - h * direction, labels)
      numeric = (plus - minus) / (2 * h)
      analytic = float(np.sum(g * direction))
      assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-9)
      compared += 1
  assert compared == 240


def test_batches_that_crash_the_released_loop_give_finite_values():
  """The released loop raises on min()/max() of an empty set; msjax skips the anchor.

  Such an anchor has no positive (a single-image class, or only exact duplicates of
  itself) or no negative (one class): it contributes 0 and the sum is still divided by
  the full batch size, so the value equals the loop with those anchors skipped.
  """
  # Class 2 has a single image, class 3 two exact duplicates: anchors 6, 7, 8 crash the loop.
  emb, labels = make_batch("pk", 3, 3, 8, seed=5, spread=4.0)
  emb = np.concatenate([emb[:6], emb[6:7], emb[7:8], emb[7:8]])
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 3, 3], np.int32)
  sim = emb @ emb.T
  expected, would_crash = oracles.released_ms_loss(sim, labels)
  assert would_crash
  value = L.ms_loss(sim, labels)
  weights = np.asarray(L.ms_weights(sim, labels))
  assert np.isfinite(float(value)) and np.all(np.isfinite(weights))
  assert float(value) == pytest.approx(expected, rel=1e-12)
  assert float(value) > 0
  assert not np.any(weights[6:]), "anchors without a positive contribute nothing"
  # One class only: no negative for anyone, loss 0 instead of a crash.
  assert float(L.ms_loss(sim, np.zeros(9, np.int32))) == 0.0
  assert oracles.released_ms_loss(sim, np.zeros(9, np.int32)) == (0.0, True)


@pytest.mark.parametrize("name", L.NAMES)
@pytest.mark.parametrize("self_pair", ["value", "index"])
def test_every_loss_matches_its_loop_transcription(name, self_pair):
  loss = L.get(name).loss
  for k, (sim, labels) in enumerate(random_batches(25, kinds=KINDS, seed=7)):
    rows = np.arange(len(labels))[k % 2:: 1 + k % 2]  # square, and rectangular blocks
    kw = dict(ref_labels=labels, anchor_index=rows, batch_size=len(rows), self_pair=self_pair)
    expected = oracles.LOSSES[name](sim[rows], labels[rows], labels, rows, self_pair=self_pair)
    got = float(loss(jnp.asarray(sim[rows]), labels[rows], **kw))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, k)
