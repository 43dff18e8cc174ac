"""Fine-tune an ImageNet-21k ViT on CIFAR-10 with the official ViT recipe (vit_jax.recipes.vit_finetune).

SGD momentum 0.9, batch 512, 500 warmup steps then cosine, clip 1.0, no weight decay, 384 px, new head.
Usage: --config=configs/finetune_cifar10.py[:MODEL] (default vit_b16; the official i21k .npz of vit_b16, vit_b32,
vit_l16, vit_l32, vit_h14 is the default init_from, gs://vit_models/imagenet21k/). Override the weights with
--config.init_from=PATH (official .npz, params.npz from vit_jax.convert, or a vit_jax workdir) and the lr with
--config.optimizer.lr (the paper sweeps 0.001, 0.003, 0.01, 0.03).
"""
from vit_jax import recipes


def get_config(model: str = 'vit_b16'):
  return recipes.vit_finetune('cifar10', model)
