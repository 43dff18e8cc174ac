"""The distillation teacher: any registered model (`config.distill.model`) with its trained weights.

The weights come from `config.distill.init_from` (a vit_jax workdir, an official .npz, or a params.npz converted
from timm by `vit_jax.convert`) and must include the head, so its class count must be the dataset's. Position
embeddings are resized to the student's image size, since the teacher sees the same (augmented) images.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from vit_jax import finetune, models


def build_teacher(config: ml_collections.ConfigDict, num_classes: int) -> Optional[nn.Module]:
  """The teacher module of config.distill.model (None when distillation is off)."""
  if config.distill.type == 'none':
    return None
  spec = config.distill.model
  if not spec.get('name') or not config.distill.init_from:
    raise ValueError(f'config.distill.type={config.distill.type!r} needs config.distill.model.name (a registered '
                     'model) and config.distill.init_from (its checkpoint: workdir, official .npz or converted '
                     'params.npz).')
  overrides = {k: v for k, v in spec.items() if k != 'name'}
  return models.create_model(spec.name, num_classes=num_classes, **overrides)


def load_teacher_variables(config: ml_collections.ConfigDict, teacher: nn.Module) -> dict[str, Any]:
  """Host variables ({'params'[, 'batch_stats']}) of the teacher at the student's image size, head included."""
  size = config.dataset.image_size
  abstract = jax.eval_shape(lambda: teacher.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  logging.info('Loading distillation teacher %s from %s.', config.distill.model.name, config.distill.init_from)
  return finetune.load_variables(config.distill.init_from, dict(abstract), require_head=True,
                                 posemb_interpolation=config.init_posemb_interpolation, model=teacher)
