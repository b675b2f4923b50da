"""Training: the train state, the jitted sharded step, and the loop around it.

``train_and_evaluate(config, workdir)`` is what ``python -m msjax.main`` runs:

1. check the config and the data before anything compiles;
2. build the model (``msjax.models``), the optimiser (Adam with weight decay added to the
   gradient, as PyTorch's Adam does, or AdamW; multi-step decay, optional warmup;
   separate learning-rate multipliers for backbone, head and a proxy loss's proxies) and
   the state, replicated on a mesh whose ``"batch"`` axis spans every device of every
   process;
3. loop: global P×K batch → step → metrics, periodic evaluation, checkpoints (resuming
   from the latest one, input position included), preemption and non-finite checks;
4. write ``<workdir>/final_metrics.json`` and print the final table.

The step computes the loss over the *global* batch: each device embeds its slice of the
batch, then computes the similarity rows of its own anchors against every gathered
embedding (``losses.global_batch_loss`` inside ``jax.shard_map``), so no device holds a
``[B, B]`` matrix and the gradient equals the single-device one. With ``config.xbm`` the
state also holds a cross-batch memory and the step adds the memory term
(``memory.global_xbm_loss``: each device's anchors against the replicated memory). A
proxy loss (``losses.PROXY_NAMES``) keeps one learned proxy per training class in
``params["proxies"]``; each device takes its samples' rows against every proxy, and the
loss sums what the proxies need over devices (``losses.proxy_loss_from_embeddings``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import PartitionSpec

from msjax import evaluate as evaluate_lib
from msjax import losses, memory, models, sharding, telemetry
from msjax.data import records, transforms
from msjax.models import pretrained as pretrained_lib

# ---------------------------------------------------------------------------- config


class ConfigError(ValueError):
  """An inconsistent config; the message names the field and how to fix it."""


PROXIES = "proxies"  # the key of a proxy loss's proxies in params (beside the model's)
OPTIMIZERS = ("adam", "adamw")


def loss_kwargs(loss_cfg) -> dict:
  """``config.loss`` → keyword arguments of the registry loss it names."""
  if loss_cfg.name not in losses.ALL_NAMES:
    raise ConfigError(f"config.loss.name={loss_cfg.name!r}; choose one of "
                      f"{losses.ALL_NAMES}.")
  if loss_cfg.name == "ms":
    return {k: loss_cfg[k] for k in ("alpha", "beta", "lam", "epsilon", "mining",
                                     "weighting")}
  return {**dict(loss_cfg.get(loss_cfg.name) or {}), **dict(loss_cfg.get("other") or {})}


def check_config(config, num_devices: int, process_count: int):
  """Fails fast, before any compilation, on a config that cannot run."""
  d, t = config.data, config.train
  batch = d.classes_per_batch * d.images_per_class
  if batch % num_devices:
    raise ConfigError(
        f"the P×K batch of {d.classes_per_batch}×{d.images_per_class} = {batch} images "
        f"does not split over {num_devices} devices; make config.data.classes_per_batch × "
        f"config.data.images_per_class a multiple of {num_devices}.")
  if batch % process_count:
    raise ConfigError(f"the batch of {batch} does not split over {process_count} "
                      "processes.")
  if d.eval_batch_size % num_devices:
    raise ConfigError(f"config.data.eval_batch_size={d.eval_batch_size} must be a multiple "
                      f"of the device count {num_devices}.")
  if config.model.backbone not in models.BACKBONES:
    raise ConfigError(f"config.model.backbone={config.model.backbone!r}; choose one of "
                      f"{sorted(models.BACKBONES)}.")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.model.dtype={config.model.dtype!r}; use 'float32' or "
                      "'bfloat16'.")
  loss_kwargs(config.loss)
  from msjax.data import SAMPLERS
  if d.get("sampler", "pk") not in SAMPLERS:
    raise ConfigError(f"config.data.sampler={d.sampler!r}; choose one of {SAMPLERS}.")
  o = config.optim
  if o.name not in OPTIMIZERS:
    raise ConfigError(f"config.optim.name={o.name!r}; choose one of {OPTIMIZERS}.")
  for field in ("clip_value", "frozen_backbone_steps", "proxy_weight_decay",
                "proxy_lr_mult"):
    if o.get(field, 0) < 0:
      raise ConfigError(f"config.optim.{field}={o[field]} must be ≥ 0.")
  if t.num_steps < 1:
    raise ConfigError(f"config.train.num_steps={t.num_steps} must be positive.")
  if xbm_enabled(config):
    x = config.xbm
    if not losses.get(config.loss.name).rectangular:
      raise ConfigError(
          f"config.loss.name={config.loss.name!r} has no rectangular form (anchors against "
          "other references), so it cannot take a cross-batch memory; set "
          "config.xbm.enabled=False or use one of "
          f"{tuple(n for n in losses.NAMES if losses.get(n).rectangular)}.")
    problems = memory.check_config(x.size, x.start_step, x.weight, x.dtype, x.block_size,
                                   global_batch=batch, num_steps=t.num_steps)
    if problems:
      raise ConfigError(" ".join(problems))
  if config.eval.split not in ("val", "test"):
    raise ConfigError(f"config.eval.split={config.eval.split!r}; use 'val' (needs "
                      "config.data.val_fraction > 0) or 'test'.")
  if config.eval.split == "val" and not d.val_fraction:
    raise ConfigError("config.eval.split='val' needs a validation split: set "
                      "config.data.val_fraction (e.g. 0.2).")
  m = config.model
  if m.pooling:
    try:
      models.check_pooling(m.backbone, m.pooling)
    except ValueError as e:
      raise ConfigError(f"config.model.pooling: {e}") from None
  if m.pretrained and not pretrained_lib.is_name(m.pretrained):
    from etils import epath
    if not epath.Path(m.pretrained).exists():
      names = pretrained_lib.names_for(m.backbone)
      raise ConfigError(
          f"config.model.pretrained={m.pretrained} is neither a published checkpoint's "
          f"name ({', '.join(names) or 'none is published'} for {m.backbone}; all: python "
          "-m msjax.models.pretrained list) nor an existing file. Name one, or convert a "
          "checkpoint yourself: python -m msjax.models.convert --arch "
          f"{m.backbone} --src <downloaded .pth> --out {m.pretrained} (docs/models.md); or "
          "set config.model.pretrained='' to start from random weights.")


def describe_start(config) -> str:
  """The line that says what the backbone starts from; a benchmark recipe started from
  random weights says so loudly (its published numbers assume pretrained weights)."""
  m = config.model
  if m.pretrained:
    where = (pretrained_lib.PUBLISHED[m.pretrained].url
             if pretrained_lib.is_name(m.pretrained) else "a converted file")
    return f"{m.backbone} starts from pretrained weights {m.pretrained} ({where})."
  line = f"{m.backbone} starts from RANDOM weights (config.model.pretrained='')"
  from msjax.config import BENCHMARKS
  if config.data.dataset in BENCHMARKS:
    names = pretrained_lib.names_for(m.backbone)
    line = (f"WARNING: {line}; the {config.data.dataset} recipes and their published "
            "numbers start from pretrained weights"
            + (f" (--config.model.pretrained={names[0]})" if names else ""))
  return line + "."


def resolve_pretrained(config, log=print):
  """The converted weights file ``config.model`` starts from (``None``: random weights);
  a published name is fetched into the cache on first use (``pretrained.resolve``)."""
  m = config.model
  return pretrained_lib.resolve(m.pretrained, m.backbone, cache=m.get("weights_cache", ""),
                                pinned=m.get("pretrained_sha256", ""), log=log)


def xbm_enabled(config) -> bool:
  """Whether ``config`` trains with a cross-batch memory (``config.xbm``)."""
  return "xbm" in config and bool(config.xbm.enabled)


# ---------------------------------------------------------------------------- optimiser


def learning_rate_schedule(o, num_steps: int) -> optax.Schedule:
  """``o.lr`` × ``o.lr_decay`` at each of ``o.lr_steps``, after a linear warmup."""
  boundaries = {int(s): float(o.lr_decay) for s in o.lr_steps if 0 < int(s) < num_steps}
  decay = optax.piecewise_constant_schedule(float(o.lr), boundaries)
  warmup = int(o.warmup_steps)
  if not warmup:
    return decay
  return lambda count: decay(count) * jnp.minimum(1.0, (count + 1) / warmup)


def frozen_for(steps: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """``inner`` from update ``steps`` on, zero updates before; ``inner``'s state waits too,
  as PyTorch's ``requires_grad=False`` leaves Adam's moments and step count untouched."""
  def init(params):
    return jnp.zeros((), jnp.int32), inner.init(params)

  def update(updates, state, params=None):
    count, inner_state = state
    new_updates, inner_state = jax.lax.cond(
        count >= steps, lambda: inner.update(updates, inner_state, params),
        lambda: (jax.tree.map(jnp.zeros_like, updates), inner_state))
    return new_updates, (optax.safe_increment(count), inner_state)

  return optax.GradientTransformation(init, update)


def build_optimizer(o, num_steps: int, *, proxies: bool = False
                    ) -> optax.GradientTransformation:
  """Adam with PyTorch's weight decay (``wd · θ`` added to the gradient before the
  moments), or ``o.name="adamw"`` with PyTorch's decoupled decay (``lr · wd · θ``), and
  per-group learning-rate multipliers: backbone, head and, with ``proxies``, a proxy
  loss's proxies (with their own weight decay). ``o.clip_value`` clips every gradient
  element first; ``o.frozen_backbone_steps`` holds the backbone still while the head and
  proxies start. Without these options the optimiser state has the layout it always had,
  so earlier checkpoints resume."""
  if o.name not in OPTIMIZERS:
    raise ConfigError(f"config.optim.name={o.name!r}; choose one of {OPTIMIZERS}.")
  schedule = learning_rate_schedule(o, num_steps)

  def group(mult, weight_decay, frozen_steps=0):
    decay = optax.add_decayed_weights(float(weight_decay))
    adam = optax.scale_by_adam(b1=float(o.b1), b2=float(o.b2), eps=float(o.eps))
    moments = (adam, decay) if o.name == "adamw" else (decay, adam)
    # The schedule counts every step, frozen ones included (PyTorch's StepLR does).
    lr = optax.scale_by_learning_rate(lambda count: schedule(count) * mult)
    if frozen_steps:
      return optax.chain(frozen_for(int(frozen_steps), optax.chain(*moments)), lr)
    return optax.chain(*moments, lr)

  groups = {"backbone": group(float(o.backbone_lr_mult), o.weight_decay,
                              o.get("frozen_backbone_steps", 0)),
            "head": group(float(o.head_lr_mult), o.weight_decay)}
  if proxies:
    groups[PROXIES] = group(float(o.get("proxy_lr_mult", 1.0)),
                            o.get("proxy_weight_decay", 0.0))

  def labels(params):
    return {k: jax.tree.map(lambda _: k if k in ("head", PROXIES) else "backbone", v)
            for k, v in params.items()}

  tx = optax.multi_transform(groups, labels)
  if o.get("clip_value", 0.0):
    tx = optax.chain(optax.clip(float(o.clip_value)), tx)
  return tx


# ---------------------------------------------------------------------------- state


@dataclasses.dataclass(frozen=True)
class Model:
  """The static halves of the model: train- and eval-mode graph definitions."""

  train_graph: Any
  eval_graph: Any
  convention: str


def create_model(config, *, seed: int):
  """The embedding model, its graphs, and its initial parameters and statistics."""
  m = config.model
  dtype = jnp.bfloat16 if m.dtype == "bfloat16" else None
  model = models.create_model(
      m.backbone, m.embedding_dim, rngs=nnx.Rngs(seed), pretrained=resolve_pretrained(config),
      pooling=m.pooling or None, frozen_bn=m.frozen_bn, mlp_hidden=m.get("mlp_hidden") or None,
      dtype=dtype, remat=bool(m.get("remat", False)))
  eval_graph = nnx.graphdef(model)
  model.train()
  train_graph, params, rest = nnx.split(model, nnx.Param, ...)
  return Model(train_graph, eval_graph, models.INPUT_CONVENTIONS[m.backbone]), params, rest


def init_state(config, tx, mesh, *, seed: int, num_proxies: int | None = None):
  """``(Model, state)``; the state is replicated over ``mesh``. A proxy loss needs
  ``num_proxies`` (one per training class), initialised as its authors do."""
  model, params, rest = create_model(config, seed=seed)
  state = {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest),
           "step": jnp.zeros((), jnp.int32)}
  if losses.is_proxy(config.loss.name):
    init = losses.get(config.loss.name).proxy_init
    key = jax.random.fold_in(jax.random.key(seed), 0x9E0)  # apart from the model's
    state["params"][PROXIES] = init(key, int(num_proxies), int(config.model.embedding_dim))
  state["opt_state"] = tx.init(state["params"])
  if xbm_enabled(config):
    dtype = jnp.bfloat16 if config.xbm.dtype == "bfloat16" else jnp.float32
    state["memory"] = memory.create(int(config.xbm.size), config.model.embedding_dim, dtype)
  return model, sharding.replicate(state, mesh)


def model_params(params: dict) -> dict:
  """``params`` without a proxy loss's proxies: what the embedding model holds."""
  return {k: v for k, v in params.items() if k != PROXIES}


