"""Stanford Online Products with the MS recipe (BN-Inception, 512-d, batch 1,000).

  python -m msjax.data check --config configs/sop.py \
      --config.data.root=/data/Stanford_Online_Products
  python -m msjax.main --config configs/sop.py \
      --config.data.root=/data/Stanford_Online_Products

Train on 11,318 products (59,551 images), test on 11,316 (60,502), Recall@1/10/100/1000.
The batch of 1,000 splits over up to 8 devices; on 16 or more (a v4-32), use a batch
divisible by the device count, e.g. --config.data.classes_per_batch=208 (1,040 images).
"""

from msjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "sop"
  # The paper's supplement gives batch 1,000; the split into P × K is our choice.
  c.data.classes_per_batch = 200
  c.data.images_per_class = 5
  # Products have 2-12 images: smaller ones are drawn with replacement, as the released
  # sampler does.
  c.data.pad_small_classes = True
  c.data.eval_batch_size = 256
  c.model.backbone = "bninception"
  c.model.pretrained = "bninception_imagenet"  # fetched, checked and cached on first use
  c.model.embedding_dim = 512
  c.loss.update(name="ms", alpha=2.0, beta=40.0, lam=0.5, epsilon=0.1)  # released values
  # Not published beyond the batch: 12,000 steps (about 200 epochs of the 11,318 classes
  # at 200 classes a batch), lr 3e-5 × 0.1 at 6,000 and 9,000; our choice.
  c.train.num_steps = 12000
  c.optim.lr_steps = (6000, 9000)
  c.train.eval_every = 2000
  c.train.checkpoint_every = 1000
  return c
