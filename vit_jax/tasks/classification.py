"""Supervised classification: cross-entropy on labels, with label smoothing, mixup/cutmix and DeiT distillation.

The default task. `prepare_batch` turns the global batch into targets (smoothed one-hot, mixed by mixup/cutmix) and,
for distillation, runs the teacher in inference mode on the (mixed) images before the batch is split into
micro-batches; the teacher's variables are a per-step constant (`load_constants`), loaded from
config.distill.init_from and never checkpointed. Configured by the top-level config.label_smoothing, config.mixup.*
and config.distill.*.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import ml_collections

from vit_jax import losses, metrics, mixup
from vit_jax.tasks import base


@base.register_task
@dataclasses.dataclass(frozen=True)
class Classification(base.Task):
  """What the step needs to turn a batch and the model's output into a per-example loss.

  The default, `Classification()`, is plain cross-entropy on the integer labels.
  """
  name = 'classification'
  train_metrics = metrics.TrainMetrics
  eval_metrics = metrics.EvalMetrics
  evaluators = ('knn', 'linear_probe', 'fewshot')

  num_classes: Optional[int] = None  # Needed for soft targets (label smoothing, mixup/cutmix).
  label_smoothing: float = 0.0
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  mix_switch_prob: float = 0.5
  mix_prob: float = 1.0
  distill_type: str = 'none'
  distill_alpha: float = 0.5
  distill_temperature: float = 1.0
  teacher: Optional[Any] = None  # The teacher flax module (distillation only).

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    if config.distill.type != 'none' and not (config.distill.model.get('name') and config.distill.init_from):
      raise ValueError(f'config.distill.type={config.distill.type!r} needs a teacher: set config.distill.model.name '
                       '(a registered model, plus its overrides) and config.distill.init_from (its checkpoint).')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: Any, dataset_info: Any) -> Classification:
    """The objective described by config.label_smoothing, config.mixup.* and config.distill.*."""
    from vit_jax import distill  # pylint: disable=g-import-not-at-top  (distill loads checkpoints: orbax)
    del model
    mix, dist = config.mixup, config.distill
    num_classes = dataset_info.num_classes
    return cls(num_classes=num_classes, label_smoothing=config.label_smoothing, mixup_alpha=mix.mixup_alpha,
               cutmix_alpha=mix.cutmix_alpha, mix_switch_prob=mix.switch_prob, mix_prob=mix.prob,
               distill_type=dist.type, distill_alpha=dist.alpha, distill_temperature=dist.temperature,
               teacher=distill.build_teacher(config, num_classes))

  @property
  def uses_teacher(self) -> bool:
    return self.distill_type != 'none'

  def load_constants(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Any) -> Any:
    """The distillation teacher's variables on the mesh, sharded like a student's params (None without one)."""
    if not self.uses_teacher:
      return None
    from vit_jax import distill, sharding  # pylint: disable=g-import-not-at-top
    variables = distill.load_teacher_variables(config, self.teacher)
    return jax.device_put(variables, sharding.state_sharding(mesh, variables, rules))

  # --------------------------------------------------------------------------------------------------- step
  def targets(self, batch: base.Batch, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(images, targets) after label smoothing and mixup/cutmix: soft (B, K) targets, or the integer labels when
    neither is on."""
    if not self.label_smoothing and not self.mixup_alpha and not self.cutmix_alpha:
      return batch['image'], batch['label']
    if not self.num_classes:
      raise ValueError('Label smoothing and mixup/cutmix need Classification.num_classes.')
    targets = losses.one_hot(batch['label'], self.num_classes, smoothing=self.label_smoothing)
    images, targets, _ = mixup.mix_batch(rng, batch['image'], targets, mixup_alpha=self.mixup_alpha,
                                         cutmix_alpha=self.cutmix_alpha, switch_prob=self.mix_switch_prob,
                                         prob=self.mix_prob)
    return images, targets

  def teacher_logits(self, teacher_variables: Any, images: jax.Array) -> Optional[jax.Array]:
    """The teacher's inference-mode logits on the (augmented) student images, without gradient."""
    if not self.uses_teacher:
      return None
    if self.teacher is None or teacher_variables is None:
      raise ValueError(f'distill_type={self.distill_type!r} needs a teacher module and its variables: set '
                       'config.distill.model.name and config.distill.init_from.')
    return jax.lax.stop_gradient(self.teacher.apply(teacher_variables, images, train=False))

  def prepare_batch(self, ctx: base.StepContext, batch: base.Batch, rng: jax.Array) -> base.Batch:
    images, targets = self.targets(batch, rng)
    work = {'image': images, 'label': batch['label'], 'target': targets}
    teacher = self.teacher_logits(ctx.constants, images)
    if teacher is not None:
      work['teacher'] = teacher
    return work

  def loss(self, ctx: base.StepContext, params: Any, batch: base.Batch,
           rng: jax.Array) -> tuple[jax.Array, base.Outputs, dict[str, Any]]:
    out, model_state = ctx.apply(params, batch['image'], train=True, rngs={'dropout': rng})
    loss, logits = losses.classification_loss(out, batch['target'], teacher_logits=batch.get('teacher'),
                                              distill_type=self.distill_type, alpha=self.distill_alpha,
                                              temperature=self.distill_temperature)
    outputs = dict(metrics.classification_outputs(logits, batch['label']), loss=loss)
    return loss.mean(), outputs, model_state

  # --------------------------------------------------------------------------------------------------- eval
  def eval_step(self, state: Any, batch: base.Batch) -> metrics.EvalMetrics:
    """Masked loss, top-1 and top-5 of one eval batch; padding examples (mask 0) count for nothing."""
    logits = state.apply_fn(self.eval_variables(state), batch['image'], train=False)
    outputs = metrics.classification_outputs(logits, batch['label'])
    return metrics.EvalMetrics.single_from_model_output(mask=batch['mask'], **outputs)
