"""MAE pretraining of ViT-B/16 on ImageNet-1k, the published recipe (vit_jax.recipes.mae_pretrain).

Batch 4096, AdamW (0.9, 0.95) lr 1.5e-4 x 4096 / 256, wd 0.05, 40 warmup epochs then cosine, random resized crop
0.2-1 + flip, mask ratio 0.75, norm_pix_loss. Fine-tuned: 83.6% (configs/mae_finetune_imagenet.py); linear probe:
68.0% (configs/mae_linprobe_imagenet.py).
Usage: --config=configs/mae_vit_b16.py[:EPOCHS] (800 by default; the paper also trains 1600). Point
--config.dataset.data_dir at a TFDS directory holding imagenet2012.
"""
from vit_jax import recipes


def get_config(epochs: str = '800'):
  return recipes.mae_pretrain('mae_vit_b16', epochs=int(epochs))
