"""Training with a proxy loss: proxies in the state, their optimiser group, sharding,
resume, the random sampler, telemetry, and the optimiser against PyTorch's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msjax import checkpoint, losses, sharding, telemetry, train
from msjax import data as data_lib
from msjax.data import DataError, RandomSampler
from msjax.models import layers
from scripts_run import run_json_script
from test_train import _config, _tiny


def _proxy(loss="proxy_anchor", steps=6, **optim):
  c = _tiny(_config(), steps=steps)
  c.loss.name = loss
  c.data.sampler = "random"
  c.optim.update(proxy_lr_mult=100.0, **optim)
  return c


def _state(workdir, c):
  """The state of a workdir's latest checkpoint (proxies sized by the training split)."""
  mesh = sharding.make_mesh()
  tx = train.build_optimizer(c.optim, c.train.num_steps, proxies=True)
  num = data_lib.load_dataset(c.data).train.num_classes
  _, state = train.init_state(c, tx, mesh, seed=c.seed, num_proxies=num)
  with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
    state, _ = train._restore(ckpt, state)
  return jax.device_get(state)


@pytest.mark.parametrize("loss", losses.PROXY_NAMES)
def test_eight_devices_train_proxies_like_one_device(loss):
  """Three steps on 8 virtual devices give one device's losses, parameters and proxies
  (their gradient sums every device's rows)."""
  r = run_json_script("train_sharding_check.py", loss, timeout=600)
  assert r["devices"] == 8
  np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=1e-5)
  assert r["proxies_moved"] > 0.05  # ×100 learning rate: they move
  assert r["proxies_diff"] < 1e-3 * r["proxies_moved"]
  assert r["max_param_diff"] < 0.1 * r["params_moved"]


def test_stop_and_resume_with_proxies_equals_an_uninterrupted_run(tmp_path):
  """AdamW, clipping, a frozen backbone for 2 steps and random batches: stopped after
  step 3 and resumed, the run ends bit-identical to a straight one, proxies and their
  optimiser state included."""
  opts = dict(name="adamw", weight_decay=1e-4, proxy_weight_decay=1e-4, clip_value=10.0,
              frozen_backbone_steps=2)
  straight = _proxy(**opts)
  straight.train.telemetry = False
  train.train_and_evaluate(straight, str(tmp_path / "straight"))
  split = _proxy(**opts)
  split.train.stop_at_step = 3
  assert train.train_and_evaluate(split, str(tmp_path / "split")) == {"stopped_at": 3}
  split.train.stop_at_step = 0
  assert train.train_and_evaluate(split, str(tmp_path / "split"))["step"] == 6
  a, b = _state(tmp_path / "straight", straight), _state(tmp_path / "split", split)
  assert set(a["params"]) == {"backbone", "head", "proxies"}
  assert a["params"]["proxies"].shape == (16, 16)  # one per training class, D = 16
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  lines = [json.loads(x) for x in open(tmp_path / "split" / "metrics.jsonl")]
  logged = [r for r in lines if "train/loss" in r]
  assert [r["step"] for r in logged] == [1, 2, 3, 4, 5, 6]
  # Telemetry reads the sample-to-proxy pairs: 16 samples × 1 own proxy, × 15 others.
  assert all(r["gpw/pos_mined_fraction"] == 1.0 for r in logged)
  assert all(0 < r["gpw/neg_weight_mean"] < r["gpw/pos_weight_mean"] for r in logged)


def test_proxy_telemetry_equals_the_batch_summary():
  """The sharded proxy telemetry's scalars equal ``gpw_summary`` of the loss's own
  per-sample weights on the whole [B, C] block."""
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(16, 8)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  labels = rng.integers(0, 6, 16).astype(np.int32)
  proxies = rng.normal(size=(6, 8)).astype(np.float32)
  mesh = sharding.make_mesh(jax.devices()[:1])
  for loss, hp in (("proxy_anchor", {}), ("proxy_nca", {"positive_in_denominator": True})):
    scalars, hists = telemetry.make_proxy_telemetry_fn(mesh, loss, hp)(emb, labels, proxies)
    sim = jnp.asarray(emb) @ losses.normalize_proxies(jnp.asarray(proxies)).T
    s = losses.pair_selection(sim, labels, loss=loss, ref_labels=jnp.arange(6),
                              batch_size=1, **hp)
    want = losses.gpw_summary(s.weights, s.pos, s.neg, s.selected)
    for key in ("pos_weight_mean", "neg_weight_mean", "pos_weight_max", "neg_weight_max",
                "pos_mined_fraction", "neg_mined_fraction", "empty_anchor_fraction"):
      np.testing.assert_allclose(scalars[key], want[key], rtol=1e-5, err_msg=key)
    assert int(hists["pos_sim"].sum()) == 16 and int(hists["neg_sim"].sum()) == 16 * 5


