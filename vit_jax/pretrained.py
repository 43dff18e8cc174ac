"""Loading and exporting the published ViT checkpoints (.npz) exactly as released.

Handles the original google-research/vision_transformer files (old block numbering) and big_vision files
(new numbering, top-level `pos_embedding` without a class-token slot, `params/` prefix, scan-stacked blocks).
Hybrid (R+ViT) files add the BiT ResNet stem at the top level (`conv_root`, `gn_root`, `block{i}/unit{j}/...`);
their GroupNorm scale/bias are stored as (1, 1, 1, C) and load as (C,).
Flat '/'-joined .npz files of any registry model (e.g. written by `vit_jax.convert`) load the same way.
Fine-tuning at another resolution: position embeddings (ViT, DeiT) and Swin v1 bias tables are resized on load.
Every load is all-or-nothing: unknown, missing or mis-shaped parameters raise a ValueError.
"""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Optional

from absl import logging
from etils import epath
import flax
from flax import traverse_util
import jax
import numpy as np
import scipy.ndimage

_POSEMB = 'Transformer/posembed_input/pos_embedding'
# Block submodule names in the original .npz files -> names used by the model (and by big_vision).
_OLD_TO_NEW = {
    'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
    'LayerNorm_2': 'LayerNorm_1',
    'MlpBlock_3': 'MlpBlock_0',
}
_NEW_TO_OLD = {v: k for k, v in _OLD_TO_NEW.items()}
_PREFIXES = ('params/', 'opt/target/')
_BLOCK_RE = re.compile(r'^Transformer/encoderblock_\d+$')
_MAP_PARTS = ('probe', 'MultiHeadDotProductAttention_0', 'LayerNorm_0', 'MlpBlock_0')
# GroupNorm params of the hybrids' ResNet stem, which the original files store as (1, 1, 1, C).
_STEM_GN_RE = re.compile(r'^(gn_root|block\d+/unit\d+/gn(\d+|_proj))/(scale|bias)$')


def _is_stem_gn(key: str) -> bool:
  return bool(_STEM_GN_RE.match(key))


def _rename_block_parts(key: str, mapping: Mapping[str, str]) -> str:
  """Renames the submodule right under `Transformer/encoderblock_i` according to `mapping`."""
  parts = key.split('/')
  if len(parts) > 2 and _BLOCK_RE.match('/'.join(parts[:2])):
    parts[2] = mapping.get(parts[2], parts[2])
  return '/'.join(parts)


