"""Resizing position tables to another geometry (fine-tuning at a new resolution or window): numpy and jax only.

The family files' `resize` facts and `vit_jax.pretrained` use these; they were written for ViT position
embeddings and Swin bias tables but name no model.
"""
from __future__ import annotations

import logging
import math
from typing import Optional

import jax
import numpy as np
import scipy.ndimage

_log = logging.getLogger(__name__)


def _torch_bicubic_rows(in_size: int, src: np.ndarray) -> np.ndarray:
  """(len(src), in_size) rows of Keys' cubic convolution (a = -0.75, torch's) sampling the source positions `src`,
  the 4 taps clamped to the border."""
  a = -0.75
  def near(t):  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1
  def far(t):  # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  start = np.floor(src)
  t = src - start
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)
  taps = np.clip(start[:, None].astype(np.int64) + np.arange(-1, 3)[None], 0, in_size - 1)
  m = np.zeros((len(src), in_size), np.float64)
  for k in range(4):
    np.add.at(m, (np.arange(len(src)), taps[:, k]), weights[:, k])
  return m


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of PyTorch's bicubic resize along one axis (F.interpolate(mode='bicubic', size=...),
  align_corners=False, no antialias): source x = (i + 0.5) * in / out - 0.5: the official Swin loader's bias-table
  resize. jax.image.resize's 'bicubic' is a different kernel (a = -0.5, PIL-style, as torch's antialias=True
  bicubic that timm uses for position embeddings)."""
  return _torch_bicubic_rows(in_size, (np.arange(out_size) + 0.5) * in_size / out_size - 0.5)


def torch_bicubic_matrix_by_scale(in_size: int, scale_factor: float) -> np.ndarray:
  """The same resize as torch's F.interpolate(mode='bicubic', scale_factor=...): out_size = floor(in * scale) and
  output i samples (i + 0.5) / scale_factor - 0.5 (the given factor, not in / out), as DINO's position tables."""
  if scale_factor <= 0:
    raise ValueError(f'scale_factor must be positive, got {scale_factor}.')
  out_size = int(math.floor(in_size * scale_factor))
  if out_size < 1:
    raise ValueError(f'Resizing {in_size} by scale_factor {scale_factor} leaves no output sample; use a larger '
                     'scale factor.')
  return _torch_bicubic_rows(in_size, (np.arange(out_size) + 0.5) / scale_factor - 0.5)


def resize_grid(grid: np.ndarray, new_hw: tuple[int, int], method: str) -> np.ndarray:
  """Resizes an (h, w, C) grid to new_hw with 'linear' (scipy zoom order 1, as the official ViT loader),
  'bilinear' / 'bicubic' (jax.image.resize) or 'bicubic_torch' (torch bicubic, as timm and official Swin)."""
  h, w, c = grid.shape
  if method == 'linear':
    return scipy.ndimage.zoom(grid, (new_hw[0] / h, new_hw[1] / w, 1), order=1)
  if method in ('bilinear', 'bicubic'):
    return np.asarray(jax.image.resize(grid, (new_hw[0], new_hw[1], c), method=method))
  if method == 'bicubic_torch':
    mh, mw = torch_bicubic_matrix(h, new_hw[0]), torch_bicubic_matrix(w, new_hw[1])
    return np.einsum('ph,hwc,qw->pqc', mh, grid.astype(np.float64), mw)
  raise ValueError(f"Unknown interpolation {method!r}; expected 'linear', 'bilinear', 'bicubic' or 'bicubic_torch'.")


