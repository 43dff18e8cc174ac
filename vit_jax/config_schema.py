"""The one definition of every config field, its default, and validation of user configs.

Experiment files in configs/ start from `base_config()` and change what they need, so a key that is not defined
here is a typo and gets an error naming it.
"""
from __future__ import annotations

import math
from typing import Optional

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
  # A step whose loss or gradient norm is nan/inf: 'stop' raises an error naming the step (the last good checkpoint
  # stays); 'skip' keeps the previous params and optimizer state and counts the step (train_nonfinite_updates).
  c.on_nonfinite = 'stop'
  # Weights that initialise a fresh run (vit_jax/finetune.py): an official ViT .npz (local or gs://), a params.npz
  # from `python -m vit_jax.convert` (timm), or another run's workdir (its latest checkpoint's params). The head is
  # re-initialised when the class count differs; position embeddings are interpolated to the new resolution.
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
  c.init_reinit_head = False              # Re-initialise the head even when its shape matches the checkpoint's.
  c.init_posemb_interpolation = 'linear'  # 'linear' (official) | 'bilinear' | 'bicubic' (timm) | 'bicubic_torch'.
  c.ema_decay = 0.0               # EMA of the params (e.g. 0.9999), used for eval and checkpointed; 0 disables.
  c.label_smoothing = 0.0         # Targets (1 - s) * one_hot + s / num_classes (timm/DeiT convention).
  # Evaluators on frozen features run during training (vit_jax/evaluators): named entries, e.g.
  # c.evals.knn = dict(type='knn', every=100, k=20, temperature=0.07); each has a type ('knn' | 'linear_probe' |
  # 'fewshot'), every (steps; 0: only after the last step), train_split / eval_split (default: the dataset's) and
  # its own keys. Their scalars are logged as NAME/METRIC. Empty: none.
  c.evals = ml_collections.ConfigDict()
  # TensorBoard image 'attention_rollout' at each eval: attention rollout (vit_jax/attention_image.py) of the first
  # eval image, for token models with a patch grid (ViT, DeiT, MAE, DINO); other models have none. False: off.
  c.rollout_image = True

  # The training objective (vit_jax/tasks/): task.name picks it ('classification', 'mae', 'dino', ...); tasks with
  # fields of their own add a section task.<name> with its defaults (Task.config_defaults).
  c.task = _task_section()

  c.model = ml_collections.ConfigDict()
  c.model.name = 'vit_pico'
  # Other model.* keys override the registered hyperparameters (e.g. model.drop_path_rate); create_model checks them.

  c.dataset = ml_collections.ConfigDict()
  # Any TFDS name ('cifar10', 'imagenet2012', ...), a vit_jax builder ('digits'), or 'image_folder' for
  # dataset.folder.
  c.dataset.name = 'digits'
  # name='image_folder': a directory with one subdirectory per split (train/, val/, ...), each holding one
  # subdirectory of images per class. It is converted once into TFDS files under data_dir; unreadable images are
  # skipped and counted. Set train_split/eval_split to the split folder names (e.g. eval_split='val').
  c.dataset.folder = ml_collections.config_dict.placeholder(str)
  c.dataset.data_dir = ml_collections.config_dict.placeholder(str)  # None: TFDS default (~/tensorflow_datasets).
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'test'
  c.dataset.image_size = 224
  c.dataset.train_crop = 'inception'  # 'inception' | 'pad_and_crop' | 'resize' | 'multicrop' (DINO's views)
  # train_crop='multicrop' (vit_jax/augment.py dino_multicrop): 2 global views of image_size px and local_crops
  # local views of local_image_size px, random resized crops of these area ranges, with DINO's colour jitter, grey,
  # blur and solarisation.
  c.dataset.local_crops = 8
  c.dataset.local_image_size = 96
  c.dataset.global_crop_scale = (0.4, 1.0)
  c.dataset.local_crop_scale = (0.05, 0.4)
  # Gaussian-blur sigma range of the multi-crop views, in pixels of the view. DINO's (0.1, 2.0) is for 224 px global
  # and 96 px local views; on small images scale it with the image (e.g. x 32/224 at 32 px), or blur erases them.
  c.dataset.blur_sigma = (0.1, 2.0)
  c.dataset.crop_padding = 4          # Pixels of padding for 'pad_and_crop'.
  c.dataset.crop_min_area = 0.05      # 'inception': smallest crop, as a fraction of the image area (MAE: 0.2).
  c.dataset.flip = True
  c.dataset.eval_crop_fraction = 0.875  # Resize to image_size / fraction, then centre crop; 1.0: plain resize.
  c.dataset.shuffle_buffer = 10_000   # > 1: a fresh global shuffle each epoch (nothing buffered); 1: stored order.
  c.dataset.cache = False             # Keep the encoded train records in memory (small datasets).
  c.dataset.randaugment_layers = 0    # RandAugment N (ops per image; vit_jax/augment.py); 0 disables.
  c.dataset.randaugment_magnitude = 10.0  # RandAugment M (10 = the reference's maximum level; may exceed it).
  c.dataset.random_erasing = 0.0      # Probability of timm/DeiT random erasing (one box, 2%..1/3 of the area).
  # 'image', or 'video' / 'audio' (vit_jax/video_audio_pipeline.py: the dataset's 'video' / 'audio' feature; for
  # video image_size is the frame size, for audio the number of mel bins).
  c.dataset.modality = 'image'
  c.dataset.video = ml_collections.ConfigDict()
  c.dataset.video.num_frames = 8      # Frames per clip given to the model.
  c.dataset.video.frame_stride = 2    # Take every frame_stride-th frame (train: random start; eval: centre clip).
  c.dataset.audio = ml_collections.ConfigDict()
  c.dataset.audio.frames = 1024       # Spectrogram frames per clip (train: random window; eval: centre).
  c.dataset.audio.frame_length_ms = 25.0
  c.dataset.audio.frame_step_ms = 10.0
  c.dataset.audio.norm_mean = -4.2677  # Log-mel normalisation (x - mean) / (2 std): AST's AudioSet statistics.
  c.dataset.audio.norm_std = 4.5690
  c.dataset.audio.freq_masks = 0      # SpecAugment (train): masks of up to freq_mask_width mel bins ...
  c.dataset.audio.freq_mask_width = 48
  c.dataset.audio.time_masks = 0      # ... and of up to time_mask_width frames (AST AudioSet: 2 x 48, 2 x 192).
  c.dataset.audio.time_mask_width = 192

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adamw'        # 'adamw' | 'sgd' | 'lars' (MAE linear probe)
  c.optimizer.lr = 1e-3             # Peak learning rate.
  c.optimizer.schedule = 'cosine'   # 'cosine' | 'linear' | 'constant' | 'rsqrt' (after warmup).
  # 'constant' and 'rsqrt' only: linear cooldown to 0 over the last cooldown_steps (Zhai et al. 2021); 0: none.
  c.optimizer.cooldown_steps = 0
  c.optimizer.rsqrt_timescale = 10_000  # 'rsqrt': lr * sqrt(timescale / (step - warmup + timescale)).
  c.optimizer.warmup_steps = 100
  c.optimizer.end_lr_factor = 0.0   # Final lr = lr * end_lr_factor.
  c.optimizer.weight_decay = 0.0    # Decoupled; never applied to biases, norms, position embeddings, cls tokens.
  # Set: weight decay follows a per-step cosine from weight_decay to this (DINO: 0.04 -> 0.4); None: constant.
  c.optimizer.weight_decay_end = ml_collections.config_dict.placeholder(float)
  c.optimizer.grad_clip_norm = 1.0  # Global-norm clipping; 0 disables.
  c.optimizer.b1 = 0.9              # AdamW beta1, or SGD / LARS momentum.
  c.optimizer.b2 = 0.999            # AdamW beta2.
  c.optimizer.mu_dtype = ml_collections.config_dict.placeholder(str)  # First-moment (momentum) dtype, e.g.
                                    # 'bfloat16' to halve its memory; None: the parameters' float32.
  # Per-parameter rules on '/'-joined param paths (vit_jax/param_groups.py), ((regex, multiplier), ...), first match
  # wins: lr multipliers, and weight-decay multipliers (unmatched: 1 for kernels, 0 for everything else).
  c.optimizer.lr_multipliers = ()
  c.optimizer.wd_multipliers = ()
  c.optimizer.layer_decay = 1.0     # Layer-wise lr decay: layer i of L blocks gets decay**(L + 1 - i); 1 disables.
  c.optimizer.freeze = ''           # Regex: matching params get zero updates and no optimizer state; '' freezes none.

  # Mixup / CutMix on the device batch (vit_jax/mixup.py, timm 'batch' mode); both alphas 0 disable.
  c.mixup = ml_collections.ConfigDict()
  c.mixup.mixup_alpha = 0.0         # Beta(a, a) mixing ratio (DeiT 0.8).
  c.mixup.cutmix_alpha = 0.0        # Beta(a, a) CutMix ratio (DeiT 1.0).
  c.mixup.switch_prob = 0.5         # With both on: chance of CutMix instead of Mixup for a batch.
  c.mixup.prob = 1.0                # Chance that a batch is mixed at all.

  # DeiT distillation (vit_jax/distill.py, losses.py): loss (1 - alpha) * CE + alpha * distill(dist head, teacher).
  c.distill = ml_collections.ConfigDict()
  c.distill.type = 'none'           # 'none' | 'soft' (KL at temperature) | 'hard' (CE with the teacher's argmax).
  c.distill.alpha = 0.5
  c.distill.temperature = 1.0       # Soft distillation only.
  c.distill.init_from = ml_collections.config_dict.placeholder(str)  # Teacher weights: workdir, .npz, params.npz.
  c.distill.model = ml_collections.ConfigDict()  # The teacher: name (registered) plus hyperparameter overrides.
  c.distill.model.name = ml_collections.config_dict.placeholder(str)

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


