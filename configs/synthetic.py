"""The embedded default: generated image classes, a small CNN, MS loss; no download.

  python -m msjax.data check --config configs/synthetic.py
  python -m msjax.main --config configs/synthetic.py

128 training and 64 held-out classes of 32×32 images (msjax.data.synthetic: a class is
a shape × hue × texture of the main object, under random pose, background, distractors
and colour casts). Raw-pixel Recall@1 on the held-out classes is about 9%; every number
here is our choice for a two-minute CPU run. Any registry loss trains on it:
--config.loss.name=circle (or supcon, proxy_anchor, ...), with its defaults or
--config.loss.circle.gamma=64; benchmarks/loss_table.py compares them all.
"""

from msjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "synthetic"
  c.data.classes_per_batch = 16
  c.data.images_per_class = 4
  # 32-px images, no resize; the crop is the whole image (a smaller one can cut the
  # object out), so the only augmentation is the flip (every shape is mirror-symmetric).
  c.data.image_size = 32
  c.data.resize_to = 0
  c.data.crop_scale = (1.0, 1.0)
  c.data.crop_ratio = (1.0, 1.0)
  c.data.eval_batch_size = 256
  c.data.num_workers = 0     # rendering is ~1 ms an image: threads in-process suffice
  c.model.backbone = "small_cnn"
  c.model.embedding_dim = 64
  c.model.frozen_bn = False
  c.loss.update(name="ms", alpha=2.0, beta=50.0, lam=0.5, epsilon=0.1)
  c.optim.update(lr=1e-3, weight_decay=0.0, lr_steps=())  # constant lr, no decay
  c.optim.proxy_lr_mult = 100.0  # a proxy loss's proxies, as the Proxy-Anchor recipe
  c.train.update(num_steps=400, log_every=50, eval_every=0, checkpoint_every=200,
                 eval_untrained=True)
  return c
