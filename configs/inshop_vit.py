"""In-Shop Clothes Retrieval with the MS loss on a DINO ViT-S/16 (384-d, 224 px, bfloat16).

  python -m msjax.main --config configs/inshop_vit.py --config.data.root=/data/inshop

Settings quoted from the HIER release's DINO ViT-S/16 In-Shop script (Kim et al., CVPR
2023): AdamW lr 5e-6 with the head at ×100, weight decay 1e-4, batch 180 = 90 items × 2
images, 150 epochs, the backbone frozen for the first 5; msjax.config.dino_vit_recipe
lists the rest and what is ours. 25,882 training images make 143 steps an epoch: 21,450
steps.
Numbers: msjax has not trained this recipe yet (no accelerator was available); the
Recall@1 it reaches is ours to measure.
On 8 devices the 180 images do not split: use --config.data.classes_per_batch=92.
"""

from msjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "inshop"
  c.data.eval_batch_size = 256
  return config_lib.dino_vit_recipe(c, train_images=25882, epochs=150, warmup_epochs=5,
                                    weight_decay=1e-4, head_lr_mult=100.0)
