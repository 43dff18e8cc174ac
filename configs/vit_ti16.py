"""ViT-Ti/16 on ImageNet-1k from scratch, AugReg recipe with the setting of its released i1k checkpoint
(light1 = RandAugment(2, 0), no mixup; wd 0.1; no dropout or stochastic depth).

Usage: --config=configs/vit_ti16.py[:EPOCHS] (default 300). Point --config.dataset.data_dir at imagenet2012.
"""
from vit_jax import recipes


def get_config(epochs: str = '300'):
  return recipes.augreg_imagenet('vit_ti16', epochs=int(epochs), aug='light1')
