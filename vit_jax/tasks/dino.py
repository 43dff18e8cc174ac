"""DINO self-distillation (Caron et al. 2021; facebookresearch/dino main_dino.py): the task, its loss and schedules.

The pure pieces, usable without the trainer:
- `dino_loss(student_out, teacher_out, center, ...)` -> (loss, new_center): the official `DINOLoss.forward` and its
  `update_center`, over the global batch (under jit the means span every device);
- `cosine_schedule` (from vit_jax.optim): DINO's `utils.cosine_scheduler` at a step (teacher momentum 0.996 -> 1;
  the optimizer's weight decay 0.04 -> 0.4 through optimizer.weight_decay_end);
- `teacher_temperature`: the per-epoch linear warm-up of the teacher temperature (0.04 -> 0.07 over 30 epochs).

The task (`config.task.name = 'dino'`, fields under config.task.dino): the student is the trained model (a
registry `dino_vit_*`: ViT + DINOHead); the teacher (its params) and the centre live in `TrainState.extra`, the
teacher boxed like the student so it is sharded the same way. Per step: `prepare_batch` runs the teacher on the 2
global views of the whole global batch; `loss` runs the student on all views (2 global + dataset.local_crops local,
input_pipeline's train_crop='multicrop') and takes `dino_loss` against the centred, sharpened teacher; after the
optimizer update the teacher becomes m * teacher + (1 - m) * student (m: cosine 0.996 -> 1 per step) and the centre
c <- 0.9 c + 0.1 mean(teacher outputs of the global batch). The optimizer is the configured one (lr warmup +
cosine, weight decay cosine via optimizer.weight_decay_end) behind DINO's per-parameter gradient clipping
(task.dino.clip_grad, each parameter's gradient norm clipped separately as `utils.clip_gradients`) and the
freezing of the last layer (`dino_head/last_layer`) for the first task.dino.freeze_last_layer_epochs epochs: no
gradient, no moment and no weight decay there, as a torch parameter whose .grad is None. Evaluation uses the
teacher (`eval_variables`); there is no eval pass with labels, the k-NN / linear-probe evaluators suit it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import metrics
from vit_jax.tasks import base

from vit_jax.optim import cosine_schedule  # noqa: F401  (DINO's cosine_scheduler; re-exported)

Array = jax.Array


def dino_loss(student_out: Array, teacher_out: Array, center: Array, *, student_temp: float,
              teacher_temp: Any, center_momentum: float) -> tuple[Array, Array]:
  """DINO's cross-entropy between teacher and student views, and the updated centre.

  student_out: (n_crops, B, K) head outputs, the 2 global views first; teacher_out: (2, B, K) for the global
  views; center: (K,) or (1, K). The loss is the mean over every pair (teacher view i, student view v != i) of
  mean_b sum_k -softmax((t_i - c) / teacher_temp)_k log_softmax(s_v / student_temp)_k: 2 * n_crops - 2 terms.
  No gradient flows into the teacher or the centre. new_center = m * c + (1 - m) * mean of teacher_out over both
  views and the whole batch, with c's shape.
  """
  if student_out.ndim != 3 or teacher_out.ndim != 3 or teacher_out.shape[0] != 2:
    raise ValueError(f'dino_loss wants student_out (n_crops, B, K) and teacher_out (2, B, K); got '
                     f'{student_out.shape} and {teacher_out.shape}.')
  if student_out.shape[0] < 2 or student_out.shape[1:] != teacher_out.shape[1:]:
    raise ValueError(f'student_out {student_out.shape} must hold at least the 2 global views with the teacher\'s '
                     f'batch and width {teacher_out.shape[1:]}.')
  k = teacher_out.shape[-1]
  if center.shape not in ((k,), (1, k)):
    raise ValueError(f'center has shape {center.shape}; expected ({k},) or (1, {k}).')
  teacher_out = jax.lax.stop_gradient(teacher_out.astype(jnp.float32))
  center = jax.lax.stop_gradient(center.astype(jnp.float32))
  log_student = jax.nn.log_softmax(student_out.astype(jnp.float32) / student_temp, axis=-1)
  teacher = jax.nn.softmax((teacher_out - center.reshape(1, 1, k)) / teacher_temp, axis=-1)
  # cross[i, v] = mean over the batch of the cross-entropy of student view v against teacher view i.
  cross = -jnp.einsum('ibk,vbk->iv', teacher, log_student, precision=jax.lax.Precision.HIGHEST)
  cross = cross / teacher_out.shape[1]
  n_crops = student_out.shape[0]
  pairs = jnp.arange(2)[:, None] != jnp.arange(n_crops)[None, :]  # Skip a view against itself.
  loss = jnp.sum(jnp.where(pairs, cross, 0.0)) / (2 * n_crops - 2)
  return loss, update_center(center, teacher_out, center_momentum)


def collapse_diagnostics(teacher_out: Array, center: Array, loss: Array, *, teacher_temp: Any) -> dict[str, Array]:
  """DINO's collapse signals (Caron et al. 2021, section 5.3 and Fig. 7) for one step's teacher outputs (2, B, K).

  - 'teacher_entropy': the mean entropy of the centred, sharpened teacher distribution of one image. Near ln K: the
    uniform collapse (centring won); near 0 with a low batch entropy: the one-prototype collapse (sharpening won).
  - 'teacher_batch_entropy': the entropy of that distribution averaged over the batch; near 0 when every image
    lands on the same prototype.
  - 'kl': the mean KL(teacher || student) over the loss's view pairs, i.e. `loss` minus the teacher entropy (each
    teacher view enters the loss equally often). It goes to 0 in either collapse.
  """
  k = teacher_out.shape[-1]
  logits = (jax.lax.stop_gradient(teacher_out).astype(jnp.float32) - center.reshape(1, 1, k)) / teacher_temp
  probs = jax.nn.softmax(logits, axis=-1)
  entropy = -jnp.mean(jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), axis=-1))
  mean_probs = jnp.mean(probs, axis=(0, 1))
  batch_entropy = -jnp.sum(mean_probs * jnp.log(jnp.maximum(mean_probs, 1e-30)))
  return {'teacher_entropy': entropy, 'teacher_batch_entropy': batch_entropy,
          'kl': jax.lax.stop_gradient(loss) - entropy}


def update_center(center: Array, teacher_out: Array, momentum: float) -> Array:
  """DINO's `update_center`: m * c + (1 - m) * the mean of the teacher outputs (2, B, K) over views and batch."""
  batch_center = jnp.mean(jax.lax.stop_gradient(teacher_out).astype(jnp.float32), axis=(0, 1))
  return center * momentum + batch_center.reshape(center.shape) * (1 - momentum)


