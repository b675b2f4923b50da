"""CUB-200-2011 with the released MS recipe (BN-Inception, 512-d, P×K = 16×5).

Check the data, then train:

  python -m msjax.data check --config configs/cub.py --config.data.root=/data/CUB_200_2011
  python -m msjax.main --config configs/cub.py --config.data.root=/data/CUB_200_2011

Train on classes 1-100 (5,864 images), test on 101-200 (5,924), Recall@1/2/4/8/16/32.
"""

from msjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "cub"
  c.data.classes_per_batch = 16   # released: 80 = 16 classes × 5 images
  c.data.images_per_class = 5
  c.model.backbone = "bninception"
  c.model.pretrained = "bninception_imagenet"  # fetched, checked and cached on first use
  c.model.embedding_dim = 512
  c.model.frozen_bn = True
  c.loss.update(name="ms", alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1)  # released values
  # The released recipe: Adam lr 3e-5, weight decay 5e-4, 3,000 steps, lr × 0.1 at 1,200
  # and 2,400 (config.optim and config.train defaults). Evaluation every 500 steps is ours.
  return c
