"""Cars-196 with the MS recipe (BN-Inception, 512-d, P×K = 16×5).

  python -m msjax.data check --config configs/cars.py --config.data.root=/data/cars196
  python -m msjax.main --config configs/cars.py --config.data.root=/data/cars196

Train on classes 1-98 (8,054 images), test on 99-196 (8,131), Recall@1/2/4/8/16/32.
The paper does not publish a Cars recipe: the CUB one is used, our choice.
"""

from msjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "cars"
  c.data.classes_per_batch = 16   # our choice: CUB's released 16 × 5
  c.data.images_per_class = 5
  c.model.backbone = "bninception"
  c.model.pretrained = "bninception_imagenet"  # fetched, checked and cached on first use
  c.model.embedding_dim = 512
  c.loss.update(name="ms", alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1)  # released values
  # Not published for Cars: the CUB schedule (3,000 steps, lr 3e-5, × 0.1 at 1,200 and
  # 2,400), our choice.
  return c
