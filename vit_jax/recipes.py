"""Published training recipes as config builders, so experiment files stay a few lines each."""
from __future__ import annotations

import ml_collections

from vit_jax.config_schema import base_config

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def augreg_imagenet(model_name: str, *, epochs: int = 300, batch_size: int = 4096) -> ml_collections.ConfigDict:
  """ImageNet-1k from scratch after "How to train your ViT" (AugReg): Adam(0.9, 0.999), lr 1e-3, wd 0.1,
  10k warmup steps, cosine decay, 224 px inception crop + flip, global-norm clip 1.0."""
  config = base_config()
  config.model.name = model_name
  config.dataset.name = 'imagenet2012'
  config.dataset.train_split = 'train'
  config.dataset.eval_split = 'validation'
  config.dataset.image_size = 224
  config.dataset.train_crop = 'inception'
  config.dataset.flip = True
  config.dataset.eval_crop_fraction = 0.875
  config.dataset.shuffle_buffer = 250_000
  config.batch_size = batch_size
  config.total_steps = epochs * IMAGENET_TRAIN_EXAMPLES // batch_size
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 1000
  config.optimizer.name = 'adamw'
  config.optimizer.lr = 1e-3
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.weight_decay = 0.1
  config.optimizer.warmup_steps = 10_000
  config.optimizer.schedule = 'cosine'
  config.optimizer.grad_clip_norm = 1.0
  return config
