"""CUB-200-2011 with the Proxy-Anchor recipe (Kim et al., CVPR 2020): BN-Inception, 512-d.

  python -m msjax.main --config configs/cub_proxy_anchor.py \
      --config.data.root=/data/CUB_200_2011

Quoted from the authors' release (tjddus9597/Proxy-Anchor-CVPR2020, its README's CUB
command and train.py's defaults): Proxy-Anchor loss with α = 32, δ = 0.1 and one proxy per
training class initialised N(0, 2/C); AdamW, lr 1e-4, weight decay 1e-4 on every group,
the proxies at ×100 the learning rate; gradients clipped to ±10 elementwise; batches of
180 shuffled images (no P×K structure); 60 epochs, lr × 0.5 every 10; the first epoch
trains only the embedding layer and the proxies; BatchNorm frozen; the embedding on the
sum of global average and max pooling; RandomResizedCrop(224) with torchvision's scale
(0.08, 1) and a flip; eval resize 256, center crop 224. CUB's 5,864 training images make
32 batches an epoch (the last partial one dropped), so epochs become steps below.

The paper reports Recall@1/2/4/8 of 68.4/79.2/86.8/91.6 (Table 1, BN-Inception, 512-d);
the release keeps the epoch with the best test Recall@1, msjax reports the last step
(set config.eval.split='val' with config.data.val_fraction for a held-out choice).
On 8 devices the 180 images do not split: use 184 (--config.data.classes_per_batch=46
--config.data.images_per_class=4; the sampler ignores the split into P and K).
Ours, not theirs: msjax resizes the short side to 256 before the random crop (theirs crops
the original image: the same geometry at another source resolution), and the step at
which lr decays is counted in batches.
"""

from msjax import config as config_lib

STEPS_PER_EPOCH = 32  # 5,864 images // 180


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "cub"
  c.data.sampler = "random"
  c.data.classes_per_batch = 36   # the batch is 36 × 5 = 180 images, drawn at random
  c.data.images_per_class = 5
  c.data.image_size = 224
  c.data.resize_to = 256
  c.data.crop_scale = (0.08, 1.0)
  c.model.backbone = "bninception"
  c.model.pretrained = "bninception_imagenet"  # fetched, checked and cached on first use
  c.model.embedding_dim = 512
  c.model.pooling = "avg+max"
  c.model.frozen_bn = True
  c.loss.name = "proxy_anchor"
  c.loss.proxy_anchor.update(alpha=32.0, delta=0.1)
  c.optim.update(name="adamw", lr=1e-4, weight_decay=1e-4, proxy_lr_mult=100.0,
                 proxy_weight_decay=1e-4, clip_value=10.0,
                 frozen_backbone_steps=STEPS_PER_EPOCH,
                 lr_steps=tuple(STEPS_PER_EPOCH * e for e in range(10, 60, 10)),
                 lr_decay=0.5)
  c.train.update(num_steps=60 * STEPS_PER_EPOCH, eval_every=10 * STEPS_PER_EPOCH,
                 checkpoint_every=10 * STEPS_PER_EPOCH)
  return c