def resize_posemb(posemb: np.ndarray, new_num_tokens: int, *, has_cls: bool = True,
                  num_prefix_tokens: Optional[int] = None, method: str = 'linear') -> np.ndarray:
  """Resizes a (1, [prefix +] g*g, D) position embedding to (1, new_num_tokens, D) on its square grid.

  The prefix rows (class token; class + distillation tokens for DeiT: `num_prefix_tokens=2`, which overrides
  `has_cls`) are kept as they are. Methods: 'linear' (scipy.ndimage.zoom(order=1), as the official ViT loader),
  'bilinear' / 'bicubic' (jax.image.resize; 'bicubic' equals timm's resample_abs_pos_embed, torch bicubic with
  antialias=True, to 1e-6 when upsampling), 'bicubic_torch' (torch bicubic without antialias, a = -0.75).
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'Expected a position embedding of shape (1, tokens, D), got {posemb.shape}.')
  if posemb.shape[1] == new_num_tokens:
    return posemb
  extra = (1 if has_cls else 0) if num_prefix_tokens is None else num_prefix_tokens
  tok, grid = posemb[:, :extra], posemb[0, extra:]
  gs_old, gs_new = int(round(np.sqrt(len(grid)))), int(round(np.sqrt(max(new_num_tokens - extra, 0))))
  if gs_old ** 2 != len(grid) or gs_new ** 2 != new_num_tokens - extra or not gs_new:
    raise ValueError(f'Cannot resize position embedding {posemb.shape} to {new_num_tokens} tokens '
                     f'({extra} prefix tokens): both patch grids must be square.')
  _log.info('Resizing position embedding grid %dx%d -> %dx%d (%s).', gs_old, gs_old, gs_new, gs_new, method)
  grid = resize_grid(grid.reshape(gs_old, gs_old, -1), (gs_new, gs_new), method)
  grid = grid.reshape(1, gs_new * gs_new, -1).astype(posemb.dtype)
  return np.concatenate([tok, grid], axis=1)


def resize_rel_pos_bias_table(table: np.ndarray, new_rows: int) -> np.ndarray:
  """Resizes a Swin v1 relative-position bias table ((2W-1)**2, heads) to (new_rows, heads), new_rows = (2W'-1)**2.

  As the official Swin and timm (square windows) when fine-tuning at another window: each head's (2W-1, 2W-1)
  table is resized with PyTorch's bicubic F.interpolate (align_corners=False), here `torch_bicubic_matrix`.
  """
  table = np.asarray(table)
  if table.ndim != 2:
    raise ValueError(f'Expected a (positions, heads) bias table, got shape {table.shape}.')
  rows, _ = table.shape
  side_old, side_new = int(round(np.sqrt(rows))), int(round(np.sqrt(new_rows)))
  if side_old ** 2 != rows or side_new ** 2 != new_rows or side_old % 2 == 0 or side_new % 2 == 0:
    raise ValueError(f'Cannot resize a relative-position bias table of {rows} rows to {new_rows}: both must be '
                     '(2 * window - 1)**2 for a square window.')
  if rows == new_rows:
    return table
  _log.info('Resizing relative-position bias table %dx%d -> %dx%d (bicubic).', side_old, side_old, side_new,
               side_new)
  grid = resize_grid(table.reshape(side_old, side_old, -1), (side_new, side_new), 'bicubic_torch')
  return grid.reshape(new_rows, -1).astype(table.dtype)


def centre_table(table: np.ndarray, target_rows: int, key: str) -> np.ndarray:
  """Places a v1 bias table built for a clamped (smaller) window at the centre of our full-window table."""
  rows, heads = table.shape
  big = int(round(math.sqrt(target_rows)))
  if big * big != target_rows or big % 2 == 0:
    raise ValueError(f'{key}: unexpected target table with {target_rows} rows.')
  full = (big + 1) // 2  # Our (square) configured window.
  cands = [(h, w) for h in range(1, full + 1) for w in range(1, full + 1) if (2 * h - 1) * (2 * w - 1) == rows]
  square = [c for c in cands if c[0] == c[1]]
  if len(cands) > 1 and square:
    cands = square
  if len(cands) != 1:
    raise ValueError(f'{key}: cannot tell which clamped window a ({rows}, {heads}) bias table belongs to '
                     f'(configured window {full}); candidates {cands}.')
  (h, w), = cands
  out = np.zeros((2 * full - 1, 2 * full - 1, heads), table.dtype)
  out[full - h:full + h - 1, full - w:full + w - 1] = table.reshape(2 * h - 1, 2 * w - 1, heads)
  return out.reshape(-1, heads)
