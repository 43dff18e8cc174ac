"""DINO self-distillation (Caron et al. 2021; facebookresearch/dino main_dino.py): loss, centre and schedules.

The pure pieces, usable without the trainer:
- `dino_loss(student_out, teacher_out, center, ...)` -> (loss, new_center): the official `DINOLoss.forward` and its
  `update_center`, over the global batch (under jit the means span every device);
- `cosine_schedule` (from vit_jax.optim): DINO's `utils.cosine_scheduler` at a step (teacher momentum 0.996 -> 1;
  the optimizer's weight decay 0.04 -> 0.4 through optimizer.weight_decay_end);
- `teacher_temperature`: the per-epoch linear warm-up of the teacher temperature (0.04 -> 0.07 over 30 epochs).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

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
  batch_center = jnp.mean(teacher_out, axis=(0, 1)).reshape(center.shape)
  new_center = center * center_momentum + batch_center * (1 - center_momentum)
  return loss, new_center


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
