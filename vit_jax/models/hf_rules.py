"""Conversion functions (`facts.Rule` callables) for tensor layouts the built-in kinds do not cover.

Hugging Face transformers' newer attention modules keep q, k, v and o as separate Linear layers (q_proj, ...), and
video models embed tubelets with a 3-D convolution. Names no family: family files use these in their tables.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np


def _heads(path: str, shapes: Mapping[str, Any], key: str) -> tuple[int, int]:
  """(heads, head_dim) of the attention module owning `path` (its query kernel is (D, heads, head_dim))."""
  query = path.rsplit('/', 1)[0] + '/query/kernel'
  if query not in shapes:
    raise ValueError(f'{key}: the model has no attention projection {query} to put it in.')
  return int(shapes[query].shape[1]), int(shapes[query].shape[2])


def head_projection(key: str, value: np.ndarray, path: str, shapes: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A separate q/k/v (path ends in query/key/value) or output (path ends in /out) Linear -> flax attention.

  q/k/v: weight (H*Dh, D) -> kernel (D, H, Dh), bias (H*Dh,) -> (H, Dh); out: weight (D, H*Dh) -> (H, Dh, D).
  """
  heads, head_dim = _heads(path, shapes, key)
  leaf = key.rsplit('.', 1)[-1]
  if path.endswith('/out'):
    if leaf == 'bias':
      return {f'{path}/bias': value}
    return {f'{path}/kernel': value.T.reshape(heads, head_dim, -1)}
  if leaf == 'bias':
    return {f'{path}/bias': value.reshape(heads, head_dim)}
  return {f'{path}/kernel': value.T.reshape(-1, heads, head_dim)}


def conv3d(key: str, value: np.ndarray, path: str, shapes: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A PyTorch Conv3d: weight (O, I, T, H, W) -> flax kernel (T, H, W, I, O); bias as is."""
  del shapes
  if key.endswith('.bias'):
    return {f'{path}/bias': value}
  if value.ndim != 5:
    raise ValueError(f'{key}: expected a Conv3d weight (O, I, T, H, W), got shape {value.shape}.')
  return {f'{path}/kernel': value.transpose(2, 3, 4, 1, 0)}
