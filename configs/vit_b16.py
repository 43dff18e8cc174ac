"""ViT-B/16 on ImageNet-1k from scratch, AugReg recipe with the setting of its released i1k checkpoint
(strong2 = RandAugment(2, 20) + mixup 0.8; wd 0.1; dropout 0.1; stochastic depth 0.1).

Usage: --config=configs/vit_b16.py[:EPOCHS] (default 300 epochs; e.g. :90 for the short schedule).
Point --config.dataset.data_dir at a TFDS directory (local or gs://) holding imagenet2012.
"""
from vit_jax import recipes


def get_config(epochs: str = '300'):
  return recipes.augreg_imagenet('vit_b16', epochs=int(epochs), aug='strong2', dropout=0.1, drop_path=0.1)
