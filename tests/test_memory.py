"""Cross-batch memory (``msjax.memory``, XBM) against a float64 transcription of released XBM.

The oracle is the released training step (research-xbm: ``XBM`` in modeling/xbm.py and
``do_train`` in engine/trainer.py), written again here with NumPy arrays and loops: a
queue of ``feats``/``targets`` with a pointer ``ptr``; at iteration ``t`` (from 1) past
``start``, the batch is enqueued first, then ``loss = L(batch, batch) + weight ·
L(batch, memory.get())``. The per-pair losses are the loop transcriptions of
``tests/oracles.py``, called one anchor row at a time for the memory term so that the
anchor's own fresh copy can be left out by index (its slot) before the by-value rule
(``S >= 1 − 1e-5``) of the released code runs on the rest: msjax's ``self_pair="both"``.
Columns past the filled prefix do not exist for the oracle (``get()`` slices them off).

Where msjax deliberately differs from the released queue (module docstring of
``msjax.memory``), the oracle says so in its docstring and the tests pin msjax's side.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import msjax.losses as L
import oracles
from batches import KINDS, make_batch, unit
from msjax import memory as xbm
from scripts_run import run_json_script

B, D, M = 8, 6, 24  # global batch, embedding size, memory size (3 batches)
START, WEIGHT, NUM_STEPS = 2, 0.7, 22
CLASSES = np.arange(1, 6)  # labels >= 1, so the released `is_full` (last label != 0) holds
SELF = oracles.SELF


# --- the oracle ---------------------------------------------------------------------------


class ReleasedQueue:
  """The released XBM queue: ``feats``, ``targets`` and ``ptr``, as NumPy arrays.

  ``enqueue_dequeue`` writes a batch at ``ptr``, or, when ``ptr + B > K``, into the last
  ``B`` slots and resets ``ptr`` to 0; ``get()`` is everything once ``is_full`` (the last
  label is non-zero, as released) and the prefix ``[:ptr]`` before.

  ``wrap_at_end=True`` makes one change: ``ptr`` goes back to 0 as soon as it reaches
  ``K``. Released, a batch that ends exactly at the last slot leaves ``ptr == K``, and
  the next call then takes the ``ptr + B > K`` branch and overwrites the last ``B``
  slots, which hold the batch just written, not the oldest one (with K = 3B the released
  queue holds batches {1, 2, 4} after the 4th enqueue). With the change, and K a
  multiple of B, this is the paper's queue (enqueue the batch, dequeue the oldest),
  which is what msjax implements.
  """

  def __init__(self, size, dim, wrap_at_end=True):
    self.size = size
    self.feats = np.zeros((size, dim))
    self.targets = np.zeros(size, np.int64)
    self.ptr = 0
    self.wrap_at_end = wrap_at_end

  def is_full(self):
    return self.targets[-1] != 0

  def filled(self):
    return self.size if self.is_full() else self.ptr

  def get(self):
    if self.is_full():
      return self.feats.copy(), self.targets.copy()
    return self.feats[:self.ptr].copy(), self.targets[:self.ptr].copy()

  def enqueue_dequeue(self, feats, targets):
    """Writes the batch; returns the slot each row went to."""
    count = len(targets)
    if self.ptr + count > self.size:
      first = self.size - count
      self.ptr = 0
    else:
      first = self.ptr
      self.ptr += count
    if self.wrap_at_end and self.ptr == self.size:
      self.ptr = 0
    self.feats[first:first + count] = feats
    self.targets[first:first + count] = targets
    return list(range(first, first + count))


def batch_term(name, self_pair, emb, labels):
  """``criterion(feats, targets, feats, targets)``: the square batch loss."""
  return oracles.LOSSES[name](emb @ emb.T, labels, labels, np.arange(len(labels)),
                              self_pair=self_pair)


def memory_row(name, self_pair, anchor, label, feats, targets, own):
  """Anchor ``anchor``'s term of ``criterion(feats, targets, memory)`` (not divided by B).

  Column ``own`` (the anchor's fresh copy) is left out first; then the released by-value
  rule drops same-label columns with ``S >= 1 − 1e-5`` (``self_pair="value"``, making
  msjax's "both"), or nothing more (``self_pair="index"``: oracles' index rule with no
  anchor column).
  """
  keep = [j for j in range(len(targets)) if j != own]
  sim = np.array([[float(np.dot(anchor, feats[j])) for j in keep]])
  rule = "value" if self_pair == "value" else "index"
  return oracles.LOSSES[name](sim, np.array([label]), targets[keep], np.array([-1]),
                              self_pair=rule)


def memory_term(name, self_pair, emb, labels, feats, targets, own):
  rows = [memory_row(name, self_pair, emb[i], labels[i], feats, targets, own[i])
          for i in range(len(labels))]
  return sum(rows) / len(labels)


def oracle_step(name, self_pair, queue, emb, labels, iteration):
  """One released training step: ``(total, batch, memory, d total/d emb, active)``.

  The gradient is the central finite difference (h = 1e-6) of the loop loss with the
  memory held at its contents after this step's enqueue (its entries carry no gradient),
  so the memory term moves only through its anchors: row k's term is the only one that
  depends on ``emb[k]``.
  """
  active = iteration > START
  own = queue.enqueue_dequeue(emb, labels) if active else None
  feats, targets = queue.get() if active else (None, None)
  batch = batch_term(name, self_pair, emb, labels)
  mem = memory_term(name, self_pair, emb, labels, feats, targets, own) if active else 0.0
  h = 1e-6
  grad = np.zeros_like(emb)
  for k in range(emb.shape[0]):
    for c in range(emb.shape[1]):
      values = []
      for step in (h, -h):
        e = emb.copy()
        e[k, c] += step
        value = batch_term(name, self_pair, e, labels)
        if active:
          value += WEIGHT * memory_row(name, self_pair, e[k], labels[k], feats, targets,
                                       own[k]) / len(labels)
        values.append(value)
      grad[k, c] = (values[0] - values[1]) / (2 * h)
  return batch + WEIGHT * mem, batch, mem, grad, active


def make_steps(num_steps, batch, dim, seed, nasty=True):
  """P×K batches (B/2 classes × 2) drawn from 5 labels, around fixed class centres.

  With ``nasty``: step 5 has an exact duplicate inside a class, and step 7 starts with an
  exact copy (embedding and label) of an entry of step 6, which is still in the memory:
  a same-label column at S = 1 that is not the anchor's own slot.
  """
  rng = np.random.default_rng(seed)
  centres = unit(rng.normal(size=(CLASSES.max() + 1, dim)))
  steps = []
  for t in range(num_steps):
    labels = np.repeat(rng.choice(CLASSES, batch // 2, replace=False), 2).astype(np.int32)
    emb = unit(centres[labels] + 0.9 * rng.normal(size=(batch, dim)))
    if nasty and t == 5:
      emb[5] = emb[4]
    if nasty and t == 7:
      emb[0], labels[0] = steps[-1][0][3], steps[-1][1][3]
    steps.append((emb, labels))
  return steps


# --- msjax through global_xbm_loss on a 1-device mesh ---------------------------------------


MESH = Mesh(np.array(jax.devices()[:1]), ("batch",))


def fresh_memory(size, dim=D, dtype=jnp.float64):
  """An empty memory placed as the step returns it (replicated on MESH): one compile."""
  return jax.device_put(xbm.create(size, dim, dtype=dtype), NamedSharding(MESH, P()))


@functools.cache
def xbm_step(name, self_pair="value", memory_block_size=None, weight=WEIGHT):
  """``(emb, labels, memory, active) -> ((total, XBMLoss), d total/d emb)``, jitted once."""
  # The oracle's gradient is a finite difference of the loop loss, which differentiates
  # Circle's self-paced factors: compare with them differentiated (the value is the same).
  hparams = dict(detach_alpha=False) if name == "circle" else {}
  fn = xbm.sharded_xbm_loss(MESH, "batch", weight=weight, loss=name,
                            memory_block_size=memory_block_size, self_pair=self_pair,
                            **hparams)

  def total(emb, labels, memory, active):
    out = fn(emb, labels, memory, active)
    return out.total, out

  return jax.jit(jax.value_and_grad(total, has_aux=True))


def assert_memory_equals_queue(memory, queue):
  np.testing.assert_array_equal(np.asarray(memory.embeddings), queue.feats)
  np.testing.assert_array_equal(np.asarray(memory.labels), queue.targets)
  assert int(memory.pointer) == queue.ptr
  assert int(memory.filled) == queue.filled()


@pytest.fixture(scope="module")
def steps():
  return make_steps(NUM_STEPS, B, D, seed=3)


@pytest.mark.parametrize("name, self_pair, block", [(name, "value", None) for name in L.NAMES]
                         + [("ms", "index", None), ("ms", "value", 3)])
def test_xbm_steps_match_the_released_training_loop(steps, name, self_pair, block):
  """22 steps (2 warm-up, M = 3B wraps 6 times): value parts, gradient and memory.

  Every loss with its default self-pair rule (memory term: "both"); MS also with "index"
  (by index only: step 7's copy of a memory entry is then a positive at S = 1) and with
  the memory term in row blocks of 3 (``memory_block_size``).

  Every step's total, batch and memory parts equal the oracle to 1e-10 relative; the
  gradient w.r.t. the batch embeddings equals the finite-difference gradient of the loop
  loss with the memory held fixed (the memory term reaches the model through its anchors
  only); and the memory (embeddings, labels, pointer, fill) is the oracle's queue. The
  memory term is non-zero at every active step, so it is tested, not vacuous.
  """
  step = xbm_step(name, self_pair, memory_block_size=block)
  queue = ReleasedQueue(M, D)
  memory = fresh_memory(M)
  for t, (emb, labels) in enumerate(steps):
    (total, out), grad = step(emb, labels, memory, t >= START)
    ref_total, ref_batch, ref_mem, ref_grad, active = oracle_step(
        name, self_pair, queue, emb, labels, iteration=t + 1)
    where = f"{name} {self_pair} {block} step {t}"
    assert float(out.batch) == pytest.approx(ref_batch, rel=1e-10, abs=1e-14), where
    assert float(out.memory) == pytest.approx(ref_mem, rel=1e-10, abs=1e-14), where
    assert float(total) == pytest.approx(ref_total, rel=1e-10, abs=1e-14), where
    assert float(out.total) == float(total), where
    assert (ref_mem > 0) == active, where
    scale = np.abs(ref_grad).max()
    assert scale > 0, where
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=0, atol=1e-6 * scale,
                               err_msg=where)
    memory = out.new_memory
    assert_memory_equals_queue(memory, queue)


def test_released_queue_overwrites_its_newest_batch_where_msjax_drops_the_oldest():
  """Pins the queue msjax implements against the released one, with K = 3B.

  msjax is the paper's queue: after the 4th enqueue it holds batches 2, 3, 4 (batch 1,
  the oldest, is dropped). The released queue, transcribed verbatim
  (``wrap_at_end=False``), is left with ``ptr == K`` after the 3rd enqueue and writes
  the 4th batch over the 3rd: it holds 1, 2, 4. Every (K/B + 1)-th released enqueue
  overwrites the batch written just before it, so even with K a multiple of B the two
  queues differ from the first wrap on (the oracle above uses ``wrap_at_end=True``).
  """
  batch, size = 4, 12
  released = ReleasedQueue(size, 1, wrap_at_end=False)
  memory = xbm.create(size, 1, dtype=jnp.float64)
  for t in range(1, 5):
    feats = np.full((batch, 1), float(t))
    released.enqueue_dequeue(feats, np.full(batch, t))
    memory = xbm.enqueue(memory, feats, np.full(batch, t, np.int32))
  assert sorted(set(np.asarray(memory.labels).tolist())) == [2, 3, 4]
  assert sorted(set(released.targets.tolist())) == [1, 2, 4]
  assert int(memory.pointer) == batch and released.ptr == 0


def test_memory_not_a_multiple_of_the_batch_holds_exactly_the_last_m_entries():
  """M = 20, B = 8 over 12 steps (10 enqueues: the memory wraps four times, mid-batch).

  Here msjax deliberately differs from the released queue, which would write a batch
  that does not fit before the end into the *last* 8 slots (overwriting 4 entries of the
  previous batch while older ones survive) and restart at slot 0. msjax wraps slot by
  slot, so after n enqueued entries the memory is a deque of the last min(n, M): entry k
  sits in slot k mod M, pointer = n mod M, filled = min(n, M), and every entry of the
  deque is in the memory exactly once (none stale, none duplicated). The loss parts equal
  the oracle over the deque's entries, the anchors' own copies left out by identity.
  """
  size, num_steps = 20, 12
  steps = make_steps(num_steps, B, D, seed=5, nasty=False)
  step = xbm_step("ms")
  memory = fresh_memory(size)
  queue = collections.deque(maxlen=size)  # (entry number, embedding, label)
  count = 0
  for t, (emb, labels) in enumerate(steps):
    (_, out), _ = step(emb, labels, memory, t >= START)
    memory = out.new_memory
    active = t >= START
    if active:
      own = []
      for i in range(B):
        queue.append((count, emb[i], labels[i]))
        own.append(count)
        count += 1
    assert int(memory.filled) == min(count, size) == len(queue)
    assert int(memory.pointer) == count % size
    stored = np.asarray(memory.embeddings)
    stored_labels = np.asarray(memory.labels)
    for k, e, label in queue:
      np.testing.assert_array_equal(stored[k % size], e)
      assert stored_labels[k % size] == label
      matches = np.all(stored[:len(queue)] == e, axis=1)
      assert matches.sum() == 1, (t, k)  # in the memory exactly once
    assert float(out.batch) == pytest.approx(batch_term("ms", "value", emb, labels),
                                             rel=1e-10)
    if not active:
      assert float(out.memory) == 0.0
      continue
    ids = [k for k, _, _ in queue]
    feats = np.stack([e for _, e, _ in queue])
    targets = np.array([label for _, _, label in queue])
    ref = memory_term("ms", "value", emb, labels, feats, targets, [ids.index(k) for k in own])
    assert ref > 0
    assert float(out.memory) == pytest.approx(ref, rel=1e-10), t


# --- memory unit tests ---------------------------------------------------------------------


def test_enqueue_rejects_a_batch_larger_than_the_memory():
  """A batch that would overwrite itself is refused, naming both sizes."""
  memory = xbm.create(4, 3)
  with pytest.raises(ValueError, match=r"batch of 5 .*memory of 4"):
    xbm.enqueue(memory, np.zeros((5, 3), np.float32), np.zeros(5, np.int32))
  with pytest.raises(ValueError, match=r"\(3, 2\)"):
    xbm.enqueue(memory, np.zeros((3, 2), np.float32), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="positive int"):
    xbm.create(0, 3)
  full = xbm.enqueue(memory, np.ones((4, 3), np.float32), np.arange(4, dtype=np.int32))
  assert int(full.pointer) == 0 and int(full.filled) == 4  # a batch of exactly M fits


def test_fill_level_is_a_counter_not_the_last_label():
  """Class 0 in the last slot still counts as filled (the released ``is_full`` would not)."""
  memory = xbm.create(6, 2)
  memory = xbm.enqueue(memory, np.ones((4, 2)), np.array([3, 1, 2, 0], np.int32))
  np.testing.assert_array_equal(xbm.valid(memory), [True] * 4 + [False] * 2)
  memory = xbm.enqueue(memory, np.ones((2, 2)), np.array([5, 0], np.int32))
  assert int(memory.filled) == 6 and int(memory.pointer) == 0
  assert bool(np.all(xbm.valid(memory)))


def masked_case(kind, seed):
  """Anchors (6 rows of a 12-image batch) against 16 columns, 10 of them valid.

  The 16 columns are the 12 batch images and 4 garbage columns: copies of anchors with
  their labels (S = 1) and random ones with anchor labels, as a memory's unfilled or
  stale slots could hold. The invalid columns are the 4 garbage ones and 2 random batch
  columns (one of them an anchor's own, so anchor_index points at an invalid column).
  """
  emb, labels = make_batch(kind, 4, 3, 6, seed=seed, spread=1.0)
  rng = np.random.default_rng(seed)
  garbage = np.concatenate([emb[:2], unit(rng.normal(size=(2, 6)))])
  refs = np.concatenate([emb, garbage])
  ref_labels = np.concatenate([labels, labels[:2], labels[2:4]]).astype(np.int32)
  anchors = np.arange(6)
  dropped = [int(rng.integers(0, 6)), int(rng.integers(6, 12))]
  valid = np.ones(16, bool)
  valid[dropped + [12, 13, 14, 15]] = False
  kept = np.flatnonzero(valid)
  sliced_index = np.array([np.searchsorted(kept, a) if valid[a] else -1 for a in anchors])
  sim = emb[anchors] @ refs.T
  return dict(sim=sim, labels=labels[anchors], ref_labels=ref_labels,
              anchor_index=anchors.astype(np.int32), valid=valid, kept=kept,
              sliced_index=sliced_index.astype(np.int32))


SELF_PAIRS = ("index", "both")  # the memory term's rules (memory_self_pair)


@functools.cache
def masked_and_sliced(name):
  """One jitted function, vmapped over cases: what the ``ref_valid`` test compares."""
  loss, weights = L.get(name).loss, L.get(name).weights

  def one(sim, labels, ref_labels, anchor_index, valid, kept, sliced_index, self_pair):
    masked = dict(ref_labels=ref_labels, anchor_index=anchor_index, ref_valid=valid,
                  self_pair=self_pair)
    sliced = dict(ref_labels=ref_labels[kept], anchor_index=sliced_index,
                  self_pair=self_pair)
    none = dict(masked, ref_valid=jnp.zeros_like(valid))
    sel = L.pair_selection(sim, labels, loss=name, **masked)
    sliced_sel = L.pair_selection(sim[:, kept], labels, loss=name, **sliced)
    return dict(
        value=loss(sim, labels, **masked), weights=weights(sim, labels, **masked),
        grad=jax.grad(lambda s: loss(s, labels, **masked))(sim),
        sliced_value=loss(sim[:, kept], labels, **sliced),
        sliced_weights=weights(sim[:, kept], labels, **sliced),
        none_value=loss(sim, labels, **none), none_weights=weights(sim, labels, **none),
        all_weights=weights(sim, labels, **dict(masked, ref_valid=None)),
        sel=(sel.pos, sel.neg, sel.selected),
        sliced_sel=(sliced_sel.pos, sliced_sel.neg, sliced_sel.selected))

  def every_rule(*case):
    return {self_pair: one(*case, self_pair) for self_pair in SELF_PAIRS}

  return jax.jit(jax.vmap(every_rule))


@pytest.mark.parametrize("name", L.NAMES)
def test_invalid_columns_are_neither_positives_nor_negatives(name):
  """Loss, weights, selection with ``ref_valid`` == the same on the valid columns only.

  For every batch kind (single-image classes, one class, duplicates, ties, mined-out)
  and both rules of the memory term ("both", "index"): the value equals the loss of the
  sliced block; the weights on the valid columns equal the sliced weights and are
  exactly 0 on the invalid ones; the candidate and selected pairs (``pair_selection``,
  the MS mining for ms) never include an invalid column and equal the sliced ones on the
  valid columns; ``jax.grad`` of the loss w.r.t. sim equals the weights with
  ``ref_valid``; with every column invalid the loss and the weights are 0. Without
  ``ref_valid`` the invalid columns would get weight in some case of every rule, so the
  mask is what zeroes them.
  """
  cases = [masked_case(kind, seed=i) for i, kind in enumerate(KINDS)]
  keys = ("sim", "labels", "ref_labels", "anchor_index", "valid", "kept", "sliced_index")
  stacked = [np.stack([c[k] for c in cases]) for k in keys]
  out = jax.tree.map(np.asarray, masked_and_sliced(name)(*stacked))
  for self_pair in SELF_PAIRS:
    unmasked = out[self_pair]["all_weights"]
    assert any(np.any(unmasked[i][:, ~c["valid"]]) for i, c in enumerate(cases))
    for i, (kind, c) in enumerate(zip(KINDS, cases)):
      r = jax.tree.map(lambda x: x[i], out[self_pair])
      valid, kept = c["valid"], c["kept"]
      where = f"{name} {kind} {self_pair}"
      assert float(r["value"]) == pytest.approx(float(r["sliced_value"]), rel=1e-12,
                                                abs=1e-15), where
      np.testing.assert_allclose(r["weights"][:, kept], r["sliced_weights"], rtol=1e-12,
                                 atol=1e-15, err_msg=where)
      assert np.all(r["weights"][:, ~valid] == 0), where
      np.testing.assert_allclose(r["grad"], r["weights"], rtol=1e-10, atol=1e-14,
                                 err_msg=where)
      for field, got, ref in zip(("pos", "neg", "selected"), r["sel"], r["sliced_sel"]):
        assert not got[:, ~valid].any(), (where, field)
        np.testing.assert_array_equal(got[:, kept], ref, err_msg=f"{where} {field}")
      assert float(r["none_value"]) == 0.0 and not r["none_weights"].any(), where


def test_ref_valid_is_checked():
  """A ``ref_valid`` of the wrong shape or dtype is refused with the expected shape."""
  sim = np.zeros((2, 3))
  for bad in (np.ones(2, bool), np.ones(3, np.int32)):
    with pytest.raises(ValueError, match=r"ref_valid.*\(3,\)"):
      L.ms_loss(sim, np.zeros(2, np.int32), ref_labels=np.zeros(3, np.int32), ref_valid=bad)


def bfloat16_memory_case():
  """Anchors and a bfloat16 memory holding their copies (S = 1 ± 1e-3 to them).

  Returns ``(emb, labels, memory, own_slots)``: the memory (bfloat16, 16 slots, 12
  filled) holds an earlier batch, then the anchors' copies, enqueued by msjax.
  """
  rng = np.random.default_rng(1)
  labels = np.array([1, 1, 2, 2, 3, 3], np.int32)
  centres = unit(rng.normal(size=(4, 16)))
  emb = unit(centres[labels] + 0.7 * rng.normal(size=(6, 16)))
  earlier = unit(centres[labels] + 0.7 * rng.normal(size=(6, 16)))
  memory = xbm.create(16, 16, dtype=jnp.bfloat16)
  memory = xbm.enqueue(memory, earlier, labels)
  own = np.asarray(xbm.slots(memory, 6))
  memory = xbm.enqueue(memory, emb, labels)
  return emb, labels, memory, own


def test_both_drops_the_own_copy_even_when_bfloat16_rounding_puts_it_below_threshold():
  """The anchor's bfloat16 copy (S = 1 ± 1e-3) is not a positive under "both".

  Where rounding puts S below 1 − 1e-5 (at least 3 of the 6 anchors), "value" alone
  keeps it as a positive (the mask says so, and the contrastive and binomial values
  change); "both" drops it for every anchor, and ``memory_loss`` (which uses "both")
  equals the oracle that leaves the own slot out and applies the value rule to the rest.
  The stored copies are the bfloat16 roundings of the embeddings.
  """
  emb, labels, memory, own = bfloat16_memory_case()
  stored = np.asarray(memory.embeddings.astype(jnp.float64))
  np.testing.assert_array_equal(stored[own], np.asarray(jnp.asarray(emb, jnp.bfloat16),
                                                        np.float64))
  sim = emb @ stored.T
  own_sim = sim[np.arange(6), own]
  below = own_sim < SELF
  assert below.sum() >= 3 and np.all(np.abs(own_sim - 1) < 4e-3), own_sim
  valid = np.asarray(xbm.valid(memory))
  pairs = L.prepare_pairs(sim, labels, ref_labels=memory.labels, anchor_index=own,
                          ref_valid=valid)
  pos_value, _ = L.pair_masks(pairs, self_pair="value")
  pos_both, neg_both = L.pair_masks(pairs, self_pair="both")
  np.testing.assert_array_equal(np.asarray(pos_value)[np.arange(6), own], below)
  assert not np.any(np.asarray(pos_both)[np.arange(6), own])
  assert not np.any(np.asarray(neg_both)[np.arange(6), own])
  filled = int(memory.filled)
  feats, targets = stored[:filled], np.asarray(memory.labels)[:filled]

  @jax.jit
  def values(emb, memory):
    got = {name: xbm.memory_loss(emb, labels, memory, anchor_slots=own, loss=name)
           for name in L.NAMES}
    by_value = {name: L.pair_loss_from_embeddings(
        emb, labels, loss=name, ref_emb=memory.embeddings, ref_labels=memory.labels,
        anchor_index=own, ref_valid=xbm.valid(memory), ref_grad=False, self_pair="value")
                for name in ("contrastive", "binomial")}
    return got, by_value

  got, by_value = values(emb, memory)
  for name in L.NAMES:
    ref = memory_term(name, "value", emb, labels, feats, targets, own)
    assert float(got[name]) == pytest.approx(ref, rel=1e-10, abs=1e-15), name
  for name, value in by_value.items():
    assert abs(float(value) - float(got[name])) > 1e-6, name


@pytest.mark.parametrize("name", ["ms", "binomial"])
def test_constant_references_get_no_gradient_and_leave_the_anchor_gradient(name):
  """``ref_grad=False``: d/d ref_emb is 0, d/d emb is that of ``ref_grad=True``.

  Checked on a partly filled bfloat16 memory (``ref_valid``), unblocked and in row
  blocks of 4; with ``ref_grad=True`` the reference gradient is non-zero, so the zero is
  the switch's doing.
  """
  emb, labels, memory, own = bfloat16_memory_case()
  refs = np.asarray(memory.embeddings.astype(jnp.float64))

  @jax.jit
  def grads(e, r):
    out = {}
    for block_size in (None, 4):
      for ref_grad in (True, False):
        def fn(e, r):
          return L.pair_loss_from_embeddings(
              e, labels, loss=name, ref_emb=r, ref_labels=memory.labels, anchor_index=own,
              ref_valid=xbm.valid(memory), ref_grad=ref_grad, block_size=block_size,
              self_pair="both")
        out[f"{block_size} {ref_grad}"] = jax.grad(fn, argnums=(0, 1))(e, r)
    return out

  out = grads(emb, refs)
  for key, (d_emb, d_ref) in out.items():
    where = (name, key)
    d_emb, d_ref = np.asarray(d_emb), np.asarray(d_ref)
    assert np.abs(d_emb).max() > 0, where
    np.testing.assert_allclose(d_emb, out["None True"][0], rtol=1e-12, atol=1e-15,
                               err_msg=str(where))
    if key.endswith("True"):
      assert np.abs(d_ref).max() > 0, where
    else:
      assert np.all(d_ref == 0), where


@pytest.mark.parametrize("name", ["ms", "binomial"])
def test_row_blocked_memory_loss_equals_unblocked(name):
  """``memory_loss(block_size=3)`` (two blocks of 3 and a tail of 2) == one block.

  Value and gradient w.r.t. the anchors, on a float64 memory of 24 slots that has
  wrapped once, the anchors' copies in it.
  """
  rng = np.random.default_rng(7)
  memory = xbm.create(24, D, dtype=jnp.float64)
  steps = make_steps(4, B, D, seed=9, nasty=False)
  for emb, labels in steps[:3]:
    memory = xbm.enqueue(memory, emb, labels)
  emb, labels = steps[3]
  emb = unit(emb + 0.1 * rng.normal(size=emb.shape))
  own = xbm.slots(memory, B)
  memory = xbm.enqueue(memory, emb, labels)

  @jax.jit
  def both(e):
    return [jax.value_and_grad(functools.partial(
        xbm.memory_loss, labels=labels, memory=memory, anchor_slots=own, loss=name,
        block_size=block_size, batch_size=16))(e) for block_size in (None, 3)]

  (v0, g0), (v1, g1) = both(emb)
  assert float(v0) > 0
  assert float(v1) == pytest.approx(float(v0), rel=1e-12)
  np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)


def test_warm_up_leaves_a_filled_memory_alone():
  """``active=False`` with a non-empty memory: memory part 0, memory returned as it was."""
  (emb0, labels0), (emb, labels) = make_steps(2, B, D, seed=2, nasty=False)
  step = xbm_step("ms")
  (_, first), _ = step(emb0, labels0, fresh_memory(M), True)
  memory = first.new_memory
  assert int(memory.filled) == B
  (total, off), _ = step(emb, labels, memory, False)
  for a, b in zip(off.new_memory, memory):
    np.testing.assert_array_equal(a, b)
  assert float(off.memory) == 0.0 and float(total) == float(off.batch) > 0
  (_, on), _ = step(emb, labels, memory, True)
  assert float(on.memory) > 0 and int(on.new_memory.filled) == 2 * B


def test_check_config_names_the_fields():
  """Each bad XBM setting is reported under its ``config.xbm`` name."""
  assert xbm.check_config(64, 0, 1.0, "float32", 0, global_batch=64, num_steps=10) == []
  problems = xbm.check_config(32, 10, 0.0, "float16", -1, global_batch=64, num_steps=10)
  for field in ("size=32", "start_step=10", "weight=0.0", "dtype='float16'",
                "block_size=-1"):
    assert any(f"config.xbm.{field}" in p for p in problems), (field, problems)


# --- 8 virtual devices ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded():
  return run_json_script("memory_sharding_check.py")


def test_sharded_xbm_steps_equal_one_device(sharded):
  """float64, several carried steps (warm-up, wrap-around): values, gradients, memory.

  On 8 virtual devices, each step's total/batch/memory parts equal the 1-device mesh's
  to 1e-12, the gradients to 1e-12 of their scale, and the memory is bit-identical.
  """
  assert sharded["devices"] == 8
  runs = [r for r in sharded["runs"] if r["dtype"] == "float64"]
  assert {r["name"] for r in runs} >= {"ms", "contrastive"}
  assert {r["memory_block_size"] for r in runs} == {None, 3}
  for r in runs:
    assert r["active"][:2] == [False, False] and all(r["active"][2:]), r["name"]
    assert max(r["filled"]) == r["memory_size"] and r["wrapped"], r["name"]
    for step in r["steps"]:
      where = (r["name"], r["memory_block_size"], step["step"])
      for part in ("total", "batch", "memory"):
        assert step[part] == pytest.approx(step["ref_" + part], rel=1e-12, abs=1e-15), where
      assert step["grad_err"] <= 1e-12 * step["grad_scale"] and step["grad_scale"] > 0, where
      assert step["memory_identical"], where
      assert step["grad_sharding"] == "P('batch', None)", where
      assert step["active"] == (step["memory"] != 0.0), where


def test_each_device_forms_only_its_rows_of_the_memory_similarity(sharded):
  """Per-device dot_generals are [B/n, M] (or row blocks of it), never [B, M] or [B, B]."""
  for r in sharded["runs"]:
    b, n, m = r["batch"], r["devices"], r["memory_size"]
    shapes = set(r["dot_shapes"])
    assert f"{b}x{m}" not in shapes and f"{b}x{b}" not in shapes, r["dot_shapes"]
    assert f"{b // n}x{b}" in shapes, r["dot_shapes"]
    if r["memory_block_size"] is None:
      assert f"{b // n}x{m}" in shapes, r["dot_shapes"]
    else:
      rows, tail = r["memory_block_size"], (b // n) % r["memory_block_size"]
      assert f"{rows}x{m}" in shapes and f"{tail}x{m}" in shapes, r["dot_shapes"]
      assert f"{b // n}x{m}" not in shapes, r["dot_shapes"]


def test_sharded_float32_with_bfloat16_memory(sharded):
  """float32 anchors, bfloat16 memory: values within float32 rounding, memory bit-equal."""
  runs = [r for r in sharded["runs"] if r["dtype"] == "float32"]
  assert runs and all(r["memory_dtype"] == "bfloat16" for r in runs)
  for r in runs:
    for step in r["steps"]:
      where = (r["name"], step["step"])
      for part in ("total", "batch", "memory"):
        assert step[part] == pytest.approx(step["ref_" + part], rel=1e-5, abs=1e-6), where
      assert step["grad_err"] <= 1e-4 * step["grad_scale"], where
      assert step["memory_identical"], where


def test_memory_telemetry_on_eight_devices_equals_one(sharded):
  """The memory-pair telemetry of the last step (``gpw_memory/``), sharded over 8
  devices, equals one device's: the same histograms, scalars within float32 reduction
  order, and every negative pair with the filled memory counted, as NumPy counts them."""
  for r in sharded["runs"]:
    assert r["telemetry_histograms_equal"], r["name"]
    assert r["telemetry_rel_diff"] < 1e-5, r
    assert r["telemetry_nan_keys"] == [], r
    assert r["telemetry_neg_pairs"] == r["expected_neg_pairs"] > 0