def _flatten_params(params: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
  """'/'-joined flat dict of a params tree; also says whether it was wrapped in {'params': ...}."""
  params = flax.core.unfreeze(params)
  wrapped = set(params) == {'params'} and isinstance(params['params'], Mapping)
  return traverse_util.flatten_dict(params['params'] if wrapped else params, sep='/'), wrapped


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an .npz file (local or gs://), loaded without pickle."""
  with epath.Path(path).open('rb') as f:
    with np.load(f, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}


def _normalise_keys(ckpt: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], bool]:
  """Maps every known checkpoint layout onto the model's names.

  Returns the renamed arrays and whether their pos_embedding includes a class-token slot.
  """
  for prefix in _PREFIXES:
    if any(k.startswith(prefix) for k in ckpt):
      dropped = sorted(k for k in ckpt if not k.startswith(prefix))
      if dropped:
        logging.info('load_pretrained: ignoring %d entries outside %r, e.g. %s', len(dropped), prefix, dropped[:3])
      ckpt = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
      break

  out: dict[str, np.ndarray] = {}

  def put(key: str, value: np.ndarray) -> None:
    if key in out:
      raise ValueError(f'Checkpoint holds {key!r} twice (under different layouts); cannot tell which to load.')
    out[key] = value

  stacked = 'Transformer/encoderblock/'
  for key, value in ckpt.items():
    if key.startswith(stacked):  # big_vision scan layout: leading layer dimension.
      for i, layer in enumerate(value):
        put(_rename_block_parts(f'Transformer/encoderblock_{i}/{key[len(stacked):]}', _OLD_TO_NEW), layer)
    elif _is_stem_gn(key) and value.ndim == 4 and value.shape[:3] == (1, 1, 1):
      put(key, value.reshape(value.shape[-1]))  # Old flax GroupNorm layout (1, 1, 1, C) -> (C,).
    else:
      put(_rename_block_parts(key, _OLD_TO_NEW), value)

  has_cls_slot = 'cls' in out
  if 'pos_embedding' in out:  # big_vision: added before the class token is concatenated, so no cls slot.
    put(_POSEMB, out.pop('pos_embedding'))
    has_cls_slot = False
  if 'probe' in out:  # big_vision ViT-g development files had the MAP head inlined at the top level.
    for part in _MAP_PARTS:
      for key in [k for k in out if k == part or k.startswith(part + '/')]:
        put('MAPHead_0/' + key, out.pop(key))
  return out, has_cls_slot


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) matrix of PyTorch's bicubic resize along one axis (F.interpolate(mode='bicubic'),
  align_corners=False, no antialias): Keys cubic with a = -0.75, source x = (i + 0.5) * in / out - 0.5, taps
  clamped to the border: the official Swin loader's bias-table resize. jax.image.resize's 'bicubic' is a different
  kernel (a = -0.5, PIL-style, as torch's antialias=True bicubic that timm uses for position embeddings)."""
  a = -0.75
  def near(t):  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1
  def far(t):  # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    x = (i + 0.5) * in_size / out_size - 0.5
    x0 = int(np.floor(x))
    t = x - x0
    for k, w in ((-1, far(t + 1)), (0, near(t)), (1, near(1 - t)), (2, far(2 - t))):
      m[i, min(max(x0 + k, 0), in_size - 1)] += w
  return m


def _resize_grid(grid: np.ndarray, new_hw: tuple[int, int], method: str) -> np.ndarray:
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
  logging.info('Resizing position embedding grid %dx%d -> %dx%d (%s).', gs_old, gs_old, gs_new, gs_new, method)
  grid = _resize_grid(grid.reshape(gs_old, gs_old, -1), (gs_new, gs_new), method)
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
  logging.info('Resizing relative-position bias table %dx%d -> %dx%d (bicubic).', side_old, side_old, side_new,
               side_new)
  grid = _resize_grid(table.reshape(side_old, side_old, -1), (side_new, side_new), 'bicubic_torch')
  return grid.reshape(new_rows, -1).astype(table.dtype)

_SCANNED = 'Transformer/encoderblock/'


def _unstack_scanned(init: dict[str, Any]) -> tuple[dict[str, Any], int]:
  """A scanned model's stacked `Transformer/encoderblock/*` (leading layer axis) as per-layer shape entries."""
  stacked = {k: v for k, v in init.items() if k.startswith(_SCANNED)}
  if not stacked:
    return init, 0
  depth = {v.shape[0] for v in stacked.values()}.pop()
  out = {k: v for k, v in init.items() if k not in stacked}
  for key, value in stacked.items():
    for i in range(depth):
      out[f'Transformer/encoderblock_{i}/{key[len(_SCANNED):]}'] = jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
  return out, depth


def _restack_scanned(flat: dict[str, Any], depth: int) -> dict[str, Any]:
  """Inverse of `_unstack_scanned` on loaded arrays."""
  prefix = re.compile(r'^Transformer/encoderblock_(\d+)/')
  out = {k: v for k, v in flat.items() if not prefix.match(k)}
  for key in [k for k in flat if k.startswith('Transformer/encoderblock_0/')]:
    rest = key[len('Transformer/encoderblock_0/'):]
    out[_SCANNED + rest] = np.stack([flat[f'Transformer/encoderblock_{i}/{rest}'] for i in range(depth)])
  return out


def _group(keys, name: str) -> set[str]:
  return {k for k in keys if k == name or k.startswith(name + '/')}


def load_pretrained(path: str | Mapping[str, Any], init_params: Mapping[str, Any], *,
                    keep_pre_logits: Optional[bool] = None, posemb_interpolation: str = 'linear',
                    reinit_head: bool = False) -> Any:
  """Loads a published ViT .npz (or a params tree / flat '/'-keyed dict of arrays) into `init_params`' structure.

  The head (and DeiT's `head_dist`) is taken from the file when its shape matches and not `reinit_head`, else
  init_params' head is kept (new class count).
  `pre_logits` (the representation layer) is loaded when the model has one, as the official loader does;
  keep_pre_logits=True also requires it in the file (teachers), False keeps the model's freshly initialised layer,
  and a file without one (None) keeps it with a warning. Position embeddings (after the
  class / distillation token rows) are resized to the model's grid with `posemb_interpolation` ('linear',
  'bilinear', 'bicubic', 'bicubic_torch'); Swin v1 relative-position bias tables of another window size are
  resized bicubically per head (`resize_rel_pos_bias_table`). SwinV2 needs no resizing: its continuous bias works
  at any window (set the model's `pretrained_window_size` to the checkpoint's window). Any other missing, unexpected
  or mis-shaped parameter raises a ValueError. Loaded leaves are numpy arrays in init_params' dtypes; kept
  leaves are init_params' own. `init_params` may be wrapped as {'params': ...}; the result is wrapped alike.
  A model with scanned layers (`scan_layers=True`, stacked `Transformer/encoderblock/*`) gets the blocks stacked.
  """
  init, wrapped = _flatten_params(init_params)
  init, scanned_depth = _unstack_scanned(init)
  arrays = _read_npz(path) if isinstance(path, (str, os.PathLike)) else _flatten_params(path)[0]
  path = path if isinstance(path, (str, os.PathLike)) else 'the given params'
  ckpt, has_cls_slot = _normalise_keys({k: np.asarray(v) for k, v in arrays.items()})
  keep_init: set[str] = set()

  for head in ('head', 'head_dist'):
    head_file, head_init = _group(ckpt, head), _group(init, head)
    if head_init:
      if (reinit_head or head_file != head_init
          or any(ckpt[k].shape != tuple(init[k].shape) for k in head_init)):
        desc = {k: ckpt[k].shape for k in sorted(head_file)} or 'none'
        logging.warning('load_pretrained: keeping the freshly initialised %s %s; checkpoint %s: %s.', head,
                        {k: tuple(init[k].shape) for k in sorted(head_init)}, head, desc)
        keep_init |= head_init
        for k in head_file:
          del ckpt[k]
    elif head_file:
      logging.info('load_pretrained: model has no %s; dropping the checkpoint %s.', head, head)
      for k in head_file:
        del ckpt[k]

  # MAE's fine-tuning head (classifier='gap_fc_norm'): the model normalises after pooling (`fc_norm`) and has no
  # final encoder norm. As in the official MAE fine-tuning, a pretrained encoder's final norm is dropped and a
  # missing fc_norm starts fresh.
  fc_init, final_norm = _group(init, 'fc_norm'), 'Transformer/encoder_norm'
  if fc_init and not _group(ckpt, 'fc_norm'):
    logging.info('load_pretrained: the checkpoint has no fc_norm; keeping the freshly initialised one.')
    keep_init |= fc_init
  if fc_init and _group(ckpt, final_norm) and not _group(init, final_norm):
    logging.info('load_pretrained: dropping the checkpoint %s (the model normalises after pooling).', final_norm)
    for k in _group(ckpt, final_norm):
      del ckpt[k]

  pre_file, pre_init = _group(ckpt, 'pre_logits'), _group(init, 'pre_logits')
  if pre_file and (not pre_init or keep_pre_logits is False):
    why = 'keep_pre_logits=False' if pre_init else 'the model has no representation layer'
    logging.info('load_pretrained: dropping the checkpoint pre_logits (%s).', why)
    for k in pre_file:
      del ckpt[k]
  if pre_init and (keep_pre_logits is False or (keep_pre_logits is None and not pre_file)):
    logging.warning('load_pretrained: keeping the freshly initialised pre_logits layer (%s).',
                    'keep_pre_logits=False' if pre_file else 'the checkpoint has none')
    keep_init |= pre_init

  missing = sorted(set(init) - set(ckpt) - keep_init)
  unexpected = sorted(set(ckpt) - set(init))
  if missing or unexpected:
    raise ValueError(f'Checkpoint {path} does not match the model. Missing from the checkpoint: {missing}. '
                     f'Not in the model: {unexpected}. Check the model name/options (classifier, '
                     'representation_size, posemb) against the checkpoint.')

  if _POSEMB in ckpt:
    pe, want = ckpt[_POSEMB], tuple(init[_POSEMB].shape)
    model_has_cls = 'cls' in init
    if model_has_cls and not has_cls_slot:  # big_vision: zero slot == "no posemb on the class token".
      pe = np.concatenate([np.zeros_like(pe[:, :1]), pe], axis=1)
    if pe.ndim == 3 and pe.shape[2] == want[2] and pe.shape[1] != want[1]:
      prefix = int(model_has_cls) + int('dist' in init)  # DeiT: class and distillation tokens.
      pe = resize_posemb(pe, want[1], num_prefix_tokens=prefix, method=posemb_interpolation)
    ckpt[_POSEMB] = pe
  for key in ckpt:  # Swin v1 fine-tuned at another window: resize the bias tables (bicubic, as the reference).
    if (key.endswith('/relative_position_bias_table') and ckpt[key].ndim == 2 and len(init[key].shape) == 2
        and ckpt[key].shape[1] == init[key].shape[1] and ckpt[key].shape[0] != init[key].shape[0]):
      ckpt[key] = resize_rel_pos_bias_table(ckpt[key], init[key].shape[0])

  mismatched = [f'{k}: checkpoint {ckpt[k].shape} vs model {tuple(init[k].shape)}'
                for k in sorted(ckpt) if ckpt[k].shape != tuple(init[k].shape)]
  if mismatched:
    raise ValueError(f'Checkpoint {path} has parameters of the wrong shape: ' + '; '.join(mismatched) +
                     '. Check the model variant (width, depth, patch size) against the checkpoint.')

  flat = {k: init[k] if k in keep_init else np.asarray(ckpt[k], dtype=init[k].dtype) for k in init}
  if scanned_depth:
    flat = _restack_scanned(flat, scanned_depth)
  params = traverse_util.unflatten_dict(flat, sep='/')
  return {'params': params} if wrapped else params


def save_npz_official(params: Mapping[str, Any], path: str) -> None:
  """Writes `params` as an .npz in the original vision_transformer layout.

  Old block numbering; the hybrids' stem GroupNorm scale/bias are written as (1, 1, 1, C) like the released files.
  """
  flat, _ = _flatten_params(params)
  arrays = {}
  for k, v in flat.items():
    v = np.asarray(v)
    if _is_stem_gn(k) and v.ndim == 1:
      v = v.reshape(1, 1, 1, -1)
    arrays[_rename_block_parts(k, _NEW_TO_OLD)] = v
  with epath.Path(path).open('wb') as f:
    np.savez(f, **arrays)
