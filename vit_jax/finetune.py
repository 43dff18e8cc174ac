"""Initialising a model's params from earlier weights: `config.init_from` and the distillation teacher.

A source is one of
  - an .npz file: an official ViT / big_vision checkpoint, or `DIR/params.npz` written by `vit_jax.convert` from a
    timm checkpoint (flat '/'-joined keys), or that DIR itself;
  - a vit_jax workdir (or its `checkpoints/` directory): the params of its latest Orbax checkpoint (its EMA params
    when the run kept an EMA, since those are the ones it evaluated). When the run's model holds more than a
    backbone (e.g. MAE's decoder), the model's `backbone_params(params, image_size)` gives what a classifier loads.
Either way the weights go through `vit_jax.checkpoint.load_pretrained`, which re-initialises the head (and DeiT's
`head_dist`) when the class count changes or `reinit_head` is set, and resizes position embeddings (and whatever
else it knows how to resize, e.g. Swin bias tables) to the new model's resolution.

Models with BatchNorm also carry running statistics (`batch_stats`): `load_variables` reads them from a workdir
(its EMA statistics when the run kept an EMA) or from an .npz whose keys are 'params/...' and 'batch_stats/...'
(converted BatchNorm models); statistics the source lacks keep their initial values (e.g. a new BatchNorm head).
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import numpy as np
from absl import logging
from etils import epath
from flax import traverse_util

from vit_jax import checkpoint

CONVERTED_FILENAME = 'params.npz'  # What `python -m vit_jax.convert --out DIR` writes...
CONVERT_META_FILENAME = 'convert.json'  # ... beside its metadata.


def _checkpoint_dir(path: epath.Path) -> epath.Path:
  """The Orbax step directory root for a workdir or a checkpoints dir."""
  if (path / checkpoint.CHECKPOINT_DIRNAME).is_dir():
    return path / checkpoint.CHECKPOINT_DIRNAME
  return path


def read_workdir_variables(workdir: str) -> dict[str, Any]:
  """{'params'[, 'batch_stats']} of the latest checkpoint in a vit_jax workdir (the EMA's if the run kept one), as
  host arrays."""
  ckpt_dir = _checkpoint_dir(epath.Path(workdir))
  step, state = checkpoint.read_latest_state(ckpt_dir)
  if step is None:
    raise FileNotFoundError(f'{workdir} holds no checkpoint (looked in {ckpt_dir}). Point init_from at a finished '
                            'run\'s workdir, an official .npz or a params.npz from `python -m vit_jax.convert`.')
  logging.info('Read the variables of step %d from %s.', step, ckpt_dir)
  variables = {'params': _backbone_of_run(epath.Path(workdir), state.get('ema_params') or state['params'])}
  stats = state.get('ema_batch_stats') or state.get('batch_stats')
  if stats:
    variables['batch_stats'] = stats
  return variables


def _backbone_of_run(workdir: epath.Path, params: Any) -> Any:
  """`params` as a downstream classifier loads them: the run's model (from the workdir's config.json) may declare
  `backbone_params(params, image_size)` (e.g. MAE: the encoder, with its fixed position table written out);
  other models' params are returned as they are."""
  config_file = workdir / checkpoint.CONFIG_FILENAME
  if not config_file.exists():
    return params
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  config = json.loads(config_file.read_text())
  name = config.get('model', {}).get('name')
  if name not in models.list_models() or not hasattr(models.get_model_spec(name).builder, 'backbone_params'):
    return params
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in config['model'].items() if k != 'name'}
  model = models.create_model(name, num_classes=0, **overrides)
  logging.info('%s trained %s; loading its backbone.', workdir, name)
  return model.backbone_params(dict(params), int(config['dataset']['image_size']))


def read_workdir_params(workdir: str) -> Mapping[str, Any]:
  """Params of the latest checkpoint in a vit_jax workdir (EMA params if the run kept them), as host arrays."""
  return read_workdir_variables(workdir)['params']


def _read_npz(path: epath.Path) -> dict[str, np.ndarray]:
  with path.open('rb') as f:
    with np.load(f, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}


def _split_collections(flat: Mapping[str, np.ndarray]) -> tuple[Mapping[str, np.ndarray], Optional[dict]]:
  """A flat '/'-keyed .npz of a BatchNorm model ('params/...', 'batch_stats/...') -> (params, batch_stats); any
  other layout is all params (batch_stats None)."""
  if not any(k.startswith(('batch_stats/', 'params/')) for k in flat):
    return flat, None
  params = {k.removeprefix('params/'): v for k, v in flat.items() if not k.startswith('batch_stats/')}
  stats = {k.removeprefix('batch_stats/'): v for k, v in flat.items() if k.startswith('batch_stats/')}
  return params, traverse_util.unflatten_dict(stats, sep='/') if stats else None