def teacher_temperature(step: Any, *, steps_per_epoch: int, warmup_temp: float, temp: float,
                        warmup_epochs: int) -> Array:
  """DINO's teacher temperature at `step`: np.linspace(warmup_temp, temp, warmup_epochs)[epoch], then `temp`.

  Constant within an epoch (the official schedule is indexed by epoch).
  """
  if steps_per_epoch < 1 or warmup_epochs < 0:
    raise ValueError(f'steps_per_epoch={steps_per_epoch} must be >= 1 and warmup_epochs={warmup_epochs} >= 0.')
  epoch = jnp.asarray(step, jnp.int32) // steps_per_epoch
  if warmup_epochs == 0:
    return jnp.full((), temp, jnp.float32)
  ramp = warmup_temp + (temp - warmup_temp) * epoch.astype(jnp.float32) / max(warmup_epochs - 1, 1)
  return jnp.where(epoch < warmup_epochs, ramp, jnp.float32(temp))


# ------------------------------------------------------------------------------------------------- optimizer

def clip_per_parameter(max_norm: float) -> optax.GradientTransformation:
  """DINO's `clip_gradients`: each parameter's gradient g becomes g * min(1, max_norm / (||g|| + 1e-6))."""
  def update_fn(updates, state, params=None):
    del params
    def clip(g):
      return g * jnp.minimum(1.0, max_norm / (jnp.linalg.norm(g.astype(jnp.float32)) + 1e-6)).astype(g.dtype)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def zero_until(pattern: str, steps: int) -> optax.GradientTransformation:
  """Zeroes the updates of parameters whose '/'-joined path matches `pattern` during the first `steps` updates."""
  regex = re.compile(pattern)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    frozen = state.count < steps

    def mask(path, u):
      name = '/'.join(str(getattr(k, 'key', k)) for k in path)
      return jnp.where(frozen, jnp.zeros_like(u), u) if regex.search(name) else u
    updates = jax.tree_util.tree_map_with_path(mask, updates)
    return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))
  return optax.GradientTransformation(init_fn, update_fn)


LAST_LAYER = r'(^|/)dino_head/last_layer/'


# ------------------------------------------------------------------------------------------------------ task