def _task_section() -> ml_collections.ConfigDict:
  from vit_jax import tasks  # pylint: disable=g-import-not-at-top  (keeps this module free of jax at import)
  return tasks.config_defaults()


DTYPES = ('float32', 'bfloat16', 'float16')

# Sub-configs whose keys are open: model.* are hyperparameter overrides that create_model checks by name; evals.* are
# named evaluators that vit_jax.evaluators checks.
_OPEN_SECTIONS = ('model', 'distill.model', 'evals')
_INTERPOLATIONS = ('linear', 'bilinear', 'bicubic', 'bicubic_torch')
_DISTILL_TYPES = ('none', 'soft', 'hard')


# The valid range of every numeric field: key -> (low, high, low included, high included, what the bounds mean).
# None: unbounded on that side. Checked by `check_ranges` before anything is built; a test checks that every numeric
# field of `base_config()` is listed here. Task sections check their own fields (`Task.check_config`).
_INF = None
RANGES: dict[str, tuple[Optional[float], Optional[float], bool, bool, str]] = {
    'seed': (0, _INF, True, False, ''),
    'batch_size': (1, _INF, True, False, ''),
    'total_steps': (1, _INF, True, False, ''),
    'log_every': (1, _INF, True, False, ''),
    'eval_every': (0, _INF, True, False, '0 disables periodic eval'),
    'checkpoint_every': (1, _INF, True, False, ''),
    'keep_checkpoints': (1, _INF, True, False, ''),
    'accum_steps': (1, _INF, True, False, '1: no accumulation'),
    'ema_decay': (0, 1, True, False, '0 disables the EMA'),
    'label_smoothing': (0, 1, True, False, ''),
    'dataset.image_size': (1, _INF, True, False, ''),
    'dataset.local_crops': (0, _INF, True, False, ''),
    'dataset.local_image_size': (1, _INF, True, False, ''),
    'dataset.crop_padding': (0, _INF, True, False, ''),
    'dataset.crop_min_area': (0, 1, False, True, 'a fraction of the image area'),
    'dataset.eval_crop_fraction': (0, 1, False, True, '1: plain resize'),
    'dataset.shuffle_buffer': (1, _INF, True, False, '1: no shuffling'),
    'dataset.randaugment_layers': (0, _INF, True, False, '0 disables RandAugment'),
    'dataset.randaugment_magnitude': (0, _INF, True, False, ''),
    'dataset.random_erasing': (0, 1, True, True, 'a probability'),
    'dataset.video.num_frames': (1, _INF, True, False, ''),
    'dataset.video.frame_stride': (1, _INF, True, False, '1: consecutive frames'),
    'dataset.audio.frames': (1, _INF, True, False, ''),
    'dataset.audio.frame_length_ms': (0, _INF, False, False, ''),
    'dataset.audio.frame_step_ms': (0, _INF, False, False, ''),
    'dataset.audio.norm_mean': (None, _INF, False, False, ''),
    'dataset.audio.norm_std': (0, _INF, False, False, ''),
    'dataset.audio.freq_masks': (0, _INF, True, False, '0 disables frequency masking'),
    'dataset.audio.freq_mask_width': (0, _INF, True, False, ''),
    'dataset.audio.time_masks': (0, _INF, True, False, '0 disables time masking'),
    'dataset.audio.time_mask_width': (0, _INF, True, False, ''),
    # lr=0 is refused: a schedule of zeros trains nothing; negative is gradient ascent.
    'optimizer.lr': (0, _INF, False, False, 'the peak learning rate'),
    'optimizer.cooldown_steps': (0, _INF, True, False, '0: no cooldown'),
    'optimizer.rsqrt_timescale': (0, _INF, False, False, ''),
    'optimizer.warmup_steps': (0, _INF, True, False, ''),
    'optimizer.end_lr_factor': (0, 1, True, True, 'final lr = lr * end_lr_factor'),
    'optimizer.weight_decay': (0, _INF, True, False, '0 disables'),
    'optimizer.weight_decay_end': (0, _INF, True, False, ''),
    'optimizer.grad_clip_norm': (0, _INF, True, False, '0 disables clipping'),
    'optimizer.b1': (0, 1, True, False, 'a decay rate'),
    'optimizer.b2': (0, 1, True, False, 'a decay rate'),
    'optimizer.layer_decay': (0, 1, False, True, '1 disables'),
    'mixup.mixup_alpha': (0, _INF, True, False, '0 disables'),
    'mixup.cutmix_alpha': (0, _INF, True, False, '0 disables'),
    'mixup.switch_prob': (0, 1, True, True, 'a probability'),
    'mixup.prob': (0, 1, True, True, 'a probability'),
    'distill.alpha': (0, 1, True, True, ''),
    'distill.temperature': (0, _INF, False, False, ''),
    # Mesh axes: a size, or -1 for "the rest" (check_devices checks the product).
    'mesh.data': (-1, _INF, True, False, '-1: the remaining devices'),
    'mesh.fsdp': (-1, _INF, True, False, '-1: the remaining devices'),
    'mesh.tensor': (-1, _INF, True, False, '-1: the remaining devices'),
    'mesh.dcn_data': (-1, _INF, True, False, '-1: the remaining hosts'),
    'mesh.dcn_fsdp': (-1, _INF, True, False, '-1: the remaining hosts'),
    'mesh.dcn_tensor': (-1, _INF, True, False, '-1: the remaining hosts'),
}


