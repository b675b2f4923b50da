"""Stanford Online Products with the MS loss on a DINO ViT-S/16 (384-d, 224 px, bfloat16).

  python -m msjax.main --config configs/sop_vit.py \
      --config.data.root=/data/Stanford_Online_Products

Settings quoted from the HIER release's DINO ViT-S/16 SOP script (Kim et al., CVPR 2023):
AdamW lr 5e-6 with the head at ×100, weight decay 1e-4, batch 180 = 90 products × 2
images, 150 epochs, the backbone frozen for the first 5; msjax.config.dino_vit_recipe
lists the rest and what is ours. 59,551 training images make 330 steps an epoch: 49,500
steps.
Numbers: the DINO ViT-S/16 results in the HIER and Hyp-ViT (Ermolov et al., CVPR 2022)
papers are for their own losses on hyperbolic embeddings, not the MS loss, so msjax
quotes none as this recipe's target; msjax has not trained it yet (no accelerator was
available): the Recall@1 it reaches is ours to measure.
On 8 devices the 180 images do not split: use --config.data.classes_per_batch=92.
"""

from msjax import config as config_lib


def get_config():
  c = config_lib.base_config()
  c.data.dataset = "sop"
  c.data.eval_batch_size = 256
  return config_lib.dino_vit_recipe(c, train_images=59551, epochs=150, warmup_epochs=5,
                                    weight_decay=1e-4, head_lr_mult=100.0)
