"""The run configuration: every field with its default, and the checks that run first.

``configs/<dataset>.py`` files start from ``base_config()`` and change what their recipe
needs; any field can be overridden on the command line
(``--config.data.root=/data/CUB``). Nothing below ``main.py`` reads flags: functions take
this ConfigDict or a slice of it.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

DATASETS = ("cub", "cars", "sop", "inshop", "folder", "synthetic")
BENCHMARKS = ("cub", "cars", "sop", "inshop")
FORMATS = ("files", "tfds")


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file such as ``configs/synthetic.py``."""
  spec = importlib.util.spec_from_file_location("msjax_config_file", os.fspath(path))
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"{path} is not a Python config file.")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def loss_defaults() -> dict:
  """``{name: {keyword: default}}`` of every registry loss but MS (whose hyper-parameters
  sit at the top of ``config.loss``), read from the loss functions' signatures."""
  from msjax import losses
  return {name: losses.hparam_defaults(name) for name in losses.ALL_NAMES if name != "ms"}


def base_config() -> ml_collections.ConfigDict:
  """Defaults: the released CUB-200 recipe of the MS paper (see configs/cub.py)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = d = ml_collections.ConfigDict()
  d.dataset = "cub"          # one of DATASETS
  d.format = "files"         # benchmarks: "files" (the real layout) or "tfds"
  d.root = ""                # the dataset's directory; with format="tfds", the TFDS data_dir
  d.val_fraction = 0.0       # training classes held out for model selection (last ones)
  d.train_fraction = 0.5     # folder: the first fraction of classes (sorted) trains
  # The generated default (msjax.data.synthetic); its seed fixes the images, so every
  # run seed sees the same classes.
  d.synthetic = ml_collections.ConfigDict(dict(
      num_train_classes=128, num_test_classes=64, images_per_class=32, image_size=32,
      seed=0))
  # P×K batches: P classes × K images each. sampler="random" draws batches of the same
  # size P×K from shuffled images instead (proxy losses need no P×K structure).
  d.sampler = "pk"
  d.classes_per_batch = 16
  d.images_per_class = 5
  d.pad_small_classes = False  # classes with < K images: draw with replacement, or refuse
  # Train: resize short side -> RandomResizedCrop(image_size, crop_scale) -> flip.
  # Eval: resize short side -> center crop image_size.
  d.image_size = 227
  d.resize_to = 256
  d.crop_scale = (0.16, 1.0)
  d.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  d.flip = True
  d.single_resize = False    # True: one resample per image, ~1/3 faster, within a few levels
  d.eval_batch_size = 128
  d.num_workers = 2          # input worker processes per host
  d.num_threads = 2          # batches built concurrently per worker
  d.prefetch = 2             # batches buffered per worker

  c.model = m = ml_collections.ConfigDict()
  m.backbone = "bninception"
  # A published checkpoint by name (msjax.models.pretrained.PUBLISHED: "bninception_imagenet",
  # "resnet50_imagenet", "vit_s16_dino", ...; downloaded, verified and converted on first
  # use), a converted .npz (python -m msjax.models.convert), or "" for random weights.
  m.pretrained = ""
  m.weights_cache = ""       # where named weights are cached; "" = $MSJAX_WEIGHTS_CACHE or
                             # ~/.cache/msjax/weights (local or gs://)
  m.pretrained_sha256 = ""   # pins a named checkpoint's SHA-256 (where none is published)
  m.embedding_dim = 512
  m.pooling = ""             # "" = the backbone's default (max for BN-Inception)
  m.frozen_bn = True
  m.dtype = "float32"        # compute dtype: "bfloat16" on TPU/GPU
  m.remat = False            # ViT: recompute each block in the backward pass (less memory)

  c.loss = ml_collections.ConfigDict(dict(
      name="ms", alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1, mining=True, weighting="ms"))
  # Every other registry loss's keywords with their defaults, one section per loss:
  # --config.loss.name=circle --config.loss.circle.gamma=64.
  for name, kwargs in loss_defaults().items():
    c.loss[name] = ml_collections.ConfigDict(kwargs)
  # Overrides for the named loss (non-MS) on top of its section, as a config file sets.
  c.loss.other = ml_collections.ConfigDict()

  # Adam with PyTorch's weight decay (added to the gradient), or "adamw" (decoupled, as
  # PyTorch's AdamW); lr × lr_decay at lr_steps.
  c.optim = o = ml_collections.ConfigDict()
  o.name = "adam"
  o.lr = 3e-5
  o.weight_decay = 5e-4
  o.b1, o.b2, o.eps = 0.9, 0.999, 1e-8
  o.lr_steps = (1200, 2400)
  o.lr_decay = 0.1
  o.warmup_steps = 0
  o.backbone_lr_mult = 1.0
  o.head_lr_mult = 1.0
  # A proxy loss's class proxies are a parameter group of their own (Proxy-Anchor: ×100).
  o.proxy_lr_mult = 1.0
  o.proxy_weight_decay = 0.0
  o.clip_value = 0.0           # >0: clip every gradient element to ±clip_value (0: off)
  o.frozen_backbone_steps = 0  # the backbone waits this many steps; head and proxies train

  # Cross-batch memory (msjax.memory; docs/memory.md): after start_step steps, every step
  # adds weight · L(batch anchors, last `size` embeddings) to the batch loss.
  c.xbm = x = ml_collections.ConfigDict()
  x.enabled = False
  x.size = 55000              # entries M (the XBM paper's SOP size); ≥ the global batch
  x.weight = 1.0              # weight of the memory term
  x.start_step = 1000         # steps without the memory first (the embedding moves fast)
  x.dtype = "float32"         # stored embeddings: "float32" or "bfloat16" (half the bytes)
  x.block_size = 0            # anchors per row block of the memory term (0: one block);
                              # peak O(block_size × size) instead of O(B/n × size)

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 3000
  t.log_every = 20            # steps between logged metrics (loss, images/s, GPW summary)
  t.eval_every = 500          # steps between evaluations (0: only at the end)
  t.checkpoint_every = 500    # steps between checkpoints (0: only at the end)
  t.keep_checkpoints = 3      # the latest N, plus the best by config.eval.best_metric
  t.eval_untrained = False    # also evaluate before the first step
  t.telemetry = True          # GPW pair-weight summaries of the batch at each log step
  t.stop_at_step = 0          # >0: checkpoint and exit after this step (time-limited jobs);
                              # the same command resumes

  c.eval = e = ml_collections.ConfigDict()
  e.split = "test"            # "val" (model selection without test data) or "test"
  e.ks = ()                   # Recall@K list; () = the dataset's (evaluate.DATASET_KS)
  e.nmi = False
  e.best_metric = "recall@1"
  return c


def dino_vit_recipe(c: ml_collections.ConfigDict, *, train_images: int, epochs: int,
                    warmup_epochs: int, weight_decay: float, head_lr_mult: float = 1.0
                    ) -> ml_collections.ConfigDict:
  """The MS loss on a DINO ViT-S/16 (``configs/*_vit.py``), with the training settings of
  the HIER release's DINO ViT-S/16 scripts (Kim et al., CVPR 2023,
  tjddus9597/HIER-CVPR23 ``scripts/DINO/``): AdamW lr 5e-6 at batch 180 (90 classes × 2
  images), eps 1e-4, constant lr, gradients clipped to ±10 elementwise, the backbone
  frozen for the first ``warmup_epochs`` (their lr-0 warmup), 224-pixel crops of scale
  0.14–1 from a 256 resize, half precision. Epochs become steps of 180 images.

  Ours, not theirs: the MS loss with the MS paper's mining (ε = 0.1) and HIER's MS
  constants α = 2, β = 50, λ = 0.5 (their ``MSLoss_Angle`` has no mining); a 384-d
  embedding (the backbone's width; HIER's scripts train 128-d hyperbolic embeddings);
  weight decay on every parameter (theirs spares biases and norms); bfloat16 for their
  float16.
  """
  steps_per_epoch = train_images // 180
  c.data.sampler = "pk"
  c.data.classes_per_batch = 90
  c.data.images_per_class = 2
  c.data.pad_small_classes = True
  c.data.image_size = 224
  c.data.resize_to = 256
  c.data.crop_scale = (0.14, 1.0)
  c.model.backbone = "vit_s16"
  c.model.pretrained = "vit_s16_dino"  # fetched, checked and cached on first use
  c.model.embedding_dim = 384
  c.model.pooling = "cls"
  c.model.dtype = "bfloat16"
  c.loss.update(name="ms", alpha=2.0, beta=50.0, lam=0.5, epsilon=0.1, mining=True)
  c.optim.update(name="adamw", lr=5e-6, eps=1e-4, weight_decay=weight_decay, lr_steps=(),
                 clip_value=10.0, frozen_backbone_steps=warmup_epochs * steps_per_epoch,
                 head_lr_mult=head_lr_mult)
  every = max(1, epochs // 10) * steps_per_epoch
  c.train.update(num_steps=epochs * steps_per_epoch, eval_every=every,
                 checkpoint_every=every)
  return c


def check_data_config(d: ml_collections.ConfigDict):
  """Raises ``DataError`` naming the first inconsistent ``config.data`` field."""
  from msjax.data.records import DataError
  if d.dataset not in DATASETS:
    raise DataError(f"config.data.dataset={d.dataset!r} is not a dataset msjax knows; "
                    f"choose one of {DATASETS}.")
  if d.dataset in BENCHMARKS and d.format not in FORMATS:
    raise DataError(f"config.data.format={d.format!r}; choose one of {FORMATS}.")
  if d.dataset != "synthetic" and not d.root:
    where = "the TFDS data_dir" if d.format == "tfds" else "the dataset's directory"
    raise DataError(f"config.data.root is empty; set it to {where}, e.g. "
                    f"--config.data.root=/data/{d.dataset}.")
  for field in ("classes_per_batch", "images_per_class", "eval_batch_size", "image_size"):
    if int(d[field]) < 1:
      raise DataError(f"config.data.{field}={d[field]} must be a positive integer.")
  if d.resize_to and d.resize_to < d.image_size:
    raise DataError(f"config.data.resize_to={d.resize_to} is smaller than "
                    f"config.data.image_size={d.image_size}; the eval center crop needs "
                    "resize_to ≥ image_size (or resize_to=0 to skip resizing).")
