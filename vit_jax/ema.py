"""Exponential moving average of the parameters (`config.ema_decay`), kept in the train state.

ema <- decay * ema + (1 - decay) * params after every update, starting from the initial (or loaded) params. When
enabled it is what evaluation uses, and it is saved in checkpoints with the rest of the state.
"""
from __future__ import annotations

from typing import Any

import jax


def update(ema_params: Any, params: Any, decay: float) -> Any:
  """One EMA step, in the EMA's dtypes."""
  return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema_params, params)


def eval_params(state: Any) -> Any:
  """The params to evaluate: the EMA when the state keeps one, else the raw params."""
  return state.params if getattr(state, 'ema_params', None) is None else state.ema_params
