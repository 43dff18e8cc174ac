"""Masked-autoencoder pretraining (He et al. 2022): the loss is the MAE model's own pixel reconstruction loss.

`config.task.name = 'mae'` with an MAE model (`mae_vit_*`, vit_jax/models/mae.py). Each step masks every example
afresh: the masking noise comes from the step's rng (a function of seed and step, so a resumed run masks the same
patches), split from the dropout / drop-path rng. The task adds nothing to the train state. Eval is the same
reconstruction loss on the eval split, with noise from a fixed key so that evals at different steps score the
same masks. Labels are never read: mixup, label smoothing and distillation are refused.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from vit_jax import metrics
from vit_jax.models import mae as mae_model
from vit_jax.tasks import base

# Folded into the eval key: eval masks never coincide with a train step's.
_EVAL_MASK_SALT = 0x4D4145


@base.register_task
@dataclasses.dataclass(frozen=True)
class MaskedAutoencoder(base.Task):
  """MAE pretraining on an MAE model: loss = the model's loss over the removed patches."""
  name = 'mae'
  train_metrics = metrics.LossTrainMetrics
  eval_metrics = metrics.LossEvalMetrics
  evaluators = ('knn', 'linear_probe')

  patch_size: int = 16
  norm_pix_loss: bool = False
  eval_seed: int = 0

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """The model must be an MAE model with a mask ratio in (0, 1); label-based options do not apply."""
    from vit_jax import models  # pylint: disable=g-import-not-at-top
    spec = models.get_model_spec(config.model.name)
    if not issubclass(spec.builder, mae_model.MaskedAutoencoderViT):
      raise ValueError(f"config.task.name='mae' trains a masked autoencoder, but config.model.name="
                       f"{config.model.name!r} is not one. Set config.model.name to one of "
                       f"{models.list_models('mae_*')}.")
    ratio = config.model.get('mask_ratio', spec.kwargs.get('mask_ratio', mae_model.MaskedAutoencoderViT.mask_ratio))
    if not 0.0 < ratio < 1.0:
      raise ValueError(f'config.model.mask_ratio={ratio} must be in (0, 1) (the fraction of patches removed; MAE: '
                       '0.75).')
    unused = {'label_smoothing': config.label_smoothing, 'mixup.mixup_alpha': config.mixup.mixup_alpha,
              'mixup.cutmix_alpha': config.mixup.cutmix_alpha}
    for key, value in unused.items():
      if value:
        raise ValueError(f"config.{key}={value} has no effect on MAE pretraining (no labels); set it to 0 with "
                         "config.task.name='mae'.")
    if config.distill.type != 'none':
      raise ValueError(f"config.distill.type={config.distill.type!r}: MAE pretraining has no distillation; set it "
                       "to 'none'.")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: Any, dataset_info: Any) -> MaskedAutoencoder:
    del dataset_info
    return cls(patch_size=model.patch_size, norm_pix_loss=model.norm_pix_loss, eval_seed=config.seed)

  def _losses(self, images: jax.Array, out: dict[str, jax.Array]) -> jax.Array:
    """Per-example reconstruction losses (B,); their mean is the model's batch loss."""
    return mae_model.reconstruction_loss(images, out['pred'], out['mask'], patch_size=self.patch_size,
                                         norm_pix_loss=self.norm_pix_loss, per_example=True)

  def loss(self, ctx: base.StepContext, params: Any, batch: base.Batch,
           rng: jax.Array) -> tuple[jax.Array, base.Outputs, dict[str, Any]]:
    mask_rng, dropout_rng = jax.random.split(rng)
    out, model_state = ctx.apply(params, batch['image'], train=True, rngs={'mask': mask_rng, 'dropout': dropout_rng})
    return out['loss'], {'loss': self._losses(batch['image'], out)}, model_state

  def eval_step(self, state: Any, batch: base.Batch) -> metrics.LossEvalMetrics:
    """Reconstruction loss of one eval batch with fixed masks; padding examples (mask 0) count for nothing."""
    key = jax.random.fold_in(jax.random.key(self.eval_seed), _EVAL_MASK_SALT)
    out = state.apply_fn(self.eval_variables(state), batch['image'], train=False, rngs={'mask': key})
    return metrics.LossEvalMetrics.single_from_model_output(loss=self._losses(batch['image'], out),
                                                              mask=batch['mask'])
