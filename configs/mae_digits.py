"""A tiny MAE on the offline digits dataset (16 px, 4x4 patches: 16 tokens, 4 visible): the SSL smoke job.

Offline, on a CPU. The pretrained encoder initialises a classifier of the same widths (`vit_pico`: patch_size=4,
exact GELU) with --config.init_from=WORKDIR --config.model.classifier=gap_fc_norm (or 'token').
"""
from vit_jax import recipes


def get_config():
  config = recipes.mae_pretrain('mae_vit_b16', epochs=1, batch_size=128, warmup_epochs=0)
  config.model.update(dict(patch_size=4, hidden_size=64, num_layers=4, num_heads=4, mlp_dim=128,
                           decoder_hidden_size=32, decoder_num_layers=2, decoder_num_heads=4, decoder_mlp_dim=64))
  config.dataset.update(dict(name='digits', image_size=16, train_crop='pad_and_crop', crop_padding=2, flip=False,
                             eval_crop_fraction=1.0, shuffle_buffer=2000, cache=True, train_split='train',
                             eval_split='test'))
  config.total_steps = 800
  config.log_every = 100
  config.eval_every = 400
  config.checkpoint_every = 200
  config.optimizer.lr = 1.5e-3
  config.optimizer.warmup_steps = 100
  return config
