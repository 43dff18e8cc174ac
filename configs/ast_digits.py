"""AST (a tiny `ast_pico`) on the offline synthetic sounds (vit_jax/datasets/synthetic_sounds.py): minutes on a CPU.

0.5 s at 8 kHz -> 32 mel bins x 64 frames (25 ms windows every 7.5 ms), 8x8 patches at stride 8: 4 x 8 patches +
class + distillation tokens. SpecAugment (2 frequency, 2 time masks) and mixup across clips, as AST trains.
"""
from vit_jax.config_schema import base_config


def get_config():
  config = base_config()
  config.model.name = 'ast_pico'
  config.model.time_frames = 64
  config.dataset.update(name='synthetic_sounds', modality='audio', image_size=32, shuffle_buffer=3200, cache=True)
  config.dataset.audio.update(frames=64, frame_length_ms=25.0, frame_step_ms=7.5, norm_mean=-6.0, norm_std=3.0,
                              freq_masks=2, freq_mask_width=4, time_masks=2, time_mask_width=8)
  config.mixup.mixup_alpha = 0.3
  config.batch_size = 64
  config.total_steps = 600
  config.log_every = 100
  config.eval_every = 300
  config.checkpoint_every = 300
  config.optimizer.update(name='adamw', lr=1e-3, warmup_steps=60, weight_decay=0.05, grad_clip_norm=1.0)
  return config
