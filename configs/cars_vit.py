"""Cars-196 with the MS loss on a DINO ViT-S/16 (384-d, 224 px, bfloat16).

  python -m msjax.main --config configs/cars_vit.py --config.data.root=/data/cars196

Settings quoted from the HIER release's DINO ViT-S/16 Cars script (Kim et al., CVPR
2023): AdamW lr 5e-6, weight decay 1e-2, batch 180 = 90 classes × 2 images, 100 epochs,
the backbone frozen for the first; msjax.config.dino_vit_recipe lists the rest and what
is ours. 8,054 training images make 44 steps an epoch: 4,400 steps.
Numbers: msjax has not trained this recipe yet (no accelerator was available); the
Recall@1 it reaches is ours to measure.
On 8 devices the 180 images do not split: use --config.data.classes_per_batch=92.
"""

from msjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "cars"
  return config_lib.dino_vit_recipe(c, train_images=8054, epochs=100, warmup_epochs=1,
                                    weight_decay=1e-2)
