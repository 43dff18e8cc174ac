"""Classification losses on soft targets, label smoothing, and DeiT's distillation losses.

Targets are probability vectors (B, K), so one-hot labels, smoothed labels and mixup/cutmix mixtures share one loss.
Every function returns per-example float32 losses; the step averages them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

DISTILL_TYPES = ('none', 'soft', 'hard')


def one_hot(labels: jax.Array, num_classes: int, *, smoothing: float = 0.0) -> jax.Array:
  """(B,) int labels -> (B, K) targets; smoothing puts `smoothing / K` on every class and the rest on the label
  (timm/DeiT convention: on = 1 - smoothing + smoothing / K, off = smoothing / K)."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum(targets * log_softmax(logits)); equals the usual CE for one-hot targets. Integer (B,)
  targets are class labels."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  if targets.ndim == logits.ndim - 1:
    return -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return -jnp.sum(targets.astype(jnp.float32) * logp, axis=-1)


def hard_distillation(dist_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """DeiT hard distillation: per-example CE of the distillation head against the teacher's argmax."""
  teacher_labels = jnp.argmax(teacher_logits, axis=-1)
  logp = jax.nn.log_softmax(dist_logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, teacher_labels[:, None], axis=-1)[:, 0]


def soft_distillation(dist_logits: jax.Array, teacher_logits: jax.Array, *, temperature: float) -> jax.Array:
  """DeiT soft distillation as a per-example term whose batch mean is the reference's
  KL(softmax(t/T) || softmax(s/T)) summed over the batch, times T^2, divided by numel = B * K."""
  t = temperature
  logp_s = jax.nn.log_softmax(dist_logits.astype(jnp.float32) / t, axis=-1)
  logp_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t, axis=-1)
  kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
  return kl * (t * t) / dist_logits.shape[-1]


def classification_loss(outputs: jax.Array | tuple[jax.Array, jax.Array], targets: jax.Array, *,
                        teacher_logits: jax.Array | None = None, distill_type: str = 'none',
                        alpha: float = 0.5, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Per-example loss and the logits to score accuracy on.

  `outputs` is the model's train-mode output: logits, or (cls_logits, dist_logits) from a distilled DeiT.
  `targets` are (B, K) probabilities or (B,) integer labels.
  With a teacher: (1 - alpha) * CE(cls, targets) + alpha * distill(dist, teacher) (DeiT's DistillationLoss; a
  single-head student uses its logits for both terms). A two-head student without a teacher trains both heads on
  the targets (the mean of the two CEs); accuracy is then scored on the mean logits, as at inference.
  """
  if distill_type not in DISTILL_TYPES:
    raise ValueError(f'Unknown distillation type {distill_type!r}; choose one of {DISTILL_TYPES}.')
  if isinstance(outputs, (tuple, list)):
    cls_logits, dist_logits = outputs
    eval_logits = (cls_logits + dist_logits) / 2
  else:
    cls_logits = dist_logits = eval_logits = outputs
  base = soft_cross_entropy(cls_logits, targets)
  if distill_type == 'none':
    if dist_logits is not cls_logits:
      base = (base + soft_cross_entropy(dist_logits, targets)) / 2
    return base, eval_logits
  if teacher_logits is None:
    raise ValueError(f'distill_type={distill_type!r} needs teacher logits; set config.distill.model.name and '
                     'config.distill.init_from.')
  if distill_type == 'hard':
    extra = hard_distillation(dist_logits, teacher_logits)
  else:
    extra = soft_distillation(dist_logits, teacher_logits, temperature=temperature)
  return (1.0 - alpha) * base + alpha * extra, eval_logits
