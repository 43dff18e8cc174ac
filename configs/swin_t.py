"""Swin-T on ImageNet-1k, the published 300-epoch recipe (vit_jax.recipes.swin_imagenet): 81.2% top-1.

AdamW lr 1e-3 at batch 1024, wd 0.05, 20 warmup epochs, cosine, stochastic depth 0.2, RandAugment(2, 9), mixup 0.8,
cutmix 1.0, label smoothing 0.1, random erasing 0.25, clip 5.0.
Usage: --config=configs/swin_t.py[:EPOCHS]; point --config.dataset.data_dir at a TFDS dir holding imagenet2012.
"""
from vit_jax import recipes


def get_config(epochs: str = '300'):
  return recipes.swin_imagenet('swin_t', drop_path=0.2, epochs=int(epochs))