DIAGNOSTICS = ('teacher_entropy', 'teacher_batch_entropy', 'kl')
# The loss, gradient norm and learning rate, plus `collapse_diagnostics` averaged over the logging window. Built with
# type() because clu reads the metric classes from the class's own real annotations, which this module's future
# import would turn into strings.
DinoTrainMetrics = flax.struct.dataclass(type('DinoTrainMetrics', (metrics.LossTrainMetrics,), {
    '__annotations__': {**metrics.LossTrainMetrics.__annotations__,
                        **{name: metrics.FiniteAverage.from_output(name) for name in DIAGNOSTICS}},
    '__module__': __name__}))


@base.register_task
@dataclasses.dataclass(frozen=True)
class Dino(base.Task):
  """DINO self-distillation with a momentum teacher, centring and sharpening (see the module docstring)."""
  name = 'dino'
  train_metrics = DinoTrainMetrics
  eval_metrics = None
  evaluators = ('knn', 'linear_probe')

  out_dim: int = 65536
  total_steps: int = 1
  steps_per_epoch: int = 1
  student_temp: float = 0.1
  teacher_temp: float = 0.04
  warmup_teacher_temp: float = 0.04
  warmup_teacher_temp_epochs: int = 0
  momentum_teacher: float = 0.996
  center_momentum: float = 0.9
  freeze_last_layer_epochs: int = 1
  clip_grad: float = 3.0

  @classmethod
  def config_defaults(cls) -> dict[str, Any]:
    return dict(
        student_temp=0.1,                # Student softmax temperature.
        teacher_temp=0.04,               # Teacher temperature after the warm-up.
        warmup_teacher_temp=0.04,        # Teacher temperature at epoch 0, then linear per epoch to teacher_temp.
        warmup_teacher_temp_epochs=0,    # Length of that warm-up (DINO's "boost": 0.04 -> 0.07 over 30 epochs).
        momentum_teacher=0.996,          # Teacher EMA momentum at step 0; a cosine takes it to 1 at the end.
        center_momentum=0.9,             # Momentum of the centre of the teacher outputs.
        freeze_last_layer_epochs=1,      # Epochs during which dino_head/last_layer is not trained.
        clip_grad=3.0,                   # Per-parameter gradient-norm clipping (DINO's clip_gradients); 0: none.
    )

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    from vit_jax import models  # pylint: disable=g-import-not-at-top
    c = config.task.dino
    overrides = {k: v for k, v in config.model.items() if k != 'name'}
    model = models.create_model(config.model.name, num_classes=0, **overrides)
    if not hasattr(model, 'forward_crops') or not hasattr(model, 'out_dim'):
      dino_models = ', '.join(models.list_models('dino_*'))
      raise ValueError(f"config.task.name='dino' needs a model with a DINO head, but config.model.name="
                       f'{config.model.name!r} has none. Use one of: {dino_models}.')
    if config.dataset.train_crop != 'multicrop':
      raise ValueError(f"config.task.name='dino' trains on multi-crop views: set config.dataset.train_crop="
                       f"'multicrop' (got {config.dataset.train_crop!r}).")
    patch = getattr(model, 'patch_size', 1)
    if config.dataset.local_crops and config.dataset.local_image_size % patch:
      raise ValueError(f'config.dataset.local_image_size={config.dataset.local_image_size} is not divisible by the '
                       f'patch size {patch}; use a multiple of it (DINO: 96 px at patch 16 or 8).')
    for key in ('student_temp', 'teacher_temp', 'warmup_teacher_temp'):
      if not c[key] > 0:
        raise ValueError(f'config.task.dino.{key}={c[key]} must be > 0.')
    if not 0.0 <= c.momentum_teacher <= 1.0 or not 0.0 <= c.center_momentum < 1.0:
      raise ValueError(f'config.task.dino.momentum_teacher={c.momentum_teacher} must be in [0, 1] and '
                       f'center_momentum={c.center_momentum} in [0, 1).')
    if c.warmup_teacher_temp_epochs < 0 or c.freeze_last_layer_epochs < 0 or c.clip_grad < 0:
      raise ValueError('config.task.dino.warmup_teacher_temp_epochs, freeze_last_layer_epochs and clip_grad must be '
                       f'>= 0; got {c.warmup_teacher_temp_epochs}, {c.freeze_last_layer_epochs}, {c.clip_grad}.')

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: Any, dataset_info: Any) -> Dino:
    dino = config.task.dino
    return cls(out_dim=model.out_dim, total_steps=config.total_steps,
               steps_per_epoch=max(dataset_info.num_train_examples // config.batch_size, 1),
               student_temp=dino.student_temp, teacher_temp=dino.teacher_temp,
               warmup_teacher_temp=dino.warmup_teacher_temp,
               warmup_teacher_temp_epochs=dino.warmup_teacher_temp_epochs, momentum_teacher=dino.momentum_teacher,
               center_momentum=dino.center_momentum, freeze_last_layer_epochs=dino.freeze_last_layer_epochs,
               clip_grad=dino.clip_grad)

  # ------------------------------------------------------------------------------------------------ state
  @classmethod
  def init_variables(cls, model: Any, rng: jax.Array, image_size: int) -> dict[str, Any]:
    """Backbone + DINO head only (through `project`): no classifier is created whatever num_classes is. (A model
    without a DINO head is initialised as usual, so that `check_config` can name the problem.)"""
    dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    method = 'project' if hasattr(model, 'project') else None
    return dict(model.init({'params': rng}, dummy, train=False, method=method))

  def init_extra(self, variables: Any, rng: jax.Array) -> dict[str, Any]:
    """The teacher (a copy of the student's params, boxed alike) and the centre (1, out_dim) of zeros."""
    del rng
    return {'teacher': jax.tree.map(lambda x: x, variables['params']),
            'center': jnp.zeros((1, self.out_dim), jnp.float32)}

  def create_optimizer(self, config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                                          optax.Schedule]:
    """Per-parameter clipping, then the configured optimizer, with dino_head/last_layer frozen for the first
    freeze_last_layer_epochs epochs (its gradient zeroed before the optimizer and its update after, so it gets
    neither moments nor weight decay)."""
    from vit_jax import optim  # pylint: disable=g-import-not-at-top
    tx, schedule = optim.create_optimizer(config.optimizer, config.total_steps, family=base.model_family(config))
    freeze = self.freeze_last_layer_epochs * self.steps_per_epoch
    parts = [clip_per_parameter(self.clip_grad)] if self.clip_grad else []
    if freeze:
      parts += [zero_until(LAST_LAYER, freeze), tx, zero_until(LAST_LAYER, freeze)]
    else:
      parts.append(tx)
    return optax.chain(*parts), schedule

  # ------------------------------------------------------------------------------------------------- step
  def teacher_temperature(self, step: Any) -> jax.Array:
    return teacher_temperature(step, steps_per_epoch=self.steps_per_epoch, warmup_temp=self.warmup_teacher_temp,
                               temp=self.teacher_temp, warmup_epochs=self.warmup_teacher_temp_epochs)

  def prepare_batch(self, ctx: base.StepContext, batch: base.Batch, rng: jax.Array) -> base.Batch:
    """Adds 'teacher': the teacher's outputs (B, 2, out_dim) on the 2 global views of the whole batch."""
    del rng
    views = [batch['image'][:, 0], batch['image'][:, 1]]
    teacher, _ = ctx.apply(ctx.extra['teacher'], views, train=False, method='forward_crops')
    return {**batch, 'teacher': jax.lax.stop_gradient(teacher).swapaxes(0, 1)}

  def loss(self, ctx: base.StepContext, params: Any, batch: base.Batch,
           rng: jax.Array) -> tuple[jax.Array, base.Outputs, dict[str, Any]]:
    crops = [batch['image'][:, 0], batch['image'][:, 1]]
    crops += [batch['local_image'][:, i] for i in range(batch['local_image'].shape[1])]
    student, model_state = ctx.apply(params, crops, train=True, rngs={'dropout': rng}, method='forward_crops')
    teacher_out, teacher_temp = batch['teacher'].swapaxes(0, 1), self.teacher_temperature(ctx.step)
    loss, _ = dino_loss(student, teacher_out, ctx.extra['center'], student_temp=self.student_temp,
                        teacher_temp=teacher_temp, center_momentum=self.center_momentum)
    diagnostics = collapse_diagnostics(teacher_out, ctx.extra['center'], loss, teacher_temp=teacher_temp)
    return loss, {'loss': loss, **diagnostics}, model_state

  def after_update(self, state: Any, batch: base.Batch, outputs: base.Outputs) -> Any:
    """Teacher EMA with the momentum of the update just made (step - 1), and the centre of its outputs."""
    del outputs
    m = cosine_schedule(state.step - 1, base=self.momentum_teacher, final=1.0, total_steps=self.total_steps)
    teacher = jax.tree.map(lambda t, s: m * t + (1 - m) * s, state.extra['teacher'], state.params)
    center = update_center(state.extra['center'], batch['teacher'].swapaxes(0, 1), self.center_momentum)
    return state.replace(extra={'teacher': teacher, 'center': center})

  # ------------------------------------------------------------------------------------------------- eval
  def eval_variables(self, state: Any) -> dict[str, Any]:
    """The teacher: DINO evaluates (k-NN, linear probe) the teacher's backbone."""
    return {'params': state.extra['teacher']}
