"""Optimizers built from the `optimizer` config: optax chains, schedules and weight-decay masks."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

_SCHEDULES = ('cosine', 'linear', 'constant')
_OPTIMIZERS = ('adamw', 'sgd')


def create_learning_rate_schedule(opt_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine, linear or constant to `lr * end_lr_factor` at `total_steps`."""
  lr, warmup = opt_config.lr, opt_config.warmup_steps
  end_lr = lr * opt_config.end_lr_factor
  if opt_config.schedule not in _SCHEDULES:
    raise ValueError(f'Unknown optimizer.schedule {opt_config.schedule!r}; choose one of {_SCHEDULES}.')
  if not 0 <= warmup <= total_steps:
    raise ValueError(f'optimizer.warmup_steps={warmup} must lie in [0, total_steps={total_steps}]; '
                     'lower the warmup or raise total_steps.')
  decay_steps = max(total_steps - warmup, 1)
  if opt_config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt_config.end_lr_factor)
  elif opt_config.schedule == 'linear':
    decay = optax.linear_schedule(lr, end_lr, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True for weight matrices and conv kernels; biases, norms, embeddings and tokens are never decayed."""
  def is_kernel(path, _):  # The last dict key, so leaves boxed with logical axis names (nn.Partitioned) count too.
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(keys) and keys[-1] == 'kernel'
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(opt_config: ml_collections.ConfigDict,
                     total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain (clip -> optimizer with masked decoupled weight decay) and its lr schedule."""
  schedule = create_learning_rate_schedule(opt_config, total_steps)
  if opt_config.name == 'adamw':
    core = optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, weight_decay=opt_config.weight_decay,
                       mask=weight_decay_mask, mu_dtype=opt_config.mu_dtype)
  elif opt_config.name == 'sgd':
    core = optax.chain(
        optax.add_decayed_weights(opt_config.weight_decay, mask=weight_decay_mask),
        optax.sgd(schedule, momentum=opt_config.b1 or None, accumulator_dtype=opt_config.mu_dtype))
  else:
    raise ValueError(f'Unknown optimizer.name {opt_config.name!r}; choose one of {_OPTIMIZERS}.')
  clip = opt_config.grad_clip_norm
  tx = optax.chain(optax.clip_by_global_norm(clip), core) if clip else core
  return tx, schedule
