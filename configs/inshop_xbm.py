"""In-Shop Clothes Retrieval with a cross-batch memory: the XBM paper's recipe.

  python -m msjax.main --config configs/inshop_xbm.py --config.data.root=/data/inshop

Contrastive loss (margin 0.5) on the batch and, after 1,000 steps, on a memory of recent
embeddings with weight 1: Wang et al., "Cross-Batch Memory for Embedding Learning",
CVPR 2020, quote Recall@1 91.3 with ResNet-50 at 512-d. docs/memory.md explains the
memory and its telemetry.
"""

from msjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "inshop"
  # Quoted from the authors' released sample config: 64 images a batch, 4 per class,
  # ResNet-50, Adam at 1e-4 with weight decay 5e-4, images 224.
  c.data.classes_per_batch = 16
  c.data.images_per_class = 4
  c.data.pad_small_classes = True  # some items have fewer than 4 training images
  c.data.image_size = 224
  c.data.eval_batch_size = 256
  c.model.backbone = "resnet50"
  c.model.pretrained = "resnet50_imagenet"  # fetched, checked and cached on first use
  c.model.embedding_dim = 512
  c.loss.update(name="contrastive")
  c.loss.contrastive.lam = 0.5  # the released margin
  c.optim.update(lr=1e-4, weight_decay=5e-4)
  # Weight 1.0 and the start at 1,000 are the released values. The size is ours: the
  # released 55,000 is more than In-Shop's 25,882 training images, so the memory is
  # 25,600 (400 batches), most of one epoch.
  c.xbm.update(enabled=True, size=25600, weight=1.0, start_step=1000)
  # Ours, as in configs/sop_xbm.py: fixed steps instead of the plateau schedule.
  c.train.num_steps = 35000
  c.optim.lr_steps = (20000, 30000)
  c.train.eval_every = 5000
  c.train.checkpoint_every = 1000
  return c
