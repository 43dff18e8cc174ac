"""Published training recipes as config builders, so experiment files stay a few lines each.

Sources (REFERENCE.md section 5 unless noted): AugReg ("How to train your ViT", Steiner et al. 2021) and its
released checkpoints' settings; big_vision's "Better plain ViT baselines"; DeiT (Touvron et al. 2020); Swin (Liu et
al. 2021); the official ViT fine-tuning recipe (google-research/vision_transformer).
"""
from __future__ import annotations

import ml_collections

from vit_jax.config_schema import base_config

IMAGENET_TRAIN_EXAMPLES = 1_281_167
# ImageNet-21k as AugReg used it (fall11, minus the 51,200 held-out images); override total_steps for another copy.
IMAGENET21K_TRAIN_EXAMPLES = 13_000_000

# AugReg's augmentation settings: (RandAugment (N, M) or None, mixup alpha) (big_vision configs/vit_i21k.py).
AUGREG_SETTINGS = {
    'none': (None, 0.0),
    'light1': ((2, 0), 0.0),
    'light2': ((2, 10), 0.2),
    'medium1': ((2, 15), 0.2),
    'medium2': ((2, 15), 0.5),
    'strong1': ((2, 20), 0.5),
    'strong2': ((2, 20), 0.8),
}

# Official i21k checkpoints of google-research/vision_transformer, per model (for the fine-tuning configs).
OFFICIAL_I21K = {
    'vit_b16': 'gs://vit_models/imagenet21k/ViT-B_16.npz',
    'vit_b32': 'gs://vit_models/imagenet21k/ViT-B_32.npz',
    'vit_l16': 'gs://vit_models/imagenet21k/ViT-L_16.npz',
    'vit_l32': 'gs://vit_models/imagenet21k/ViT-L_32.npz',
    'vit_h14': 'gs://vit_models/imagenet21k/ViT-H_14.npz',
}


def _inception_dataset(config: ml_collections.ConfigDict, name: str, train_split: str, eval_split: str, *,
                       image_size: int, eval_crop_fraction: float, shuffle_buffer: int) -> None:
  """The dataset fields every recipe here shares: inception crop and flip for training."""
  config.dataset.update(dict(name=name, train_split=train_split, eval_split=eval_split, image_size=image_size,
                             train_crop='inception', flip=True, eval_crop_fraction=eval_crop_fraction,
                             shuffle_buffer=shuffle_buffer))


def _imagenet(config: ml_collections.ConfigDict, *, image_size: int = 224) -> None:
  _inception_dataset(config, 'imagenet2012', 'train', 'validation', image_size=image_size, eval_crop_fraction=0.875,
                     shuffle_buffer=250_000)
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 1000


def set_augreg(config: ml_collections.ConfigDict, setting: str) -> ml_collections.ConfigDict:
  """Applies an AugReg augmentation setting: RandAugment (N, M) in the pipeline and mixup on the batch."""
  if setting not in AUGREG_SETTINGS:
    raise ValueError(f'Unknown AugReg setting {setting!r}; choose one of {sorted(AUGREG_SETTINGS)}.')
  randaug, mix = AUGREG_SETTINGS[setting]
  config.dataset.randaugment_layers, config.dataset.randaugment_magnitude = randaug or (0, 10.0)
  config.mixup.mixup_alpha = mix
  return config


def augreg_imagenet(model_name: str, *, epochs: int = 300, batch_size: int = 4096, aug: str = 'medium2',
                    weight_decay: float = 0.1, dropout: float = 0.0,
                    drop_path: float = 0.0) -> ml_collections.ConfigDict:
  """ImageNet-1k from scratch after AugReg: Adam(0.9, 0.999), lr 1e-3, 10k warmup steps, cosine decay, global-norm
  clip 1.0, batch 4096, 224 px inception crop + flip, RandAugment + mixup per `aug`, wd/dropout/stochastic depth as
  the released checkpoint of that model was trained."""
  config = base_config()
  config.model.name = model_name
  _imagenet(config)
  config.batch_size = batch_size
  config.total_steps = epochs * IMAGENET_TRAIN_EXAMPLES // batch_size
  config.optimizer.name = 'adamw'
  config.optimizer.lr = 1e-3
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.weight_decay = weight_decay
  config.optimizer.warmup_steps = 10_000
  config.optimizer.schedule = 'cosine'
  config.optimizer.grad_clip_norm = 1.0
  config.model.dropout_rate = dropout
  config.model.drop_path_rate = drop_path
  return set_augreg(config, aug)