def _read_source(source: str) -> tuple[Any, Optional[Mapping[str, Any]]]:
  """(params: an .npz path or a tree, batch_stats tree or None) of an init_from / teacher source."""
  path = epath.Path(source)
  if path.is_dir() and (path / CONVERTED_FILENAME).exists() and not (path / checkpoint.CHECKPOINT_DIRNAME).exists():
    path = path / CONVERTED_FILENAME  # A `vit_jax.convert --out DIR` directory.
  elif path.is_dir():
    variables = read_workdir_variables(source)
    return variables['params'], variables.get('batch_stats')
  elif not path.exists():
    raise FileNotFoundError(f'init_from={source!r} does not exist. Give an official ViT .npz, a params.npz from '
                            '`python -m vit_jax.convert`, or a vit_jax workdir.')
  if path.name == CONVERTED_FILENAME:  # Converted BatchNorm models keep their statistics beside the params.
    params, stats = _split_collections(_read_npz(path))
    if stats is not None:
      return params, stats
  return str(path), None


def load_batch_stats(source_stats: Optional[Mapping[str, Any]], init_stats: Mapping[str, Any], source: str, *,
                     require_all: bool = False) -> Any:
  """`init_stats` with every statistic `source_stats` holds at the same shape; missing ones keep their initial
  values (logged; a ValueError with `require_all`), a shape mismatch is a ValueError naming the statistic."""
  init_flat = traverse_util.flatten_dict(dict(init_stats), sep='/')
  got = traverse_util.flatten_dict(dict(source_stats or {}), sep='/')
  missing = sorted(set(init_flat) - set(got))
  if missing and require_all:
    raise ValueError(f'{source} has no BatchNorm statistics for {missing[:6]}; a teacher needs all of them. Give '
                     'a workdir or a converted params.npz of this model.')
  if missing:
    logging.warning('%s has no BatchNorm statistics for %s; keeping their initial values.', source,
                    missing if len(missing) <= 6 else f'{missing[:6]} and {len(missing) - 6} more')
  unused = sorted(set(got) - set(init_flat))
  if unused:
    logging.warning('%s: dropping BatchNorm statistics the model does not have: %s.', source, unused[:6])
  loaded = {}
  for key, init in init_flat.items():
    if key not in got:
      loaded[key] = init
      continue
    value = np.asarray(got[key])
    if value.shape != tuple(init.shape):
      raise ValueError(f'{source}: BatchNorm statistic {key} has shape {value.shape}, the model {tuple(init.shape)}. '
                       'Check config.model (widths) against the checkpoint.')
    loaded[key] = value.astype(init.dtype)
  return traverse_util.unflatten_dict(loaded, sep='/')


def warn_about_numerics(converted_dir: epath.Path, model: Any) -> list[str]:
  """Warns (and returns the lines) where `model`'s options differ from those under which the converted timm
  weights in `converted_dir` reproduce timm (convert.json's `timm_numerics`, e.g. exact GELU)."""
  meta_file = converted_dir / CONVERT_META_FILENAME
  if not meta_file.exists():
    return []
  wanted = json.loads(meta_file.read_text()).get('timm_numerics', {})
  lines = [f'config.model.{k}={getattr(model, k, None)!r}, but these weights reproduce timm with {v!r}'
           for k, v in wanted.items() if getattr(model, k, None) != v]
  for line in lines:
    logging.warning('%s: %s; set it for timm\'s logits.', converted_dir, line)
  return lines


def load_variables(source: str, init_variables: Mapping[str, Any], *, reinit_head: bool = False,
                   posemb_interpolation: str = 'linear', require_head: bool = False,
                   model: Optional[Any] = None) -> dict[str, Any]:
  """`init_variables` ({'params'[, 'batch_stats']}, host arrays from model.init) with the weights of `source` (see
  the module docstring).

  `require_head=True` (for teachers) loads every parameter, heads and pre_logits included, and raises if the
  heads do not match the model. `model` (the flax module) is checked against a converted timm checkpoint's
  numerics (`warn_about_numerics`).
  """
  path = epath.Path(source)
  converted = path if path.is_dir() else path.parent
  if model is not None and (converted / CONVERTED_FILENAME).exists():
    warn_about_numerics(converted, model)
  arrays, stats = _read_source(source)
  init_params = init_variables['params']
  loaded = checkpoint.load_pretrained(arrays, init_params, reinit_head=reinit_head and not require_head,
                                      posemb_interpolation=posemb_interpolation,
                                      keep_pre_logits=True if require_head else None, model=model)
  if require_head:
    for head in ('head', 'head_dist'):
      if head in init_params and loaded[head]['kernel'] is init_params[head]['kernel']:
        raise ValueError(f'{source} has no {head} of shape {init_params[head]["kernel"].shape}; a teacher needs '
                         'its trained head. Check config.distill.model (and the class count) against it.')
  variables = {'params': loaded}
  if init_variables.get('batch_stats') is not None:
    variables['batch_stats'] = load_batch_stats(stats, init_variables['batch_stats'], source,
                                                require_all=require_head)
  return variables


def load_params(source: str, init_params: Mapping[str, Any], **kwargs: Any) -> Any:
  """`load_variables` for a model without BatchNorm statistics: `init_params` with the weights of `source`."""
  return load_variables(source, {'params': init_params}, **kwargs)['params']
