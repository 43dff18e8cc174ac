"""Fine-tune an MAE-pretrained ViT-B/16 on ImageNet-1k, the published recipe (vit_jax.recipes.mae_finetune): 83.6%.

Head: mean of the patch tokens, then fc_norm (classifier='gap_fc_norm'); layer decay 0.65, AdamW lr 5e-4 x 1024 /
256, wd 0.05, drop path 0.1, RandAugment m9, random erasing 0.25, mixup 0.8, cutmix 1.0, label smoothing 0.1,
5 warmup epochs, 100 epochs, batch 1024.
Usage: --config=configs/mae_finetune_imagenet.py --config.init_from=SOURCE, SOURCE = an MAE pretraining workdir
(configs/mae_vit_b16.py), or DIR from
  python -m vit_jax.convert --model vit_b16 --src vit_base_patch16_224.mae.safetensors --out DIR
(timm's encoder-only MAE weights).
"""
from vit_jax import recipes


def get_config():
  return recipes.mae_finetune('vit_b16')
