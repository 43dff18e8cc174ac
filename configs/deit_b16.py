"""DeiT-B/16 on ImageNet-1k, the published 300-epoch recipe (vit_jax.recipes.deit_imagenet): 81.8% top-1.

Usage: --config=configs/deit_b16.py            (no distillation)
       --config=configs/deit_b16.py:distilled  (distillation token + hard distillation, published 83.4% with a
       RegNetY-16GF teacher; set the teacher with --config.distill.model.name=NAME and its weights with
       --config.distill.init_from=PATH, e.g. a timm checkpoint converted by vit_jax.convert, or a vit_jax workdir)
Point --config.dataset.data_dir at a TFDS directory holding imagenet2012. Not implemented from the recipe:
repeated augmentation and RandAugment's magnitude noise (timm rand-m9-mstd0.5-inc1); see README.
"""
from vit_jax import recipes


def get_config(variant: str = ''):
  config = recipes.deit_imagenet('deit_b16')
  if variant == 'distilled':
    config = recipes.deit_distilled(config)
  elif variant:
    raise ValueError(f"Unknown variant {variant!r}; use '' or 'distilled'.")
  return config