def augreg_imagenet21k(model_name: str, *, epochs: int = 300, aug: str = 'medium1', weight_decay: float = 0.1,
                       dropout: float = 0.1, drop_path: float = 0.1) -> ml_collections.ConfigDict:
  """ImageNet-21k pretraining after AugReg (the released L/16 i21k checkpoint: medium1, wd 0.1, do/sd 0.1), on a
  TFDS `imagenet21k` the user provides, holding out its first 51,200 images for evaluation as AugReg did."""
  config = augreg_imagenet(model_name, epochs=epochs, aug=aug, weight_decay=weight_decay, dropout=dropout,
                           drop_path=drop_path)
  config.dataset.name = 'imagenet21k'
  config.dataset.train_split = 'full[51200:]'
  config.dataset.eval_split = 'full[:25600]'
  config.dataset.eval_crop_fraction = 0.875
  config.total_steps = epochs * IMAGENET21K_TRAIN_EXAMPLES // config.batch_size
  config.eval_every = 25_000
  return config


def plain_vit_baseline(model_name: str, *, epochs: int = 90) -> ml_collections.ConfigDict:
  """big_vision "Better plain ViT baselines for ImageNet-1k": global average pooling, fixed 2-D sin-cos position
  embedding, batch 1024, Adam lr 1e-3, wd 1e-4 decoupled (0.1 in optax units), 10k warmup, cosine, RandAugment(2, 10),
  mixup 0.2, no dropout or stochastic depth. 90 epochs: 76.5% (S/16); 300 epochs: 79.8%."""
  config = augreg_imagenet(model_name, epochs=epochs, batch_size=1024, aug='light2', weight_decay=0.1)
  config.model.classifier = 'gap'
  config.model.posemb = 'sincos2d'
  return config


def deit_imagenet(model_name: str, *, epochs: int = 300, batch_size: int = 1024,
                  drop_path: float = 0.1) -> ml_collections.ConfigDict:
  """DeiT: AdamW lr 5e-4 * batch / 512, wd 0.05, 5 warmup epochs, cosine to 1e-5, RandAugment(2, 9), mixup 0.8,
  cutmix 1.0 (switch 0.5), label smoothing 0.1, random erasing 0.25, stochastic depth 0.1, no dropout, no clip."""
  config = base_config()
  config.model.name = model_name
  _imagenet(config)
  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size
  config.batch_size = batch_size
  config.total_steps = epochs * steps_per_epoch
  config.optimizer.name = 'adamw'
  config.optimizer.lr = 5e-4 * batch_size / 512
  config.optimizer.end_lr_factor = 1e-5 / config.optimizer.lr
  config.optimizer.weight_decay = 0.05
  config.optimizer.warmup_steps = 5 * steps_per_epoch
  config.optimizer.schedule = 'cosine'
  config.optimizer.grad_clip_norm = 0.0
  config.model.drop_path_rate = drop_path
  config.dataset.randaugment_layers, config.dataset.randaugment_magnitude = 2, 9.0
  config.dataset.random_erasing = 0.25
  config.mixup.mixup_alpha, config.mixup.cutmix_alpha = 0.8, 1.0
  config.mixup.switch_prob, config.mixup.prob = 0.5, 1.0
  config.label_smoothing = 0.1
  return config


def deit_distilled(config: ml_collections.ConfigDict, *, teacher: str = 'vit_b16',
                   teacher_init: str | None = None, kind: str = 'hard') -> ml_collections.ConfigDict:
  """Turns a DeiT recipe into its distilled variant: the `_distilled` model (distillation token) trained with DeiT's
  hard distillation (alpha 0.5, tau 1). DeiT's teacher is a RegNetY-16GF, not in this registry; any registered
  model with a checkpoint (e.g. a timm ViT converted by `vit_jax.convert`) can stand in via distill.init_from."""
  config.model.name = f'{config.model.name}_distilled'
  config.distill.type = kind
  config.distill.alpha = 0.5
  config.distill.temperature = 1.0
  config.distill.model.name = teacher
  config.distill.init_from = teacher_init
  return config


def swin_imagenet(model_name: str, *, drop_path: float, epochs: int = 300,
                  batch_size: int = 1024) -> ml_collections.ConfigDict:
  """Swin: AdamW lr 1e-3 (batch 1024), wd 0.05, 20 warmup epochs, cosine to 1e-5, clip 5.0, RandAugment(2, 9),
  mixup 0.8, cutmix 1.0, label smoothing 0.1, random erasing 0.25, stochastic depth per size."""
  config = deit_imagenet(model_name, epochs=epochs, batch_size=batch_size, drop_path=drop_path)
  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size
  config.optimizer.lr = 1e-3 * batch_size / 1024
  config.optimizer.end_lr_factor = 1e-5 / config.optimizer.lr
  config.optimizer.warmup_steps = 20 * steps_per_epoch
  config.optimizer.grad_clip_norm = 5.0
  return config


