"""Exponential moving average of the model's variables (`config.ema_decay`), kept in the train state.

ema <- decay * ema + (1 - decay) * value after every update, for the params and (BatchNorm models) the running
statistics, starting from the initial (or loaded) variables. When enabled it is what evaluation uses, and it is
saved in checkpoints with the rest of the state.
"""
from __future__ import annotations

from typing import Any

import jax


def update(ema_tree: Any, tree: Any, decay: float) -> Any:
  """One EMA step, in the EMA's dtypes."""
  return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema_tree, tree)


def eval_variables(state: Any) -> dict[str, Any]:
  """The model variables to evaluate: {'params'} plus 'batch_stats' when the model has them; the EMA's when the
  state keeps one, else the raw ones."""
  ema_params = getattr(state, 'ema_params', None)
  variables = {'params': state.params if ema_params is None else ema_params}
  stats = getattr(state, 'ema_batch_stats', None)
  stats = getattr(state, 'batch_stats', None) if stats is None else stats
  if stats is not None:
    variables['batch_stats'] = stats
  return variables
