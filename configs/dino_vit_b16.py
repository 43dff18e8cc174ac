"""DINO ViT-B/16 self-distillation on ImageNet-1k (vit_jax.recipes.dino_imagenet; facebookresearch/dino defaults).

Usage: --config=configs/dino_vit_b16.py[:EPOCHS[,boost]]  (default 100 epochs; 'boost': teacher temperature
0.04 -> 0.07 over 30 epochs). Published ViT-B/16 k-NN / linear: 76.1 / 78.2% (the released 400-epoch model).
Point --config.dataset.data_dir at a TFDS directory holding imagenet2012.
"""
from vit_jax import recipes


def get_config(arg: str = ''):
  parts = [p for p in arg.split(',') if p]
  epochs = int(parts[0]) if parts and parts[0].isdigit() else 100
  unknown = [p for p in parts if not p.isdigit() and p != 'boost']
  if unknown:
    raise ValueError(f"Unknown config argument(s) {unknown}; use EPOCHS and/or 'boost', e.g. '800,boost'.")
  return recipes.dino_imagenet('dino_vit_b16', epochs=epochs, teacher_temp_boost='boost' in parts)