# Official ViT fine-tuning presets: TFDS name, train/eval splits, total steps, image size.
FINETUNE_PRESETS = {
    'cifar10': ('cifar10', 'train[:98%]', 'test', 10_000, 384),
    'cifar100': ('cifar100', 'train[:98%]', 'test', 10_000, 384),
    'oxford_iiit_pet': ('oxford_iiit_pet', 'train[:90%]', 'test', 500, 384),
    'imagenet2012': ('imagenet2012', 'train[:99%]', 'validation', 20_000, 384),
}


def vit_finetune(dataset: str, model_name: str = 'vit_b16', *, lr: float = 0.03,
                 init_from: str | None = None) -> ml_collections.ConfigDict:
  """Official ViT fine-tuning: SGD momentum 0.9, batch 512, 500 warmup steps then cosine, global-norm clip 1.0, no
  weight decay, no dropout / stochastic depth / mixup, inception crop + flip at 384 px, eval by plain resize; the
  head is re-initialised and position embeddings interpolated from the 224 px checkpoint (official i21k by
  default). lr is swept over {0.001, 0.003, 0.01, 0.03} in the paper."""
  if dataset not in FINETUNE_PRESETS:
    raise ValueError(f'No fine-tuning preset for {dataset!r}; choose one of {sorted(FINETUNE_PRESETS)}.')
  name, train_split, eval_split, steps, size = FINETUNE_PRESETS[dataset]
  config = base_config()
  config.model.name = model_name
  config.model.dropout_rate = 0.0
  config.model.drop_path_rate = 0.0
  config.init_from = init_from if init_from is not None else OFFICIAL_I21K.get(model_name)
  _inception_dataset(config, name, train_split, eval_split, image_size=size, eval_crop_fraction=1.0,
                     shuffle_buffer=50_000)
  config.batch_size = 512
  config.total_steps = steps
  config.log_every = 50
  config.eval_every = 1000 if steps > 1000 else steps
  config.checkpoint_every = 1000 if steps > 1000 else steps
  config.optimizer.name = 'sgd'
  config.optimizer.b1 = 0.9
  config.optimizer.lr = lr
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_steps = min(500, steps // 5 if steps < 2500 else 500)
  config.optimizer.schedule = 'cosine'
  config.optimizer.grad_clip_norm = 1.0
  return config


def dino_imagenet(model_name: str, *, epochs: int = 100, batch_size: int = 1024,
                  teacher_temp_boost: bool = False) -> ml_collections.ConfigDict:
  """DINO self-distillation on ImageNet-1k (facebookresearch/dino main_dino.py defaults, REFERENCE section 6).

  AdamW lr 5e-4 * batch / 256 with 10 warmup epochs and a cosine to 1e-6, weight decay cosine 0.04 -> 0.4 (not on
  biases / 1-D params), per-parameter gradient clipping 3.0, last layer frozen during epoch 0, drop path 0.1
  (student), teacher momentum cosine 0.996 -> 1, centre momentum 0.9, student temperature 0.1, teacher 0.04 (with
  `teacher_temp_boost`: 0.04 -> 0.07 over 30 epochs, per epoch); multi-crop: 2 global 224 px crops of 40-100% of
  the area and 8 local 96 px crops of 5-40%. Our lr warm-up is min(1, t / warmup) where DINO's reaches the peak one
  step earlier (np.linspace).
  """
  config = base_config()
  config.task.name = 'dino'
  config.model.name = model_name
  config.model.drop_path_rate = 0.1
  _imagenet(config)
  config.dataset.update(train_crop='multicrop', local_crops=8, local_image_size=96, global_crop_scale=(0.4, 1.0),
                        local_crop_scale=(0.05, 0.4))
  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size
  config.batch_size = batch_size
  config.total_steps = epochs * steps_per_epoch
  config.eval_every = 0  # DINO has no labelled eval pass; its teacher is judged by k-NN / linear probes.
  config.optimizer.update(name='adamw', b1=0.9, b2=0.999, lr=5e-4 * batch_size / 256, schedule='cosine',
                          warmup_steps=10 * steps_per_epoch, weight_decay=0.04, weight_decay_end=0.4,
                          grad_clip_norm=0.0)
  config.optimizer.end_lr_factor = 1e-6 / config.optimizer.lr
  dino = config.task.dino
  dino.update(student_temp=0.1, teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=0,
              momentum_teacher=0.996, center_momentum=0.9, freeze_last_layer_epochs=1, clip_grad=3.0)
  if teacher_temp_boost:
    dino.update(teacher_temp=0.07, warmup_teacher_temp_epochs=30)
  return config


# MAE (He et al. 2022; facebookresearch/mae, REFERENCE.md section 6). Base lr is per 256 images, as published.
MAE_TOKEN_WD_RULES = ((r'^(cls|mask_token)$', 1.0),)  # The official optimizer decays every >= 2-D param.


def mae_pretrain(model_name: str = 'mae_vit_b16', *, epochs: int = 800, batch_size: int = 4096,
                 warmup_epochs: int = 40) -> ml_collections.ConfigDict:
  """MAE pretraining (main_pretrain.py): AdamW (0.9, 0.95), lr 1.5e-4 x batch / 256, wd 0.05 (none on biases and
  norms; the class and mask tokens are decayed as officially), 40 warmup epochs then cosine per step to 0, no
  clipping, random resized crop 0.2-1 + flip and nothing else, mask ratio 0.75, norm_pix_loss. Eval: the same
  reconstruction loss on the validation split."""
  config = base_config()
  config.task.name = 'mae'
  config.model.name = model_name
  config.model.mask_ratio = 0.75
  config.model.norm_pix_loss = True
  _imagenet(config)
  config.dataset.crop_min_area = 0.2
  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size
  config.batch_size = batch_size
  config.total_steps = epochs * steps_per_epoch
  config.optimizer.name = 'adamw'
  config.optimizer.lr = 1.5e-4 * batch_size / 256
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.95
  config.optimizer.weight_decay = 0.05
  config.optimizer.wd_multipliers = MAE_TOKEN_WD_RULES
  config.optimizer.warmup_steps = warmup_epochs * steps_per_epoch
  config.optimizer.schedule = 'cosine'
  config.optimizer.end_lr_factor = 0.0
  config.optimizer.grad_clip_norm = 0.0
  return config


def mae_finetune(model_name: str = 'vit_b16', *, init_from: str | None = None, epochs: int = 100,
                 batch_size: int = 1024, base_lr: float = 5e-4, layer_decay: float = 0.65,
                 drop_path: float = 0.1) -> ml_collections.ConfigDict:
  """MAE fine-tuning (main_finetune.py; ViT-B: 83.6%): DeiT's augmentation (RandAugment m9, random erasing 0.25,
  mixup 0.8, cutmix 1.0, label smoothing 0.1), AdamW lr 5e-4 x batch / 256, layer decay 0.65, wd 0.05, drop path
  0.1, 5 warmup epochs, cosine to 1e-6, batch 1024, 100 epochs; the head is MAE's (mean of the patch tokens, then
  fc_norm; `classifier='gap_fc_norm'`) on an encoder from `init_from` (an MAE workdir, or timm's
  vit_base_patch16_224.mae converted by vit_jax.convert)."""
  config = deit_imagenet(model_name, epochs=epochs, batch_size=batch_size, drop_path=drop_path)
  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size
  config.init_from = init_from
  config.model.classifier = 'gap_fc_norm'
  config.model.gelu_approximate = False  # MAE's blocks (timm's) use the exact GELU.
  config.optimizer.lr = base_lr * batch_size / 256
  config.optimizer.end_lr_factor = 1e-6 / config.optimizer.lr
  config.optimizer.layer_decay = layer_decay
  config.optimizer.warmup_steps = 5 * steps_per_epoch
  return config


def mae_linprobe(model_name: str = 'vit_b16', *, init_from: str | None = None, epochs: int = 90,
                 batch_size: int = 16384, base_lr: float = 0.1) -> ml_collections.ConfigDict:
  """MAE linear probe (main_linprobe.py; ViT-B: 68.0%): the frozen encoder's class token after the final norm,
  BatchNorm without affine (eps 1e-6), then a linear head; LARS (momentum 0.9, trust 0.001) lr 0.1 x batch / 256,
  no weight decay, 10 warmup epochs then cosine, batch 16384, 90 epochs; random resized crop (0.08-1) + flip."""
  config = base_config()
  config.model.name = model_name
  config.model.classifier = 'token'
  config.model.head_batchnorm = True
  config.model.gelu_approximate = False
  config.init_from = init_from
  _imagenet(config)
  config.dataset.crop_min_area = 0.08
  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch_size
  config.batch_size = batch_size
  config.total_steps = epochs * steps_per_epoch
  config.optimizer.name = 'lars'
  config.optimizer.b1 = 0.9
  config.optimizer.lr = base_lr * batch_size / 256
  config.optimizer.weight_decay = 0.0
  config.optimizer.warmup_steps = 10 * steps_per_epoch
  config.optimizer.schedule = 'cosine'
  config.optimizer.grad_clip_norm = 0.0
  config.optimizer.freeze = r'^(?!head/)'  # Everything but the linear head (the BatchNorm has no parameters).
  return config
