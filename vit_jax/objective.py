"""The training objective of one step: targets (label smoothing, mixup/cutmix), teacher logits, and the loss.

Built once from the config (`from_config`); the train step calls `prepare` on the batch, `teacher_logits` for
distillation (the teacher runs in inference mode inside the same jitted step, its params passed in as an argument)
and `loss` on the student's train-mode output.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import ml_collections

from vit_jax import losses, mixup


@dataclasses.dataclass(frozen=True)
class Objective:
  """What the step needs to turn a batch and the model's output into a per-example loss.

  The default, `Objective()`, is plain cross-entropy on the integer labels.
  """
  num_classes: Optional[int] = None  # Needed for soft targets (label smoothing, mixup/cutmix).
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_switch_prob: float = 0.5
  mix_prob: float = 1.0
  distill_type: str = 'none'
  distill_alpha: float = 0.5
  distill_temperature: float = 1.0
  teacher_apply: Optional[Callable[..., Any]] = None

  @property
  def uses_teacher(self) -> bool:
    return self.distill_type != 'none'

  def prepare(self, batch: dict[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(images, targets) after label smoothing and mixup/cutmix: soft (B, K) targets, or the integer labels when
    neither is on."""
    if not self.label_smoothing and not self.mixup_alpha and not self.cutmix_alpha:
      return batch['image'], batch['label']
    if not self.num_classes:
      raise ValueError('Label smoothing and mixup/cutmix need Objective.num_classes.')
    targets = losses.one_hot(batch['label'], self.num_classes, smoothing=self.label_smoothing)
    images, targets, _ = mixup.mix_batch(rng, batch['image'], targets, mixup_alpha=self.mixup_alpha,
                                         cutmix_alpha=self.cutmix_alpha, switch_prob=self.mix_switch_prob,
                                         prob=self.mix_prob)
    return images, targets

  def teacher_logits(self, teacher_params: Any, images: jax.Array) -> Optional[jax.Array]:
    """The teacher's inference-mode logits on the (augmented) student images, without gradient."""
    if not self.uses_teacher:
      return None
    logits = self.teacher_apply({'params': teacher_params}, images, train=False)
    return jax.lax.stop_gradient(logits)

  def loss(self, outputs: Any, targets: jax.Array,
           teacher_logits: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-example loss and the logits to score accuracy on (see losses.classification_loss)."""
    return losses.classification_loss(outputs, targets, teacher_logits=teacher_logits,
                                      distill_type=self.distill_type, alpha=self.distill_alpha,
                                      temperature=self.distill_temperature)


def from_config(config: ml_collections.ConfigDict, num_classes: int,
                teacher_apply: Optional[Callable[..., Any]] = None) -> Objective:
  """The objective described by config.label_smoothing, config.mixup.* and config.distill.*."""
  mix, distill = config.mixup, config.distill
  if distill.type != 'none' and teacher_apply is None:
    raise ValueError(f'config.distill.type={distill.type!r} needs a teacher: set config.distill.model.name and '
                     'config.distill.init_from.')
  return Objective(num_classes=num_classes, label_smoothing=config.label_smoothing, mixup_alpha=mix.mixup_alpha,
                   cutmix_alpha=mix.cutmix_alpha, mix_switch_prob=mix.switch_prob, mix_prob=mix.prob,
                   distill_type=distill.type, distill_alpha=distill.alpha,
                   distill_temperature=distill.temperature, teacher_apply=teacher_apply)
