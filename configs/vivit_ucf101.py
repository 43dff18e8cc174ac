"""ViViT-B/16x2 (model 1) fine-tuned on UCF101 (TFDS `ucf101`, split 1) from an image ViT-B/16 checkpoint.

32 frames every 2nd frame at 224 px; the tubelet kernel is inflated from the image patch kernel (central frame,
vit_jax/models/vivit.py) and the position embedding tiled over time when config.init_from names an image ViT
(e.g. the official ViT-B/16 ImageNet-21k .npz). `ucf101` must be prepared in dataset.data_dir beforehand.
"""
from vit_jax.config_schema import base_config


def get_config():
  config = base_config()
  config.model.name = 'vivit_b16x2_st'
  config.model.update(num_frames=32, drop_path_rate=0.1)
  config.dataset.update(name='ucf101/ucf101_1_256', modality='video', image_size=224, train_crop='inception',
                        crop_min_area=0.3, flip=True, eval_crop_fraction=0.875, shuffle_buffer=1024)
  config.dataset.video.update(num_frames=32, frame_stride=2)
  config.mixup.mixup_alpha = 0.1
  config.label_smoothing = 0.1
  config.batch_size = 64
  config.total_steps = 10_000
  config.eval_every = 1000
  config.checkpoint_every = 1000
  config.optimizer.update(name='sgd', lr=0.05, b1=0.9, warmup_steps=500, grad_clip_norm=1.0)
  return config
