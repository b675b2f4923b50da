"""In-Shop Clothes Retrieval with the MS recipe (BN-Inception, 512-d).

  python -m msjax.data check --config configs/inshop.py --config.data.root=/data/inshop
  python -m msjax.main --config configs/inshop.py --config.data.root=/data/inshop

``root`` holds ``Eval/list_eval_partition.txt`` and ``Img/``. Train on 3,997 items
(25,882 images); test 14,218 queries against a 12,612-image gallery (3,985 items),
Recall@1/10/20/30/40/50.
"""

from msjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "inshop"
  # Not published for In-Shop; our choice: 60 items × 4 images = 240.
  c.data.classes_per_batch = 60
  c.data.images_per_class = 4
  c.data.pad_small_classes = True  # some items have fewer than 4 training images
  c.data.eval_batch_size = 256
  c.model.backbone = "bninception"
  c.model.pretrained = "bninception_imagenet"  # fetched, checked and cached on first use
  c.model.embedding_dim = 512
  c.loss.update(name="ms", alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1)  # released values
  # Not published: 8,000 steps (about 120 epochs of the 3,997 items at 60 a batch), lr
  # 3e-5 × 0.1 at 4,000 and 6,000; our choice.
  c.train.num_steps = 8000
  c.optim.lr_steps = (4000, 6000)
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  return c