def _merge(graph, state):
  params = nnx.State(model_params(state["params"]))
  rest = nnx.State(state["rest"])
  return nnx.merge(graph, params, rest)


# ---------------------------------------------------------------------------- the step


def _loss_fn(mesh, loss_cfg, xbm_cfg):
  """``(emb, labels, memory, active, proxies) -> (loss, parts, memory)`` over the sharded
  batch; ``proxies`` (replicated) only for a proxy loss, ``memory`` only with XBM."""
  axis = sharding.BATCH_AXIS
  kwargs = dict(loss=loss_cfg.name, **loss_kwargs(loss_cfg))
  batch, replicated = PartitionSpec(axis), PartitionSpec()
  if losses.is_proxy(loss_cfg.name):
    fn = jax.shard_map(
        functools.partial(losses.proxy_loss_from_embeddings, axis_name=axis, **kwargs),
        mesh=mesh, in_specs=(batch, batch, replicated), out_specs=replicated)
    return lambda emb, labels, mem, active, proxies: (fn(emb, labels, proxies), {}, mem)
  if xbm_cfg is None:
    fn = jax.shard_map(functools.partial(losses.global_batch_loss, axis_name=axis, **kwargs),
                       mesh=mesh, in_specs=(batch, batch), out_specs=replicated)
    return lambda emb, labels, mem, active, proxies: (fn(emb, labels), {}, mem)
  fn = memory.sharded_xbm_loss(mesh, axis, weight=float(xbm_cfg.weight),
                               memory_block_size=int(xbm_cfg.block_size) or None, **kwargs)

  def xbm_loss(emb, labels, mem, active, proxies):
    r = fn(emb, labels, mem, active)
    return r.total, {"batch_loss": r.batch, "memory_loss": r.memory}, r.new_memory

  return xbm_loss


