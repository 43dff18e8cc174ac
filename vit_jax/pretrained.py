"""Loading and exporting the published ViT checkpoints (.npz) exactly as released.

Handles the original google-research/vision_transformer files (old block numbering) and big_vision files
(new numbering, top-level `pos_embedding` without a class-token slot, `params/` prefix, scan-stacked blocks).
Hybrid (R+ViT) files add the BiT ResNet stem at the top level (`conv_root`, `gn_root`, `block{i}/unit{j}/...`);
their GroupNorm scale/bias are stored as (1, 1, 1, C) and load as (C,).
Flat '/'-joined .npz files of any registry model (e.g. written by `vit_jax.convert`) load the same way.
Fine-tuning at another resolution: tables whose shape depends on the geometry (position embeddings, relative-position
bias tables) are resized on load by the model family's `resize` fact (vit_jax/models/facts.py).
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

from vit_jax.models import facts
from vit_jax.models import registry
# The resize helpers live with the models; importable from here for existing callers.
from vit_jax.models.resize import resize_posemb, resize_rel_pos_bias_table, torch_bicubic_matrix  # noqa: F401

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


def _families(family: Optional[str], model: Any) -> list[facts.FamilyFacts]:
  """`family`'s facts, else those of the families built by `model`'s class, else every registered family's."""
  if family is not None:
    names = [family]
  elif model is not None and registry.families_of(model):
    names = registry.families_of(model)
  else:
    names = facts.known_families()
  return [facts.get_family(n) for n in names]


def fit_tables(ckpt: dict[str, np.ndarray], init: Mapping[str, Any], *, method: str, family: Optional[str] = None,
               model: Any = None, image_size: Optional[int] = None) -> None:
  """Fits, in place, every checkpoint array whose shape differs from the model's by its family's `resize` (position
  embeddings, relative-position tables at another resolution or window). The first family that accepts a path
  resizes it; the rest are left for the shape check."""
  context = facts.ResizeContext(model=model, image_size=image_size, method=method)
  for key in sorted(ckpt):
    want = tuple(init[key].shape) if key in init else None
    if want is None or ckpt[key].shape == want:
      continue
    for fam in [f for f in _families(family, model) if f.resize is not None]:
      fitted = fam.resize(key, ckpt[key], want, context)
      if fitted is not None:
        ckpt[key] = np.asarray(fitted)
        break


def load_pretrained(path: str | Mapping[str, Any], init_params: Mapping[str, Any], *,
                    keep_pre_logits: Optional[bool] = None, posemb_interpolation: str = 'linear',
                    reinit_head: bool = False, family: Optional[str] = None, model: Any = None,
                    image_size: Optional[int] = None) -> Any:
  """Loads a published ViT .npz (or a params tree / flat '/'-keyed dict of arrays) into `init_params`' structure.

  The head (and DeiT's `head_dist`) is taken from the file when its shape matches and not `reinit_head`, else
  init_params' head is kept (new class count).
  `pre_logits` (the representation layer) is loaded when the model has one, as the official loader does;
  keep_pre_logits=True also requires it in the file (teachers), False keeps the model's freshly initialised layer,
  and a file without one (None) keeps it with a warning. Position embeddings (after the
  class / distillation token rows) are resized to the model's grid with `posemb_interpolation` ('linear',
  'bilinear', 'bicubic', 'bicubic_torch'); Swin v1 relative-position bias tables of another window size are
  resized bicubically per head (`resize_rel_pos_bias_table`). SwinV2 needs no resizing: its continuous bias works
  at any window (set the model's `pretrained_window_size` to the checkpoint's window). These fits are the model
  family's `resize` facts: `family` (registry family name) or `model` (the flax module, also passed to `resize`
  with `image_size`) chooses the family; without either, the first family whose `resize` accepts a path fits it.
  Any other missing, unexpected or mis-shaped parameter raises a ValueError. Loaded leaves are numpy arrays in init_params' dtypes; kept
  leaves are init_params' own. `init_params` may be wrapped as {'params': ...}; the result is wrapped alike.
  A model with scanned layers (`scan_layers=True`, stacked `Transformer/encoderblock/*`) gets the blocks stacked.
  """
  init, wrapped = _flatten_params(init_params)
  init, scanned_depth = _unstack_scanned(init)
  arrays = _read_npz(path) if isinstance(path, (str, os.PathLike)) else _flatten_params(path)[0]
  path = path if isinstance(path, (str, os.PathLike)) else 'the given params'
  ckpt, has_cls_slot = _normalise_keys({k: np.asarray(v) for k, v in arrays.items()})
  keep_init: set[str] = set()
  context = facts.ResizeContext(model=model, image_size=image_size, method=posemb_interpolation)
  # Refitting another family's weights (e.g. image -> video) needs to know the target: only the target's family
  # adapts, never every registered family of an unnamed model.
  target_known = family is not None or (model is not None and bool(registry.families_of(model)))
  for fam in [f for f in _families(family, model) if f.adapt_checkpoint is not None and target_known]:
    adapted = fam.adapt_checkpoint(ckpt, init, context)
    if adapted is not None:
      ckpt, keep_init = adapted[0], set(adapted[1])
      break

  for head in sorted({h for f in _families(family, model) for h in f.heads}):
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

  if _POSEMB in ckpt and 'cls' in init and not has_cls_slot:
    # big_vision files add the posemb before the class token: a zero slot == "no posemb on the class token".
    ckpt[_POSEMB] = np.concatenate([np.zeros_like(ckpt[_POSEMB][:, :1]), ckpt[_POSEMB]], axis=1)
  fit_tables(ckpt, init, method=posemb_interpolation, family=family, model=model, image_size=image_size)

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
