"""ViT-L/16: ImageNet-1k from scratch (AugReg), or ImageNet-21k pretraining (AugReg).

Usage: --config=configs/vit_l16.py[:VARIANT]
  '' or EPOCHS  ImageNet-1k, 300 epochs by default: strong2 (RandAugment(2, 20) + mixup 0.8), wd 0.1, dropout 0.1,
                stochastic depth 0.1 (B/16's released i1k setting; ViT-L/16 overfits i1k at least as much).
  i21k          ImageNet-21k pretraining as the released L/16 i21k checkpoint: medium1 (RandAugment(2, 15) + mixup
                0.2), wd 0.1, dropout 0.1, stochastic depth 0.1, batch 4096, 300 epochs. Needs a TFDS `imagenet21k`
                in --config.dataset.data_dir (not downloadable through TFDS); the first 51,200 images are held out.
"""
from vit_jax import recipes


def get_config(variant: str = '300'):
  if variant == 'i21k':
    return recipes.augreg_imagenet21k('vit_l16')
  return recipes.augreg_imagenet('vit_l16', epochs=int(variant), aug='strong2', dropout=0.1, drop_path=0.1)