def test_proxy_group_learning_rate_and_weight_decay():
  """One Adam step moves every element by about lr × its group's multiplier; the
  proxies' weight decay is their own."""
  c = _config()
  c.optim.update(lr=1e-3, head_lr_mult=2.0, proxy_lr_mult=100.0, weight_decay=0.0,
                 proxy_weight_decay=0.5)
  tx = train.build_optimizer(c.optim, 10, proxies=True)
  params = {"backbone": jnp.ones(3), "head": jnp.ones(3), "proxies": jnp.ones(3)}
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["backbone"], -1e-3, rtol=1e-4)
  np.testing.assert_allclose(updates["head"], -2e-3, rtol=1e-4)
  np.testing.assert_allclose(updates["proxies"], -1e-1, rtol=1e-4)  # (1 + 0.5)/|1.5|
  c.optim.proxy_weight_decay = 0.0
  tx = train.build_optimizer(c.optim, 10, proxies=True)
  zero = {"backbone": jnp.zeros(3), "head": jnp.zeros(3), "proxies": jnp.zeros(3)}
  updates, _ = tx.update(zero, tx.init(params), params)
  assert float(jnp.abs(updates["proxies"]).max()) == 0.0  # no decay, no gradient


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_optimizer_equals_pytorch(name):
  """Six steps of three groups with clipping, a step decay and a backbone frozen for two
  steps equal torch.optim's Adam/AdamW with the same groups, ``clip_grad_value_`` and
  ``requires_grad=False`` for the frozen steps."""
  import torch
  c = _config()
  c.optim.update(name=name, lr=1e-2, weight_decay=0.1, head_lr_mult=3.0,
                 proxy_lr_mult=100.0, proxy_weight_decay=0.01, clip_value=0.5,
                 frozen_backbone_steps=2, lr_steps=(4,), lr_decay=0.5)
  rng = np.random.default_rng(0)
  init = {k: rng.normal(size=(4, 3)) for k in ("backbone", "head", "proxies")}
  grads = [{k: rng.normal(size=(4, 3)) for k in init} for _ in range(6)]

  with jax.enable_x64(True):
    tx = train.build_optimizer(c.optim, 6, proxies=True)
    params = jax.tree.map(jnp.asarray, init)
    state = tx.init(params)
    for g in grads:
      updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
      params = jax.tree.map(lambda p, u: p + u, params, updates)
    ours = jax.device_get(params)

  tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in init.items()}
  o = c.optim
  groups = [{"params": [tp["backbone"]], "lr": o.lr, "weight_decay": o.weight_decay},
            {"params": [tp["head"]], "lr": o.lr * 3.0, "weight_decay": o.weight_decay},
            {"params": [tp["proxies"]], "lr": o.lr * 100.0, "weight_decay": 0.01}]
  opt = (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(groups, lr=o.lr)
  sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4], gamma=0.5)
  for i, g in enumerate(grads):
    for k, p in tp.items():
      p.grad = None if (k == "backbone" and i < 2) else torch.tensor(g[k])
    torch.nn.utils.clip_grad_value_(list(tp.values()), 0.5)
    opt.step()
    sched.step()
  for k in init:
    np.testing.assert_allclose(ours[k], tp[k].detach().numpy(), rtol=1e-10, atol=1e-12,
                               err_msg=k)


