"""Guards against bad runs: non-finite updates are either skipped on device or stop the run naming the step.

`train_step` reports a per-step `nonfinite_updates` flag (1 when the loss, the gradient norm or the updated
parameters' norm is not finite); in
skip mode it also keeps the previous params and optimizer state for such a step (`keep_if_finite`). The loop feeds
the per-step flags to a `NonFiniteMonitor`, which checks them on the host only at log, eval and checkpoint
boundaries (no per-step device sync) and, in stop mode, raises before a non-finite state could be saved.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

NONFINITE_MODES = ('stop', 'skip')


class NonFiniteError(FloatingPointError):
  """The loss or gradient norm became nan/inf; the message names the first such step."""


def is_finite(loss: jax.Array, grad_norm: jax.Array, param_norm: Optional[jax.Array] = None) -> jax.Array:
  """Scalar bool: the mean loss, the gradient norm and (given) the updated parameters' global norm are finite.

  The parameters' norm is what catches an update that overflows although its gradient was finite (e.g. an
  infinite float32 learning rate): it is one reduction on device, and the state it guards is never saved.
  """
  finite = jnp.isfinite(jnp.mean(loss)) & jnp.isfinite(grad_norm)
  return finite if param_norm is None else finite & jnp.isfinite(param_norm)


def keep_if_finite(finite: jax.Array, new_state: Any, old_state: Any) -> Any:
  """`new_state` if `finite`, else `old_state` with only its step advanced (the update is skipped, data consumed)."""
  kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
  return kept.replace(step=new_state.step)


class NonFiniteMonitor:
  """Collects per-step device flags and checks them on the host at boundaries."""

  def __init__(self, mode: str, workdir: str):
    if mode not in NONFINITE_MODES:
      raise ValueError(f'config.on_nonfinite={mode!r}; choose one of {NONFINITE_MODES}.')
    self.mode, self._workdir = mode, workdir
    self._pending: list[tuple[int, jax.Array]] = []

  def add(self, step: int, flag: jax.Array) -> None:
    if self.mode == 'stop':
      self._pending.append((step, flag))

  def check(self, last_good_step: Optional[int]) -> None:
    """In stop mode raises NonFiniteError naming the first non-finite step since the previous check."""
    pending, self._pending = self._pending, []
    if not pending:
      return
    flags = np.asarray(jax.device_get([f for _, f in pending]))
    bad = [step for (step, _), f in zip(pending, flags) if f > 0]
    if bad:
      where = (f'The last good checkpoint, step {last_good_step}, is kept in {self._workdir}/checkpoints; '
               if last_good_step is not None else 'No checkpoint had been saved yet; ')
      raise NonFiniteError(
          f'Non-finite loss, gradient norm or parameters at step {bad[0]} ({len(bad)} such step(s) up to step '
          f'{pending[-1][0]}). '
          f'{where}no non-finite state was saved. Fix: lower config.optimizer.lr, raise the warmup, enable '
          "config.optimizer.grad_clip_norm, check the input data, or set config.on_nonfinite='skip' to skip such "
          'updates (they are counted in train_nonfinite_updates).')
