"""The one definition of every config field, its default, and validation of user configs.

Experiment files in configs/ start from `base_config()` and change what they need, so a key that is not defined
here is a typo and gets an error naming it.
"""
from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with defaults for a small single-host run."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128            # Global batch, split over all devices and processes.
  c.total_steps = 1000
  c.log_every = 50
  c.eval_every = 500            # 0 disables periodic eval (the final eval always runs).
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  # Official .npz (local or gs://) whose weights initialise a fresh run; the head is re-initialised when the class
  # count differs and position embeddings are interpolated to the new resolution.
  c.init_from = ml_collections.config_dict.placeholder(str)
  # Numerics and memory (see README "Scaling out").
  c.dtype = 'float32'           # Compute dtype: 'float32' | 'bfloat16' | 'float16'. Parameters stay float32; softmax,
                                # normalisation statistics and the loss are computed in float32 whatever this is.
  c.accum_steps = 1             # Gradient accumulation: batch_size is split into this many sequential micro-batches
                                # whose mean gradient makes one update (the same update as the whole batch at once).
  c.remat = 'none'              # Activation rematerialisation of each block: 'none' | 'full' | a
                                # jax.checkpoint_policies name, e.g. 'dots_with_no_batch_dims_saveable'.
  c.scan_layers = False         # nn.scan over the ViT encoder blocks (one compiled block: faster compiles of deep
                                # models); params are then stacked as Transformer/encoderblock/* (big_vision layout).
  # Logical axis -> mesh axes rules, e.g. (('batch', ('data', 'fsdp')), ('embed', 'fsdp'), ('mlp', 'tensor'), ...).
  # None: vit_jax.sharding.DEFAULT_RULES (FSDP on 'embed', Megatron on 'heads'/'mlp'; strategy then follows mesh.*).
  c.sharding_rules = ml_collections.config_dict.placeholder(tuple)

  c.model = ml_collections.ConfigDict()
  c.model.name = 'vit_pico'
  # Other model.* keys override the registered hyperparameters (e.g. model.drop_path_rate); create_model checks them.

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = 'digits'       # Any TFDS name ('cifar10', 'imagenet2012', ...) or a vit_jax builder ('digits').
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS default (~/tensorflow_datasets).
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.image_size = 224
  c.dataset.train_crop = 'inception'  # 'inception' | 'pad_and_crop' | 'resize'
  c.dataset.crop_padding = 4          # Pixels of padding for 'pad_and_crop'.
  c.dataset.flip = True
  c.dataset.eval_crop_fraction = 0.875  # Resize to image_size / fraction, then centre crop; 1.0: plain resize.
  c.dataset.shuffle_buffer = 10_000
  c.dataset.cache = False             # Cache decoded train examples in memory (small datasets).

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'        # 'adamw' | 'sgd'
  c.optimizer.lr = 1e-3             # Peak learning rate.
  c.optimizer.schedule = 'cosine'   # 'cosine' | 'linear' | 'constant' | 'rsqrt' (after warmup).
  # 'constant' and 'rsqrt' only: linear cooldown to 0 over the last cooldown_steps (Zhai et al. 2021); 0: none.
  c.optimizer.cooldown_steps = 0
  c.optimizer.rsqrt_timescale = 10_000  # 'rsqrt': lr * sqrt(timescale / (step - warmup + timescale)).
  c.optimizer.warmup_steps = 100
  c.optimizer.end_lr_factor = 0.0   # Final lr = lr * end_lr_factor.
  c.optimizer.weight_decay = 0.0    # Decoupled; never applied to biases, norms, position embeddings, cls tokens.
  c.optimizer.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
  c.optimizer.b1 = 0.9              # AdamW beta1, or SGD momentum.
  c.optimizer.b2 = 0.999            # AdamW beta2.
  c.optimizer.mu_dtype = ml_collections.config_dict.placeholder(str)  # First-moment (momentum) dtype, e.g.
                                    # 'bfloat16' to halve its memory; None: the parameters' float32.

  c.mesh = ml_collections.ConfigDict()
  # Devices per mesh axis (the product must be the device count; one axis may be -1 = the rest). Batches split over
  # data x fsdp; 'fsdp' also splits parameters and optimizer state; 'tensor' splits attention heads and MLP hidden.
  c.mesh.data = -1                  # Pure data parallel.
  c.mesh.fsdp = 1                   # Fully sharded data parallel (ZeRO-3).
  c.mesh.tensor = 1                 # Megatron tensor parallel (needs num_heads and mlp_dim divisible by it).
  # With several hosts (processes) or TPU slices: how many of them each axis spans (product = their count; one may be
  # -1). The rest of each axis stays inside a host/slice on fast links. Default: hosts/slices split the batch only.
  c.mesh.dcn_data = -1
  c.mesh.dcn_fsdp = 1
  c.mesh.dcn_tensor = 1
  return c


DTYPES = ('float32', 'bfloat16', 'float16')

# Sub-configs whose keys are open: model.* are hyperparameter overrides that create_model checks by name.
_OPEN_SECTIONS = ('model',)


def _unknown_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> list[str]:
  unknown = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    if key not in schema:
      unknown.append(path)
    elif isinstance(value, ml_collections.ConfigDict) and path not in _OPEN_SECTIONS:
      unknown.extend(_unknown_keys(value, schema[key], f'{path}.'))
  return unknown


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming each bad key and its fix, before anything is built or compiled."""
  schema = base_config()
  unknown = _unknown_keys(config, schema, '')
  if unknown:
    known = sorted(k for k in schema.keys())
    raise ValueError(f'Unknown config key(s): {", ".join(unknown)}. Fix the spelling; the top-level keys are '
                     f'{known} (see vit_jax/config_schema.py for every field).')
  if 'name' not in config.model:
    raise ValueError('config.model.name is missing; set it to a registered model (vit_jax.models.list_models()).')
  positive = ('batch_size', 'total_steps', 'log_every', 'checkpoint_every', 'keep_checkpoints')
  for key in positive:
    if config[key] <= 0:
      raise ValueError(f'config.{key}={config[key]} must be positive.')
  if config.eval_every < 0:
    raise ValueError(f'config.eval_every={config.eval_every} must be >= 0 (0 disables periodic eval).')
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype={config.dtype!r} is not supported; choose one of {DTYPES}.')
  if config.accum_steps < 1:
    raise ValueError(f'config.accum_steps={config.accum_steps} must be >= 1 (1: no accumulation).')
  if config.optimizer.warmup_steps > config.total_steps:
    raise ValueError(f'config.optimizer.warmup_steps={config.optimizer.warmup_steps} exceeds '
                     f'config.total_steps={config.total_steps}; lower the warmup or train longer.')