def _lookup(config: ml_collections.ConfigDict, key: str) -> object:
  value = config
  for part in key.split('.'):
    value = value[part]
  return value


def _describe_range(low, high, low_in, high_in) -> str:
  if low is None and high is None:
    return 'finite'
  if high is None:
    return f'{">=" if low_in else ">"} {low}'
  return f'in {"[" if low_in else "("}{low}, {high}{"]" if high_in else ")"}'


def check_ranges(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the key and its allowed range for a numeric field that is not a number (or not an
  integer where the schema's default is one), not finite, or out of its range (`RANGES`)."""
  schema = base_config()
  for key, (low, high, low_in, high_in, note) in RANGES.items():
    value = _lookup(config, key)
    if value is None and _lookup(schema, key) is None:  # An optional field left unset.
      continue
    allowed = _describe_range(low, high, low_in, high_in) + (f' ({note})' if note else '')
    integral = isinstance(_lookup(schema, key), int)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integral and not isinstance(value, int)):
      raise ValueError(f'config.{key}={value!r} must be {"an integer" if integral else "a number"} {allowed}.')
    ok = math.isfinite(value)
    if low is not None:
      ok = ok and (value >= low if low_in else value > low)
    if high is not None:
      ok = ok and (value <= high if high_in else value < high)
    if not ok:
      raise ValueError(f'config.{key}={value!r} is out of range: it must be {allowed}.')


def check_model_override_types(config: ml_collections.ConfigDict) -> None:
  """A model.* override must have the type of the hyperparameter it replaces (e.g. `--config.model.hidden_size=abc`
  is a string where the model takes an int); the error names the key instead of failing deep inside the model."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top  (keeps this module free of jax at import)
  import dataclasses  # pylint: disable=g-import-not-at-top
  spec = models.get_model_spec(config.model.name)
  defaults = {f.name: f.default for f in dataclasses.fields(spec.builder) if f.init}
  defaults.update(spec.kwargs)
  for key, value in config.model.items():
    default = defaults.get(key, dataclasses.MISSING)
    if key == 'name' or default is dataclasses.MISSING or default is None:
      continue
    numeric = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    if isinstance(default, bool):
      ok = isinstance(value, bool)
    elif isinstance(default, int):
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
      ok = numeric(value)
    elif isinstance(default, str):
      ok = isinstance(value, str)
    else:
      continue
    if not ok:
      raise ValueError(f'config.model.{key}={value!r} must be {type(default).__name__} like the model\'s default '
                       f'({default!r} for {config.model.name!r}).')


def _unknown_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str) -> list[str]:
  unknown = []
  for key, value in config.items():
    path = f'{prefix}{key}'
    if key not in schema:
      unknown.append(path)
    elif isinstance(value, ml_collections.ConfigDict) and path not in _OPEN_SECTIONS:
      unknown.extend(_unknown_keys(value, schema[key], f'{path}.'))
  return unknown


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Raises ValueError naming each bad key and its fix, before anything is built or compiled.

  Checks unknown keys, value ranges, the model against the image size (the model's own geometry checks, run on
  shapes only via jax.eval_shape) and, given `num_devices`, the mesh and the batch split (devices x accum_steps).
  """
  schema = base_config()
  unknown = _unknown_keys(config, schema, '')
  if unknown:
    known = sorted(k for k in schema.keys())
    raise ValueError(f'Unknown config key(s): {", ".join(unknown)}. Fix the spelling; the top-level keys are '
                     f'{known} (see vit_jax/config_schema.py for every field).')
  if 'name' not in config.model:
    raise ValueError('config.model.name is missing; set it to a registered model (vit_jax.models.list_models()).')
  check_ranges(config)
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype={config.dtype!r} is not supported; choose one of {DTYPES}.')
  _validate_recipe(config)
  if config.optimizer.warmup_steps > config.total_steps:
    raise ValueError(f'config.optimizer.warmup_steps={config.optimizer.warmup_steps} exceeds '
                     f'config.total_steps={config.total_steps}; lower the warmup or train longer.')
  if config.on_nonfinite not in ('stop', 'skip'):
    raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}; set it to 'stop' or 'skip'.")
  if config.dataset.name == 'image_folder' and not config.dataset.folder:
    raise ValueError("config.dataset.name='image_folder' needs config.dataset.folder: the directory holding the "
                     'split folders (train/, val/, ...) of class folders.')
  task = _task_class(config)
  if num_devices is not None:
    check_devices(config, num_devices)
  task.check_config(config)  # Before the model is built: a task's error names the task's keys (e.g. mask_ratio).
  check_model_override_types(config)
  check_model_fits_images(config)
  check_evals(config)


