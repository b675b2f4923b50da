"""The P×K sampler: composition, purity in (seed, step), class balance, process slices."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from msjax.data import DataError, PKSampler


@st.composite
def labelled(draw):
  """Random class sizes (single-image classes included) and a valid P, K."""
  sizes = draw(st.lists(st.integers(1, 9), min_size=2, max_size=25))
  labels = np.repeat(np.arange(len(sizes)), sizes)
  labels = draw(st.permutations(labels.tolist()))  # images of a class need not be adjacent
  p = draw(st.integers(1, len(sizes)))
  k = draw(st.integers(1, 6))
  return np.asarray(labels), p, k, draw(st.integers(0, 2**31))


@given(labelled(), st.integers(0, 500))
def test_batch_composition(case, step):
  labels, p, k, seed = case
  batch = PKSampler(labels, p, k, seed=seed).batch(step)
  assert batch.shape == (p * k,)
  per_class = labels[batch].reshape(p, k)
  assert (per_class == per_class[:, :1]).all(), "a block of K is one class"
  assert len(set(per_class[:, 0])) == p, "P distinct classes"
  for block in batch.reshape(p, k):
    size = np.sum(labels == labels[block[0]])
    if size >= k:
      assert len(set(block)) == k, "no repeats when the class has K images"
    else:
      assert set(block) <= set(np.flatnonzero(labels == labels[block[0]]))


@given(labelled(), st.lists(st.integers(0, 300), min_size=1, max_size=8))
def test_batch_is_a_pure_function_of_seed_and_step(case, steps):
  labels, p, k, seed = case
  sequential = PKSampler(labels, p, k, seed=seed)
  expected = {s: sequential.batch(s) for s in sorted(set(steps))}
  for s in steps:  # a fresh sampler, random access, any order
    np.testing.assert_array_equal(PKSampler(labels, p, k, seed=seed).batch(s), expected[s])


def test_seeds_give_different_streams():
  labels = np.repeat(np.arange(50), 6)
  a = np.stack([PKSampler(labels, 8, 3, seed=0).batch(s) for s in range(10)])
  b = np.stack([PKSampler(labels, 8, 3, seed=1).batch(s) for s in range(10)])
  assert (a != b).mean() > 0.5


@given(labelled(), st.integers(1, 4))
def test_every_class_once_per_epoch(case, epochs):
  labels, p, k, seed = case
  sampler = PKSampler(labels, p, k, seed=seed)
  c = len(np.unique(labels))
  nb = sampler.batches_per_epoch
  assert nb == c // p
  counts = np.zeros(c, int)
  for step in range(epochs * nb):
    counts[sampler.batch_classes(step)] += 1
    if (step + 1) % nb == 0:  # after e whole epochs, no class has been drawn e+1 times
      e = (step + 1) // nb
      assert counts.max() <= e
      if c % p == 0:
        assert counts.min() == e, "no class sits out when P divides the class count"
  assert counts.sum() == epochs * nb * p


def test_class_balance_over_many_epochs():
  """The classes that sit an epoch out change, so over many epochs counts even out."""
  labels = np.repeat(np.arange(23), 4)
  sampler = PKSampler(labels, 5, 2, seed=3)
  counts = np.bincount(np.concatenate([sampler.batch_classes(s) for s in range(400)]),
                       minlength=23)
  assert counts.sum() == 2000
  assert counts.max() - counts.min() <= 0.15 * counts.mean()


@given(labelled(), st.integers(0, 100), st.sampled_from([1, 2, 4, 8]))
def test_process_slices_are_disjoint_and_form_the_batch(case, step, processes):
  labels, p, k, seed = case
  sampler = PKSampler(labels, p, k, seed=seed)
  if (p * k) % processes:
    with pytest.raises(DataError, match="does not split evenly"):
      sampler.process_batch(step, 0, processes)
    return
  parts = [sampler.process_batch(step, i, processes) for i in range(processes)]
  assert all(len(q) == p * k // processes for q in parts)
  np.testing.assert_array_equal(np.concatenate(parts), sampler.batch(step))


def test_single_image_classes_repeat_their_image():
  labels = np.array([0, 1, 1, 1, 2])
  batch = PKSampler(labels, 3, 3, seed=0).batch(0).reshape(3, 3)
  for block in batch:
    if labels[block[0]] == 0:
      assert (block == 0).all()
    if labels[block[0]] == 2:
      assert (block == 4).all()


def test_bad_arguments():
  labels = np.repeat(np.arange(4), 3)
  with pytest.raises(DataError, match="classes_per_batch=5 .* only 4 classes"):
    PKSampler(labels, 5, 2)
  with pytest.raises(DataError, match="P=0"):
    PKSampler(labels, 0, 2)
