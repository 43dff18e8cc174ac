"""ViViT (model 1, a tiny `vivit_pico`) on the offline moving digits: which way does the digit move? Minutes on a CPU.

8 frames (every 2nd of 16) of 16 px, 4x4 patches with tubelet 2: 4 x 16 = 64 tokens + class. The label needs time
(vit_jax/datasets/moving_digits.py), so this is the smoke test that a video model sees motion; experiments/
video_digits.py compares it with a frame-averaged image ViT of the same size. Variants: the config argument picks
the registry model, e.g. `--config=configs/vivit_digits.py:timesformer_pico` or `:vit_frames_pico`.
"""
from vit_jax.config_schema import base_config


def get_config(arg: str = 'vivit_pico'):
  config = base_config()
  config.model.name = arg or 'vivit_pico'
  config.model.num_frames = 8
  config.dataset.update(name='moving_digits', modality='video', image_size=16, train_crop='resize', flip=False,
                        eval_crop_fraction=1.0, shuffle_buffer=3000, cache=True)
  config.dataset.video.update(num_frames=8, frame_stride=2)
  config.batch_size = 64
  config.total_steps = 600
  config.log_every = 100
  config.eval_every = 300
  config.checkpoint_every = 300
  config.optimizer.update(name='adamw', lr=1e-3, warmup_steps=60, weight_decay=0.05, grad_clip_norm=1.0)
  return config