def test_random_sampler_deals_every_image_once_per_epoch():
  labels = np.arange(50) % 7
  s = RandomSampler(labels, 16, seed=3)
  assert s.batches_per_epoch == 3  # 50 // 16; two images sit each epoch out
  for epoch in range(2):
    seen = np.concatenate([s.batch(epoch * 3 + j) for j in range(3)])
    assert len(set(seen)) == 48 and seen.min() >= 0 and seen.max() < 50
  again = RandomSampler(labels, 16, seed=3)
  np.testing.assert_array_equal(again.batch(4), s.batch(4))  # a pure function of the step
  assert not np.array_equal(RandomSampler(labels, 16, seed=4).batch(4), s.batch(4))
  halves = [s.process_batch(5, i, 2) for i in (0, 1)]
  np.testing.assert_array_equal(np.concatenate(halves), s.batch(5))
  with pytest.raises(DataError, match="needs 1 ≤ B ≤ 50"):
    RandomSampler(labels, 64)


@pytest.mark.parametrize("field,value,message", [
    ("data.sampler", "balanced", "config.data.sampler='balanced'"),
    ("optim.name", "sgd", "config.optim.name='sgd'"),
    ("optim.clip_value", -1.0, "config.optim.clip_value=-1.0 must be ≥ 0"),
    ("optim.frozen_backbone_steps", -2, "config.optim.frozen_backbone_steps=-2"),
    ("loss.name", "proxy", "config.loss.name='proxy'; choose one of"),
])
def test_config_mistakes_fail_before_compiling(tmp_path, field, value, message):
  c = _proxy()
  section, key = field.split(".")
  c[section][key] = value
  with pytest.raises(train.ConfigError) as e:
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert message in str(e.value)
  assert not (tmp_path / "run").exists()


def test_a_proxy_loss_cannot_take_a_memory(tmp_path):
  c = _proxy()
  c.xbm.update(enabled=True, size=40, start_step=1)
  with pytest.raises(train.ConfigError, match="cannot take a cross-batch memory"):
    train.check_config(c, 1, 1)


def test_resuming_a_proxy_run_with_a_pair_loss_names_the_proxies(tmp_path):
  c = _proxy(steps=2)
  train.train_and_evaluate(c, str(tmp_path))
  c.loss.name = "ms"
  c.train.num_steps = 4
  with pytest.raises(checkpoint.CheckpointError, match="proxy loss's class proxies"):
    train.train_and_evaluate(c, str(tmp_path))


def test_a_model_alone_is_sized_from_the_checkpoint(tmp_path):
  """Using a trained proxy-loss model without its data (embed, export) restores the
  proxies at the checkpoint's shape; export leaves them out of the embedder."""
  from msjax import analysis, export
  c = _proxy("proxy_nca", steps=2)
  train.train_and_evaluate(c, str(tmp_path))
  run = analysis.load_run(tmp_path, load_data=False)
  assert run.dataset is None and run.state["params"]["proxies"].shape == (16, 16)
  restored = export.restore(tmp_path)
  assert "proxies" not in restored.variables["params"]


def test_avg_plus_max_pooling_is_their_sum():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 4, 5)))
  np.testing.assert_allclose(layers.global_pool(x, "avg+max"),
                             x.mean(axis=(1, 2)) + x.max(axis=(1, 2)))
  with pytest.raises(ValueError, match="pooling must be one of"):
    layers.global_pool(x, "sum")


def test_proxy_anchor_recipe_follows_the_release():
  """configs/cub_proxy_anchor.py: the authors' CUB command, epochs as 32-batch steps."""
  c = _config("cub_proxy_anchor")
  assert c.loss.name == "proxy_anchor"
  assert train.loss_kwargs(c.loss) == {"alpha": 32.0, "delta": 0.1}  # the release's
  assert (c.model.backbone, c.model.embedding_dim, c.model.pooling) == (
      "bninception", 512, "avg+max")
  assert c.data.sampler == "random"
  assert c.data.classes_per_batch * c.data.images_per_class == 180
  o = c.optim
  assert (o.name, o.lr, o.weight_decay, o.proxy_lr_mult, o.clip_value) == (
      "adamw", 1e-4, 1e-4, 100.0, 10.0)
  assert o.frozen_backbone_steps == 32 and c.train.num_steps == 60 * 32
  assert tuple(o.lr_steps) == (320, 640, 960, 1280, 1600) and o.lr_decay == 0.5
  for n in (1, 2, 4):
    train.check_config(c, num_devices=n, process_count=1)
  with pytest.raises(train.ConfigError, match="does not split over 8 devices"):
    train.check_config(c, num_devices=8, process_count=1)
