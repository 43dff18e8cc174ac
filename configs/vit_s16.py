"""ViT-S/16 on ImageNet-1k from scratch.

Usage: --config=configs/vit_s16.py[:VARIANT]
  '' or EPOCHS  AugReg recipe, setting of the released i1k checkpoint (medium2 = RandAugment(2, 15) + mixup 0.5;
                wd 0.1; no dropout or stochastic depth), 300 epochs by default.
  bv90, bv300   big_vision "Better plain ViT baselines" (gap, sin-cos posemb, batch 1024, RandAugment(2, 10),
                mixup 0.2): 76.5% top-1 at 90 epochs, 79.8% at 300 epochs.
Point --config.dataset.data_dir at a TFDS directory holding imagenet2012.
"""
from vit_jax import recipes


def get_config(variant: str = '300'):
  if variant.startswith('bv'):
    return recipes.plain_vit_baseline('vit_s16', epochs=int(variant[2:]))
  return recipes.augreg_imagenet('vit_s16', epochs=int(variant), aug='medium2')