def make_train_step(model: Model, tx, mesh, loss_cfg, xbm_cfg=None):
  """The jitted step ``(state, images uint8, labels) -> (state, outputs)``.

  ``outputs`` holds the replicated scalars ``loss`` and ``grad_norm`` (with a cross-batch
  memory, ``xbm_cfg``, also ``batch_loss`` and ``memory_loss``), and the batch's
  train-mode ``embeddings`` (the ones the loss saw), left sharded over the batch axis for
  the pair-weight telemetry, and with a proxy loss the ``proxies`` the loss saw. The state is donated and stays replicated, the memory
  included; images and labels are sharded over the batch axis.
  """
  loss_fn = _loss_fn(mesh, loss_cfg, xbm_cfg)
  proxy = losses.is_proxy(loss_cfg.name)

  def step(state, images, labels):
    x = transforms.normalize(images, model.convention, xp=jnp)
    mem = state.get("memory")
    # The memory joins at the step after `start_step` completed ones, as released.
    active = None if xbm_cfg is None else state["step"] >= int(xbm_cfg.start_step)

    def objective(params):
      net = _merge(model.train_graph, {**state, "params": params})
      emb = net(x)
      _, _, rest = nnx.split(net, nnx.Param, ...)
      loss, parts, new_mem = loss_fn(emb, labels, mem, active, params.get(PROXIES))
      return loss, (nnx.to_pure_dict(rest), emb, parts, new_mem)

    (loss, (rest, emb, parts, new_mem)), grads = jax.value_and_grad(
        objective, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new = {"params": params, "rest": rest, "opt_state": opt_state,
           "step": state["step"] + 1}
    if mem is not None:
      new["memory"] = new_mem
    out = {"loss": loss, **parts, "grad_norm": optax.tree.norm(grads), "embeddings": emb}
    if proxy:  # the proxies the loss saw, for the telemetry (the state's have moved on)
      out[PROXIES] = state["params"][PROXIES]
    return new, out

  repl = sharding.replicated(mesh)
  outputs = {"loss": repl, "grad_norm": repl, "embeddings": sharding.batch_sharded(mesh)}
  if xbm_cfg is not None:
    outputs.update(batch_loss=repl, memory_loss=repl)
  if proxy:
    outputs[PROXIES] = repl
  return jax.jit(step, donate_argnums=(0,), out_shardings=(repl, outputs))


@functools.lru_cache(maxsize=8)  # one compilation per model and mesh, not per evaluation
def make_embed_fn(model: Model, mesh):
  """``(state, images uint8) -> L2-normalised embeddings``, sharded over the batch."""
  @functools.partial(jax.jit, out_shardings=sharding.batch_sharded(mesh))
  def embed(state, images):
    x = transforms.normalize(images, model.convention, xp=jnp)
    return _merge(model.eval_graph, state)(x).astype(jnp.float32)
  return embed


def step_memory(step_fn, state, images, labels) -> dict:
  """The compiled step's memory analysis (bytes per device): temporaries and arguments."""
  compiled = step_fn.lower(state, images, labels).compile()
  m = compiled.memory_analysis()
  return {"temp_bytes": int(m.temp_size_in_bytes),
          "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes)}




# ---------------------------------------------------------------------------- checkpoints


def flat_tree(tree) -> dict:
  """``tree`` as ``{"params.backbone.convs.0.kernel": leaf, ...}``: string keys only, so
  any checkpoint format stores it, and a mismatch names the parameter."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    key = ".".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
                   for p in path)
    flat[key] = leaf
  return flat


def unflat_tree(flat: dict, template):
  """Inverse of ``flat_tree`` given a tree of the same structure."""
  leaves = [flat[k] for k in flat_tree(template)]
  return jax.tree.unflatten(jax.tree.structure(template), leaves)


# ---------------------------------------------------------------------------- the loop


def _eval_splits(dataset: records.Dataset, split: str):
  if split == "val":
    return dataset.val, None
  return dataset.test, dataset.gallery


def evaluate_model(config, model: Model, state, dataset, mesh, *, split=None, title=None,
                   json_path=None, extra=None):
  """Recall@K, P@1, R-Precision, MAP@R (and NMI) of ``state`` on an evaluation split."""
  from msjax import data as data_lib
  split = split or config.eval.split
  queries, gallery = _eval_splits(dataset, split)
  embed = make_embed_fn(model, mesh)
  ks = tuple(config.eval.ks) or evaluate_lib.DATASET_KS.get(config.data.dataset, (1, 2, 4, 8))

  def batches(s):
    return (data_lib.to_global(b, mesh) for b in data_lib.eval_batches(s, config.data))

  return evaluate_lib.evaluate(
      lambda images: embed(state, images), batches(queries),
      batches(gallery) if gallery is not None else None, ks=ks, nmi=config.eval.nmi,
      json_path=json_path, extra=extra, title=title, print_fn=print)


def _scalars(prefix: str, metrics: dict) -> dict:
  return {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, float)}


def _count(n: int, singular: str, plural: str | None = None) -> str:
  return f"{n} {singular if n == 1 else plural or singular + 's'}"


def _setup(config, workdir, *, training: bool, load_data: bool = True):
  """Checks, then builds what training and evaluation share. ``load_data=False`` (using
  a trained model on other images) leaves the dataset out: ``None``."""
  from etils import epath

  from msjax import checkpoint as checkpoint_lib
  from msjax import data as data_lib
  config = config.copy_and_resolve_references()  # the model below reads this copy
  if not training:  # the checkpoint holds every weight: no pretrained file to load
    config.model.pretrained = ""
  mesh = sharding.make_mesh()
  check_config(config, jax.device_count(), jax.process_count())
  dataset = data_lib.load_dataset(config.data) if load_data else None
  # Fetched on first use, before anything is compiled; from here on the file's path, so
  # building the model does not look the name up (or read a pinned file's hash) again.
  config.model.pretrained = str(resolve_pretrained(config) or "")
  if training:
    data_lib.check_small_classes(dataset.train, config.data)
  tx = build_optimizer(config.optim, config.train.num_steps,
                       proxies=losses.is_proxy(config.loss.name))
  workdir = epath.Path(workdir)
  # Evaluating only reads: a run may be training in this workdir right now, and a
  # writable manager would clean up the temporary directory of its save in progress.
  ckpt = checkpoint_lib.Checkpointer(
      workdir / "checkpoints", max_to_keep=config.train.keep_checkpoints,
      best_metric=f"{config.eval.split}/{config.eval.best_metric}", read_only=not training)
  num_proxies = None
  if losses.is_proxy(config.loss.name):
    # One proxy per training class; without the data, as many as the checkpoint holds.
    if dataset is not None:
      num_proxies = dataset.train.num_classes
    else:
      shape = ckpt.saved_shape(f"params.{PROXIES}")
      if shape is None:
        ckpt.close()
        raise ConfigError(
            f"config.loss.name={config.loss.name!r} trains class proxies, but "
            f"{workdir / 'checkpoints'} holds none to size them by; load the run's "
            "data (config.data.root) or pass the workdir of a trained proxy-loss run.")
      num_proxies = shape[0]
  model, state = init_state(config, tx, mesh, seed=config.seed, num_proxies=num_proxies)
  return mesh, dataset, tx, model, state, workdir, ckpt


def _restore(ckpt, state, step=None):
  """``(state, data_state)`` from checkpoint ``step`` (default: the latest)."""
  template = flat_tree(state)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template)
  from msjax import checkpoint as checkpoint_lib
  try:
    restored, data_state, _ = ckpt.restore(step, abstract_state=abstract)
  except checkpoint_lib.CheckpointError as e:
    leaf = e.leaf.split(".") if e.leaf else []
    if PROXIES in leaf:
      raise checkpoint_lib.CheckpointError(
          f"{e} The difference is in a proxy loss's class proxies: resume with the "
          "config.loss.name of the run that saved it, on the same training classes "
          "(its config.json is in the workdir).") from None
    if leaf[:1] != ["memory"]:
      raise
    raise checkpoint_lib.CheckpointError(
        f"{e} The difference is in the cross-batch memory: resume with the "
        "config.xbm.enabled, config.xbm.size and config.xbm.dtype (and "
        "config.model.embedding_dim) of the run that saved it (its config.json is in "
        "the workdir).") from None
  return unflat_tree(restored, state), data_state


def evaluate_workdir(config, workdir: str) -> dict:
  """Evaluates the workdir's latest checkpoint; writes ``<workdir>/eval_metrics.json``."""
  mesh, dataset, _, model, state, workdir, ckpt = _setup(config, workdir, training=False)
  try:
    if ckpt.latest_step() is None:
      raise ConfigError(f"{workdir} has no checkpoint to evaluate; train first "
                        f"(python -m msjax.main --config ... --workdir {workdir}).")
    state, _ = _restore(ckpt, state)
    step = int(jax.device_get(state["step"]))
    return evaluate_model(config, model, state, dataset, mesh, title=f"step {step}",
                          json_path=workdir / "eval_metrics.json", extra={"step": step})
  finally:
    ckpt.close()


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the
  final metrics (also written to ``<workdir>/final_metrics.json``)."""
  from msjax import metric_writers

  mesh, dataset, tx, model, state, workdir, ckpt = _setup(config, workdir, training=True)
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    n, batch = jax.device_count(), config.data.classes_per_batch * config.data.images_per_class
    print(f"{_count(jax.process_count(), 'process', 'processes')}, "
          f"{_count(n, jax.devices()[0].platform + ' device')}; global batch {batch} "
          f"({batch // n} per device); workdir {workdir}")
    print(describe_start(config))
    if xbm_enabled(config):
      x = config.xbm
      print(f"Cross-batch memory: {x.size:,} {x.dtype} entries, weight {x.weight}, from "
            f"step {x.start_step + 1}.")
    if PROXIES in state["params"]:
      c, dim = state["params"][PROXIES].shape
      print(f"{config.loss.name}: {c:,} class proxies of dimension {dim}, learning rate "
            f"×{config.optim.proxy_lr_mult:g}, weight decay "
            f"{config.optim.proxy_weight_decay:g}.")
  xbm_cfg = config.xbm if xbm_enabled(config) else None
  step_fn = make_train_step(model, tx, mesh, config.loss, xbm_cfg)
  telemetry_fns = {}
  if config.train.telemetry:
    args = (mesh, config.loss.name, loss_kwargs(config.loss))
    telemetry_fns["gpw"] = (telemetry.make_proxy_telemetry_fn(*args)
                            if losses.is_proxy(config.loss.name)
                            else telemetry.make_telemetry_fn(*args))
    if xbm_cfg is not None:
      telemetry_fns["gpw_memory"] = telemetry.make_memory_telemetry_fn(*args)
  with contextlib.ExitStack() as cleanup:  # closed in reverse, whatever happens
    cleanup.callback(ckpt.close)
    writer = cleanup.enter_context(metric_writers.MetricWriter(workdir))
    return _train_loop(config, workdir, mesh, dataset, model, state, step_fn, telemetry_fns,
                       ckpt, writer, cleanup)


def _telemetry(fns: dict, state, embeddings, labels, *, memory_joined: bool,
               proxies=None):
  """The GPW telemetry of a logged step: ``(scalars, histograms)`` under ``gpw/`` (batch
  pairs, or a proxy loss's sample-to-proxy pairs with the step's ``proxies``) and, once
  the cross-batch memory has joined, ``gpw_memory/`` (memory pairs)."""
  outputs = {}
  for prefix, fn in fns.items():
    if prefix == "gpw" and proxies is not None:
      outputs[prefix] = fn(embeddings, labels, proxies)
    elif prefix == "gpw":
      outputs[prefix] = fn(embeddings, labels)
    elif memory_joined:
      outputs[prefix] = fn(embeddings, labels, state["memory"])
  scalars, histograms = {}, {}
  for prefix, (gpw, hists) in jax.device_get(outputs).items():
    scalars.update({f"{prefix}/{k}": float(v) for k, v in gpw.items()})
    histograms.update({f"{prefix}/{k}": (telemetry.histogram_edges(k), v)
                       for k, v in hists.items()})
  return scalars, histograms


def _train_loop(config, workdir, mesh, dataset, model, state, step_fn, telemetry_fns, ckpt,
                writer, cleanup) -> dict:
  """Resume, baselines, the steps, the final evaluation; ``cleanup`` closes what it opens."""
  from msjax import checkpoint as checkpoint_lib
  from msjax import data as data_lib
  from msjax import metric_writers

  t = config.train
  start, data_state = 0, None
  if ckpt.latest_step() is not None:
    state, data_state = _restore(ckpt, state)
    start = int(jax.device_get(state["step"]))
    print(f"Resuming {workdir} at step {start}.")

  # The input resumes from the checkpointed iterator state, or (a checkpoint without
  # one) from the step: the batches are the same either way.
  batches = data_lib.GlobalBatches(
      data_lib.train_batches(dataset.train, config.data, seed=config.seed,
                             num_steps=t.num_steps,
                             start_step=start if data_state is None else 0), mesh)
  cleanup.callback(batches.close)
  if data_state is not None:
    batches.set_state(data_state)

  writer.write_text(start, "config", f"```json\n{config.to_json_best_effort(indent=2)}\n```")
  baselines = {}
  if t.eval_untrained and start == 0:
    baselines["untrained network"] = evaluate_model(config, model, state, dataset, mesh,
                                                    title="untrained")
    writer.write_scalars(0, _scalars("untrained", baselines["untrained network"]))
  if config.data.dataset == "synthetic" and start == 0:
    from msjax.data import synthetic
    queries, _ = _eval_splits(dataset, config.eval.split)
    baselines["raw pixels"] = synthetic.raw_pixel_recall(queries, ks=(1,))
  watcher = cleanup.enter_context(checkpoint_lib.PreemptionWatcher())
  batch_size = config.data.classes_per_batch * config.data.images_per_class
  progress = metric_writers.Progress(t.num_steps, batch_size=batch_size)
  last_metrics: dict = {}
  step = start
  for step in range(start + 1, t.num_steps + 1):
    batch = next(batches)
    state, metrics = step_fn(state, batch["image"], batch["label"])
    embeddings = metrics.pop("embeddings")
    proxies = metrics.pop(PROXIES, None)
    log_now = step % t.log_every == 0 or step == t.num_steps
    saving = bool(t.checkpoint_every) and step % t.checkpoint_every == 0
    # At the last step there is nothing to resume: the run finishes instead. (Every
    # process evaluates the same condition, as the watcher's step agreement needs.)
    stopping = step < t.num_steps and (watcher.should_stop(step) or step == t.stop_at_step)
    if log_now or saving or stopping:
      # Fetching the loss waits for the step, so it is done only here: dispatch runs
      # ahead of the device in between, and a non-finite state is never saved.
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not np.isfinite(values["loss"]):
        raise FloatingPointError(
            f"the loss is {values['loss']} at step {step}; stopping without saving this "
            f"state (the last good checkpoint is step {ckpt.latest_step()}). Lower "
            "config.optim.lr, or check the data (python -m msjax.data check).")
    if log_now:
      progress.update(step, loss=values["loss"])
      scalars = {f"train/{k}": v for k, v in values.items()}
      gpw, histograms = _telemetry(
          telemetry_fns, state, embeddings, batch["label"],
          memory_joined=xbm_enabled(config) and step > config.xbm.start_step,
          proxies=proxies)
      scalars.update(gpw)
      writer.write_scalars(step, scalars)
      if histograms:
        writer.write_histograms(step, histograms)
    if t.eval_every and step % t.eval_every == 0 and step < t.num_steps:
      last_metrics = evaluate_model(config, model, state, dataset, mesh,
                                    title=f"step {step}")
      writer.write_scalars(step, _scalars(config.eval.split, last_metrics))
    if (saving and step < t.num_steps) or stopping:
      ckpt.save(step, flat_tree(state), data_state=batches.get_state(), force=stopping,
                metrics=_scalars(config.eval.split, last_metrics))
    if stopping:
      print(f"Stopping at step {step} (preemption or config.train.stop_at_step): "
            "checkpoint saved; the same command resumes.")
      ckpt.wait()
      return {"stopped_at": step}
  final = evaluate_model(config, model, state, dataset, mesh, title=f"final, step {step}",
                         json_path=workdir / "final_metrics.json", extra={"step": step})
  if baselines and jax.process_index() == 0:
    rows = [*baselines.items(), (f"trained ({step} steps)", final)]
    print("\n".join([f"Recall@1 on the held-out {config.eval.split} classes:"] +
                     [f"  {name:>24}: {100 * m['recall@1']:.1f}%" for name, m in rows]))
  writer.write_scalars(step, _scalars(config.eval.split, final))
  ckpt.save(step, flat_tree(state), data_state=batches.get_state(), force=True,
            metrics=_scalars(config.eval.split, final))
  ckpt.wait()
  return final
