"""ViT-L/16 on ImageNet-1k from scratch, AugReg recipe (REFERENCE.md section 5).

Usage: --config=configs/vit_l16.py[:EPOCHS] (default 300 epochs; e.g. :90 for the short schedule).
Point --config.dataset.data_dir at a TFDS directory (local or gs://) holding imagenet2012.
"""
from vit_jax import recipes


def get_config(epochs: str = '300'):
  config = recipes.augreg_imagenet('vit_l16', epochs=int(epochs))
  config.model.dropout_rate = 0.1
  config.model.drop_path_rate = 0.1
  return config
