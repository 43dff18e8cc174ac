"""DINO on the offline digits (8x8 upsampled to 16 px global and 8 px local views), a tiny ViT: seconds on a CPU.

The DINO task end to end (multi-crop input, teacher EMA, centring, schedules) at toy scale, for tests and for
trying the objective; not a recipe. The ImageNet recipes are configs/dino_vit_s16.py and dino_vit_b16.py.
"""
from vit_jax.config_schema import base_config


def get_config():
  config = base_config()
  config.task.name = 'dino'
  config.model.name = 'dino_vit_s16'
  config.model.update(patch_size=4, hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64, out_dim=256,
                      head_hidden_dim=64, head_bottleneck_dim=32, drop_path_rate=0.1)
  config.dataset.update(name='digits', image_size=16, train_crop='multicrop', local_crops=2, local_image_size=8,
                        global_crop_scale=(0.4, 1.0), local_crop_scale=(0.05, 0.4), shuffle_buffer=2000,
                        cache=True, blur_sigma=(0.01, 0.15))  # DINO's 0.1-2 px at 224 px, scaled to 16 px.
  config.batch_size = 64
  config.total_steps = 400
  config.log_every = 50
  config.eval_every = 0
  config.checkpoint_every = 100
  config.optimizer.update(name='adamw', lr=1e-3, warmup_steps=40, weight_decay=0.04, weight_decay_end=0.4,
                          grad_clip_norm=0.0)
  config.task.dino.update(teacher_temp=0.04, momentum_teacher=0.99, freeze_last_layer_epochs=1, clip_grad=3.0)
  return config