def _task_class(config: ml_collections.ConfigDict) -> type:
  """The task class config.task.name names (ValueError listing the known tasks otherwise)."""
  from vit_jax import tasks  # pylint: disable=g-import-not-at-top
  return tasks.get_task(tasks.task_name(config))


def check_evals(config: ml_collections.ConfigDict) -> None:
  """Every config.evals entry has a known type, known keys and usable values (vit_jax.evaluators checks them)."""
  if config.get('evals'):
    from vit_jax import evaluators  # pylint: disable=g-import-not-at-top  (keeps this module free of jax at import)
    evaluators.validate_evals(config.evals)


def check_devices(config: ml_collections.ConfigDict, num_devices: int, process_count: Optional[int] = None) -> None:
  """Mesh axis sizes must multiply to the device count; the batch must split over batch devices x accum_steps."""
  from vit_jax import sharding  # pylint: disable=g-import-not-at-top  (keeps this module free of jax at import)
  try:
    sizes = sharding.mesh_shape(config.mesh, num_devices)
  except ValueError as e:
    raise ValueError(f'config.mesh: {e}') from None
  if process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_count = jax.process_count()
  if process_count > 1 and int(config.mesh.dcn_tensor) != 1:
    raise ValueError(f'config.mesh.dcn_tensor={config.mesh.dcn_tensor}: tensor parallelism across hosts is not '
                     'supported. Each host reads its own slice of every batch, so hosts that share batch rows (as '
                     'tensor-parallel hosts do) would feed different images. Fix: keep mesh.dcn_tensor=1 and put the '
                     'hosts on mesh.dcn_data or mesh.dcn_fsdp.')
  batch_devices = math.prod(sizes.get(axis, 1) for axis in sharding.BATCH_AXES)
  accum = int(config.get('accum_steps', 1) or 1)
  divisor = math.lcm(batch_devices * accum, process_count)
  if config.batch_size % divisor:
    parts = f'{batch_devices} batch devices (mesh {sizes}) x accum_steps={accum}'
    if process_count > 1:
      parts += f' and {process_count} processes'
    suggestion = max(divisor, config.batch_size // divisor * divisor)
    raise ValueError(f'config.batch_size={config.batch_size} cannot be split evenly over {parts}. Fix: make '
                     f'config.batch_size a multiple of {divisor} (e.g. {suggestion}), or change config.mesh / '
                     'config.accum_steps.')


def check_model_fits_images(config: ml_collections.ConfigDict) -> None:
  """Builds the model through the registry and traces it on shapes only at dataset.image_size.

  The models check their own geometry (patch size, Swin windows and stages, ...); their error is re-raised naming
  the config keys to change. The task initialises the model (`Task.init_variables`, e.g. with MAE's masking).
  Nothing is compiled and no memory is allocated.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  overrides = {k: v for k, v in config.model.items() if k != 'name'}
  model = models.create_model(config.model.name, num_classes=2, **overrides)  # Names a bad model key itself.
  size = config.dataset.image_size  # Its range is checked by check_ranges.
  init_variables = _task_class(config).init_variables
  try:
    jax.eval_shape(lambda: init_variables(model, jax.random.key(0), size))
  except ValueError as e:
    raise ValueError(f'config.model.name={config.model.name!r} cannot take config.dataset.image_size={size}: {e} '
                     'Fix: change config.dataset.image_size, or the model.* overrides named above.') from None


def _validate_recipe(config: ml_collections.ConfigDict) -> None:
  """The non-numeric choices of the fine-tuning and distillation fields (numeric ranges: `RANGES`)."""
  def check(ok: bool, key: str, want: str) -> None:
    value = config
    for part in key.split('.'):
      value = value[part]
    if not ok:
      raise ValueError(f'config.{key}={value!r} must be {want}.')

  check(config.init_posemb_interpolation in _INTERPOLATIONS, 'init_posemb_interpolation', f'one of {_INTERPOLATIONS}')
  check(config.distill.type in _DISTILL_TYPES, 'distill.type', f'one of {_DISTILL_TYPES}')
