"""AST-B/16 on Speech Commands (TFDS `speech_commands`, 12 classes), from an image ViT/DeiT checkpoint.

1 s at 16 kHz -> 128 mel bins x 98 frames (25 ms every 10 ms) with the AST's SpecAugment (48 mel bins, 48 frames
for speech) and mixup; from config.init_from the RGB patch kernel is summed to one channel and the position grid
cut/interpolated to 12 x 9 (vit_jax/models/ast.py). `speech_commands` must be prepared in dataset.data_dir.
"""
from vit_jax.config_schema import base_config


def get_config():
  config = base_config()
  config.model.name = 'ast_b16'
  config.model.update(time_frames=98, drop_path_rate=0.1)
  config.dataset.update(name='speech_commands', modality='audio', image_size=128, shuffle_buffer=10_000,
                        eval_split='validation')
  config.dataset.audio.update(frames=98, frame_length_ms=25.0, frame_step_ms=10.0, freq_masks=1,
                              freq_mask_width=48, time_masks=1, time_mask_width=48)
  config.mixup.mixup_alpha = 0.6
  config.batch_size = 128
  config.total_steps = 30_000
  config.eval_every = 2000
  config.checkpoint_every = 2000
  config.optimizer.update(name='adamw', lr=2.5e-4, warmup_steps=1000, weight_decay=0.0, grad_clip_norm=1.0)
  return config
