"""Linear probe of an MAE-pretrained ViT-B/16 on ImageNet-1k (vit_jax.recipes.mae_linprobe): 68.0% published.

Frozen encoder; its class token after the final norm goes through BatchNorm without affine (eps 1e-6) and a linear
head. LARS lr 0.1 x 16384 / 256, no weight decay, 10 warmup epochs, 90 epochs, batch 16384.
Usage: --config=configs/mae_linprobe_imagenet.py --config.init_from=SOURCE (an MAE pretraining workdir, or a
`python -m vit_jax.convert --model vit_b16` directory of timm's vit_base_patch16_224.mae).
"""
from vit_jax import recipes


def get_config():
  return recipes.mae_linprobe('vit_b16')
