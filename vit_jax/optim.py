"""Optimizers built from the `optimizer` config: optax chains, schedules and weight-decay masks."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import param_groups

_SCHEDULES = ('cosine', 'linear', 'constant', 'rsqrt')
_COOLDOWN_SCHEDULES = ('constant', 'rsqrt')  # Schedules that take optimizer.cooldown_steps.
_OPTIMIZERS = ('adamw', 'sgd', 'lars')
LARS_TRUST_COEFFICIENT = 0.001  # MAE's util/lars.py (You et al. 2017).


def warmup_rsqrt_cooldown_schedule(lr: float, *, total_steps: int, warmup_steps: int, cooldown_steps: int,
                                   rsqrt_timescale: int | None) -> optax.Schedule:
  """Zhai et al. 2021 ("Scaling Vision Transformers"), as big_vision: warmup, constant or rsqrt, linear cooldown.

  lr(t) = lr * min(1, t / warmup) * r(t) * min(1, (total_steps - t) / cooldown_steps), where r = 1 for a constant
  schedule (rsqrt_timescale None) and r(t) = sqrt(timescale / (t - warmup + timescale)) after warmup for rsqrt.
  Before its cooldown starts the lr does not depend on total_steps, so a checkpoint taken at step T - c of any longer
  run is a valid start for a cooldown to length T: one run yields several training lengths.
  """
  if not 0 <= cooldown_steps <= total_steps:
    raise ValueError(f'optimizer.cooldown_steps={cooldown_steps} must lie in [0, total_steps={total_steps}].')
  if rsqrt_timescale is not None and rsqrt_timescale <= 0:
    raise ValueError(f'optimizer.rsqrt_timescale={rsqrt_timescale} must be positive.')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    factor = jnp.ones_like(step)
    if rsqrt_timescale is not None:
      shifted = jnp.maximum(step - warmup_steps, 0.0) + rsqrt_timescale
      factor = factor * jnp.sqrt(rsqrt_timescale / shifted)
    if warmup_steps:
      factor = factor * jnp.minimum(1.0, step / warmup_steps)
    if cooldown_steps:
      factor = factor * jnp.clip((total_steps - step) / cooldown_steps, 0.0, 1.0)
    return lr * factor
  return schedule


def cosine_schedule(step: Any, *, base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> jax.Array:
  """DINO's `utils.cosine_scheduler(base, final, ...)[step]`, as a function of a (traced) step.

  Warm-up: np.linspace(warmup_start, base, warmup_steps) (reaches `base` at step warmup_steps - 1); then
  final + (base - final) / 2 * (1 + cos(pi * i / n)) for i = step - warmup_steps of n = total_steps -
  warmup_steps (so `final` itself is never reached). Steps past the end keep the last value.
  """
  if not 0 <= warmup_steps < total_steps:
    raise ValueError(f'warmup_steps={warmup_steps} must lie in [0, total_steps={total_steps}).')
  step = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps - 1)
  n = total_steps - warmup_steps
  cosine = final + 0.5 * (base - final) * (1 + jnp.cos(jnp.pi * (step - warmup_steps) / n))
  if warmup_steps == 0:
    return cosine
  ramp = warmup_start + (base - warmup_start) * step / max(warmup_steps - 1, 1)
  return jnp.where(step < warmup_steps, ramp, cosine)


def create_weight_decay(opt_config: ml_collections.ConfigDict, total_steps: int) -> Any:
  """`weight_decay`, or with `weight_decay_end` set a per-step cosine from one to the other (DINO 0.04 -> 0.4)."""
  end = opt_config.weight_decay_end
  if end is None:
    return opt_config.weight_decay
  if end < 0 or opt_config.weight_decay < 0:
    raise ValueError(f'config.optimizer.weight_decay={opt_config.weight_decay} and weight_decay_end={end} must be '
                     '>= 0.')
  base = opt_config.weight_decay
  return lambda count: cosine_schedule(count, base=base, final=end, total_steps=total_steps)


def create_learning_rate_schedule(opt_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine or linear to `lr * end_lr_factor` at `total_steps`, or constant /
  rsqrt with an optional linear cooldown to 0 over the last `cooldown_steps` (`warmup_rsqrt_cooldown_schedule`)."""
  lr, warmup = opt_config.lr, opt_config.warmup_steps
  end_lr = lr * opt_config.end_lr_factor
  if opt_config.schedule not in _SCHEDULES:
    raise ValueError(f'Unknown optimizer.schedule {opt_config.schedule!r}; choose one of {_SCHEDULES}.')
  if not 0 <= warmup <= total_steps:
    raise ValueError(f'optimizer.warmup_steps={warmup} must lie in [0, total_steps={total_steps}]; '
                     'lower the warmup or raise total_steps.')
  if opt_config.schedule in _COOLDOWN_SCHEDULES:
    timescale = opt_config.rsqrt_timescale if opt_config.schedule == 'rsqrt' else None
    return warmup_rsqrt_cooldown_schedule(lr, total_steps=total_steps, warmup_steps=warmup,
                                          cooldown_steps=opt_config.cooldown_steps, rsqrt_timescale=timescale)
  if opt_config.cooldown_steps:
    raise ValueError(f'optimizer.cooldown_steps={opt_config.cooldown_steps} needs optimizer.schedule in '
                     f'{_COOLDOWN_SCHEDULES}, not {opt_config.schedule!r}; set cooldown_steps=0 or change the '
                     'schedule.')
  decay_steps = max(total_steps - warmup, 1)
  if opt_config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt_config.end_lr_factor)
  else:
    decay = optax.linear_schedule(lr, end_lr, decay_steps)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True for weight matrices and conv kernels; biases, norms, embeddings and tokens are never decayed."""
  def is_kernel(path, _):  # The last dict key, so leaves boxed with logical axis names (nn.Partitioned) count too.
    keys = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(keys) and keys[-1] == 'kernel'
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def create_optimizer(opt_config: ml_collections.ConfigDict, total_steps: int, *, family: Optional[str] = None
                     ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optax chain and its lr schedule: clip -> optimizer with decoupled weight decay -> lr multipliers.

  Weight decay applies to kernels (times `wd_multipliers` rules); `lr_multipliers` rules and `layer_decay` scale
  each parameter's update; parameters matching the `freeze` regex get zero updates and no optimizer state.
  `family` (the model's registry family) chooses the layer grouping for `layer_decay`; None finds it from the
  parameter names.
  """
  schedule = create_learning_rate_schedule(opt_config, total_steps)
  lr_rules, wd_rules = tuple(opt_config.lr_multipliers), tuple(opt_config.wd_multipliers)
  param_groups.check_rules(lr_rules, 'config.optimizer.lr_multipliers')  # Fail now, not inside the first step.
  param_groups.check_rules(wd_rules, 'config.optimizer.wd_multipliers')
  if not 0.0 < opt_config.layer_decay <= 1.0:
    raise ValueError(f'config.optimizer.layer_decay={opt_config.layer_decay} must be in (0, 1] (1 disables).')
  decay = []
  if opt_config.weight_decay or opt_config.weight_decay_end:
    decay = [param_groups.add_decayed_weights(create_weight_decay(opt_config, total_steps),
                                              lambda t: param_groups.wd_multipliers(t, wd_rules))]
  if opt_config.name == 'adamw':  # optax.adamw, with per-parameter decay multipliers.
    core = optax.chain(optax.scale_by_adam(b1=opt_config.b1, b2=opt_config.b2, mu_dtype=opt_config.mu_dtype),
                       *decay, optax.scale_by_learning_rate(schedule))
  elif opt_config.name == 'sgd':
    core = optax.chain(*decay, optax.sgd(schedule, momentum=opt_config.b1 or None,
                                         accumulator_dtype=opt_config.mu_dtype))
  elif opt_config.name == 'lars':  # MAE's linear probe (util/lars.py): trust ratio on >= 2-D params, then momentum.
    trust = optax.masked(optax.scale_by_trust_ratio(trust_coefficient=LARS_TRUST_COEFFICIENT),
                         lambda params: jax.tree.map(lambda p: p.ndim > 1, params))
    core = optax.chain(*decay, trust, optax.trace(decay=opt_config.b1, accumulator_dtype=opt_config.mu_dtype),
                       optax.scale_by_learning_rate(schedule))
  else:
    raise ValueError(f'Unknown optimizer.name {opt_config.name!r}; choose one of {_OPTIMIZERS}.')
  parts = [core]
  if lr_rules or opt_config.layer_decay != 1.0:
    parts.append(param_groups.scale_by_multipliers(
        lambda t: param_groups.lr_multipliers(t, lr_rules, opt_config.layer_decay, family)))
  clip = opt_config.grad_clip_norm
  if clip:
    parts.insert(0, optax.clip_by_global_norm(clip))
  tx = optax.chain(*parts) if len(parts) > 1 else core
  if opt_config.freeze:
    param_groups.frozen_labels({}, opt_config.freeze)  # Validates the regex now.
    tx = optax.multi_transform({'trainable': tx, 'frozen': optax.set_to_zero()},
                               lambda params: param_groups.frozen_labels(params, opt_config.freeze))
  return tx, schedule
