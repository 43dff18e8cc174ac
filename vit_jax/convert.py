"""Converts reference (timm, and other layouts a family supports) checkpoints into this project's flax variables.

    params = timm_to_params('swin_t', load_safetensors('swin_tiny_patch4_window7_224.safetensors'))
    logits = create_model('swin_t', num_classes=1000).apply({'params': params}, images_nhwc)

This module names no model family. The family comes from the registry (`get_model_spec(name).family`) and its
facts (`vit_jax.models.facts.get_family`) hold one `ConversionTable` per source layout ('timm' by default, e.g.
'hf'), its classifier names, how its position tables resize, which image size a checkpoint was built for and the
options that reproduce the reference numerics. A rule is (source regex, our path template, kind); the kinds are
documented at `facts.Rule` (PyTorch Linear weight (out, in) -> kernel (in, out), conv OIHW -> HWIO, norm weight ->
scale, BatchNorm running statistics -> the `batch_stats` collection, fused qkv -> flax attention, raw, tables, or a
function). Keys matching a table's ignore list (buffers our model recomputes) are dropped; any other unused key,
or any model variable not produced, raises a ValueError, and every array is checked against `jax.eval_shape` of
the model. `timm_numerics(model)` gives the create_model options that reproduce the reference logits (e.g. exact
GELU); `convert_file` records them in convert.json.

Only safetensors files are read (`load_safetensors`); pickled .pth/.pt/.bin files are refused, never unpickled.

CLI (writes DIR/params.npz with flat '/'-joined keys, readable by `vit_jax.checkpoint.load_pretrained`, i.e. usable
as `config.init_from=DIR/params.npz` for a config whose model is --model; models with BatchNorm write 'params/...'
and 'batch_stats/...' keys):

    python -m vit_jax.convert --model swin_t --src swin_tiny.safetensors --out DIR [--num_classes N] [--layout hf]
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import facts
from vit_jax.models import registry

# Importing the model modules registers their families.
import vit_jax.models  # noqa: F401  pylint: disable=unused-import

Rule = facts.Rule
# Flat paths of BatchNorm running statistics carry this prefix (the rest are params).
_BATCH_STATS = 'batch_stats/'


def supported_families(layout: str = 'timm') -> list[str]:
  """Families with a conversion table for source `layout`."""
  return [n for n in facts.known_families() if layout in facts.get_family(n).layouts]


def load_safetensors(path: str) -> dict[str, np.ndarray]:
  """The tensors of a .safetensors file as numpy arrays. Pickled PyTorch files are refused (never unpickled)."""
  ext = os.path.splitext(str(path))[1].lower()
  if ext in ('.pth', '.pt', '.bin', '.ckpt', '.pkl', '.tar'):
    raise ValueError(
        f'{path} is a pickled PyTorch checkpoint; it is not loaded because unpickling can run arbitrary code. '
        'Convert it once to safetensors in a trusted environment, e.g.\n'
        "  python -c \"import torch, safetensors.torch as st; "
        "st.save_file(torch.load('x.pth', map_location='cpu', weights_only=True), 'x.safetensors')\"\n"
        "If the file wraps the weights in a sub-dict (e.g. {'model': state_dict} or {'state_dict': ...}), save that "
        "sub-dict instead (torch.load(...)['model']); tensors that share memory may need "
        "{k: v.contiguous().clone() for k, v in sd.items()}. timm / Hugging Face models also ship "
        'model.safetensors directly.')
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(str(path)):
    raise FileNotFoundError(f'{path}: no such safetensors file. Check the --src path.')
  try:
    return dict(load_file(str(path)))
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own SafetensorError)
    raise ValueError(f'{path} is not a readable safetensors file ({type(e).__name__}: {e}). It may be truncated '
                     '(download it again) or another format; timm / Hugging Face models ship model.safetensors.'
                     ) from e


_LEAVES = {  # Leaf names each module kind reads, and where they go ('' = dropped).
    'batchnorm': {'weight': 'scale', 'bias': 'bias', 'running_mean': _BATCH_STATS + 'mean',
                  'running_var': _BATCH_STATS + 'var', 'num_batches_tracked': ''},
}


def _leaf_regex(kind: Any) -> str:
  """The key suffix a rule of `kind` matches after its module regex ('' for whole-key kinds and functions)."""
  if callable(kind) or kind in facts.WHOLE_KEY_KINDS:
    return ''
  return r'\.(' + '|'.join(_LEAVES.get(kind, {'weight': '', 'bias': ''})) + ')'


def _convert_leaf(kind: Any, leaf: Optional[str], value: np.ndarray, path: str, key: str,
                  shapes: Mapping[str, Any]) -> Optional[dict[str, np.ndarray]]:
  """Our arrays for one source tensor (None: the model has no place for it, so the key is unused).

  `leaf` is 'weight'/'bias' (or a BatchNorm buffer name) for module kinds, None for whole-key kinds. BatchNorm
  running statistics go to `_BATCH_STATS`-prefixed paths.
  """
  if callable(kind):
    return dict(kind(key, value, path, shapes))
  if kind in ('raw', 'rel_table'):
    return {path: value}  # 'rel_table': fitted to the model's geometry once every key is converted.
  if kind == 'batchnorm':
    target = _LEAVES['batchnorm'][leaf]
    if not target:
      return {}  # num_batches_tracked: torch bookkeeping, not a statistic.
    if target.startswith(_BATCH_STATS):
      return {_BATCH_STATS + path + '/' + target[len(_BATCH_STATS):]: value}
    return {f'{path}/{target}': value}
  if kind == 'norm':
    return {f'{path}/{"scale" if leaf == "weight" else "bias"}': value}
  if kind == 'linear':
    return {f'{path}/kernel': value.T} if leaf == 'weight' else {f'{path}/bias': value}
  if kind == 'conv':
    return {f'{path}/kernel': value.transpose(2, 3, 1, 0)} if leaf == 'weight' else {f'{path}/bias': value}
  if kind in ('qkv', 'mha_out'):
    ref = shapes.get(f'{path}/query/kernel' if kind == 'qkv' else f'{path}/kernel')
    if ref is None:
      return None
    heads, head_dim = (ref.shape[1], ref.shape[2]) if kind == 'qkv' else (ref.shape[0], ref.shape[1])
    if kind == 'mha_out':  # (D_out, H*Dh) -> (H, Dh, D_out)
      if leaf == 'bias':
        return {f'{path}/bias': value}
      if value.ndim != 2 or value.shape[1] != heads * head_dim:
        raise ValueError(f'{key}: shape {value.shape} does not fit {heads} heads of width {head_dim} '
                         f'({path}/kernel expects {tuple(ref.shape)}).')
      return {f'{path}/kernel': value.T.reshape(heads, head_dim, -1)}
    if value.shape[0] != 3 * heads * head_dim:
      raise ValueError(f'{key}: shape {value.shape} does not split into q, k, v of {heads} heads x {head_dim} '
                       f'({path}/query/kernel expects {tuple(ref.shape)}).')
    parts = value.reshape((3, heads, head_dim) + value.shape[1:])
    out = {}
    for j, name in enumerate(('query', 'key', 'value')):
      if leaf == 'weight':  # (H, Dh, D_in) -> (D_in, H, Dh)
        out[f'{path}/{name}/kernel'] = parts[j].transpose(2, 0, 1)
      else:
        out[f'{path}/{name}/bias'] = parts[j]
    return out
  raise AssertionError(kind)


def _init_shapes(name: str, *, num_classes: int, image_size: Optional[int],
                 model_overrides: Optional[Mapping[str, Any]]) -> dict[str, Any]:
  """`jax.eval_shape` of registry model `name`'s init: {collection: nested ShapeDtypeStructs}."""
  spec = registry.get_model_spec(name)
  model = registry.create_model(name, num_classes=num_classes, **dict(model_overrides or {}))
  size = image_size or spec.image_size
  x = registry.example_input(model, size)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype)))


def model_param_shapes(name: str, *, num_classes: int, image_size: Optional[int] = None,
                       model_overrides: Optional[Mapping[str, Any]] = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Flat '/'-joined {path: ShapeDtypeStruct} of registry model `name`'s params (via jax.eval_shape)."""
  variables = _init_shapes(name, num_classes=num_classes, image_size=image_size, model_overrides=model_overrides)
  return traverse_util.flatten_dict(variables['params'], sep='/')


def model_variable_shapes(name: str, *, num_classes: int, image_size: Optional[int] = None,
                          model_overrides: Optional[Mapping[str, Any]] = None) -> dict[str, jax.ShapeDtypeStruct]:
  """As `model_param_shapes`, plus BatchNorm running statistics under 'batch_stats/'-prefixed paths."""
  variables = _init_shapes(name, num_classes=num_classes, image_size=image_size, model_overrides=model_overrides)
  flat = traverse_util.flatten_dict(variables['params'], sep='/')
  if 'batch_stats' in variables:
    stats = traverse_util.flatten_dict(variables['batch_stats'], sep='/')
    flat.update({_BATCH_STATS + k: v for k, v in stats.items()})
  return flat


def conversion_table(family: str, layout: str = 'timm') -> facts.ConversionTable:
  """The family's ConversionTable for source `layout`; a ValueError names the layouts it has."""
  table = facts.get_family(family).layouts.get(layout)
  if table is None:
    have = sorted(facts.get_family(family).layouts)
    raise ValueError(f'Model family {family!r} has no conversion table for layout {layout!r} (it has {have}). '
                     'Pick one of those layouts, or add the table to the family\'s FamilyFacts.layouts.')
  return table


def _convert_keys(sd: Mapping[str, np.ndarray], table: facts.ConversionTable, shapes: Mapping[str, Any]
                  ) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
  """Applies `table` to every key: (our flat arrays, our path -> source key, unused source keys)."""
  flat: dict[str, np.ndarray] = {}
  source: dict[str, str] = {}
  unused: list[str] = []
  compiled = [(re.compile(rx + _leaf_regex(kind)), tmpl, kind) for rx, tmpl, kind in table.rules]
  for key in sorted(sd):
    if any(re.fullmatch(rx, key) for rx in table.ignore):
      continue
    produced = None
    for regex, tmpl, kind in compiled:
      m = regex.fullmatch(key)
      if m:
        leaf = None if callable(kind) or kind in facts.WHOLE_KEY_KINDS else m.groups()[-1]
        path = m.expand(tmpl) if isinstance(tmpl, str) else tmpl(m)
        produced = _convert_leaf(kind, leaf, sd[key], path, key, shapes)
        break
    if produced is None:
      unused.append(key)
      continue
    for path, value in produced.items():
      if path in flat:
        raise ValueError(f'Checkpoint key {key!r} maps onto {path!r}, which another key already set.')
      flat[path], source[path] = value, key
  return flat, source, unused


def _fit_to_model(flat: dict[str, np.ndarray], shapes: Mapping[str, Any], family: facts.FamilyFacts, name: str,
                  num_classes: int, image_size: int, overrides: Mapping[str, Any]) -> None:
  """Fits tables of another geometry (position embeddings, bias tables) to the model, in place, by the family's
  `resize` (bicubic, as timm's fine-tuning). Paths it does not resize are left for the shape check."""
  differ = [p for p in flat if p in shapes and tuple(flat[p].shape) != tuple(shapes[p].shape)]
  if not differ or family.resize is None:
    return
  model = registry.create_model(name, num_classes=num_classes, **dict(overrides))
  context = facts.ResizeContext(model=model, image_size=image_size, method='bicubic')
  for path in differ:
    fitted = family.resize(path, flat[path], tuple(shapes[path].shape), context)
    if fitted is not None:
      flat[path] = np.asarray(fitted)


def timm_to_params(name: str, state_dict: Mapping[str, np.ndarray], *, layout: str = 'timm',
                   num_classes: Optional[int] = None, model_overrides: Optional[Mapping[str, Any]] = None,
                   image_size: Optional[int] = None) -> dict:
  """Our params pytree (nested dicts of numpy arrays) for registry model `name` from a reference state dict.

  layout: the source key layout ('timm' by default; others as the family's FamilyFacts.layouts, e.g. 'hf').
  num_classes: None keeps the checkpoint's head (0 if it has none); 0 drops the head; another count than the
    checkpoint's gives a zero-initialised head of that size (as the official ViT fine-tuning does), with a warning.
  model_overrides: create_model overrides (must describe the architecture the checkpoint was trained with).
  image_size: the square input size used to derive parameter shapes (default: what the family reads off the
    checkpoint, else the registry's image_size).
  Returns params, or {'params': ..., 'batch_stats': ...} (what `model.apply` takes) when the model has BatchNorm
  running statistics.
  Raises ValueError listing unused checkpoint keys, missing parameters, or mismatched shapes.
  """
  spec = registry.get_model_spec(name)
  family = facts.get_family(spec.family)
  table = conversion_table(spec.family, layout)
  overrides = dict(model_overrides or {})
  options = {**spec.kwargs, **overrides}
  sd = {k: np.asarray(v) for k, v in state_dict.items()}

  ckpt_classes = None
  for head in table.source_heads:
    if f'{head}.weight' in sd and sd[f'{head}.weight'].ndim == 2:
      ckpt_classes = int(sd[f'{head}.weight'].shape[0])
  if num_classes is None:
    num_classes = ckpt_classes or 0
  drop_head = ckpt_classes is not None and num_classes != ckpt_classes
  if drop_head:
    for head in table.source_heads:
      sd.pop(f'{head}.weight', None)
      sd.pop(f'{head}.bias', None)
    if num_classes:
      logging.warning('timm_to_params: checkpoint head has %d classes, model %d; the head is zero-initialised.',
                      ckpt_classes, num_classes)

  if not image_size and family.infer_image_size is not None:
    image_size = family.infer_image_size(sd, options)
  image_size = image_size or spec.image_size
  shapes = model_variable_shapes(name, num_classes=num_classes, image_size=image_size, model_overrides=overrides)
  flat, source, unused = _convert_keys(sd, table, shapes)
  _fit_to_model(flat, shapes, family, name, num_classes, image_size, overrides)

  if drop_head and num_classes:
    for path in shapes:
      if path.split('/')[0] in family.heads:
        flat[path] = np.zeros(shapes[path].shape, np.float32)

  missing = sorted(set(shapes) - set(flat))
  # Keys whose converted name the model lacks (e.g. a deeper checkpoint) are unused too.
  unused = sorted(set(unused) | {source[p] for p in set(flat) - set(shapes)})
  if unused or missing:
    raise ValueError(f'{layout} checkpoint does not match model {name!r} (family {spec.family!r}, overrides '
                     f'{overrides}). Unused checkpoint keys ({len(unused)}): {unused}. Model parameters not in the '
                     f'checkpoint ({len(missing)}): {missing}. Check the model name/options against the checkpoint.')
  bad = [f'{p} (from {source.get(p, "a new head")}): checkpoint gives {tuple(flat[p].shape)}, '
         f'model expects {tuple(shapes[p].shape)}'
         for p in sorted(flat) if tuple(flat[p].shape) != tuple(shapes[p].shape)]
  if bad:
    raise ValueError(f'{layout} checkpoint has parameters of the wrong shape for model {name!r}: ' + '; '.join(bad) +
                     '. Check the model variant (width, depth, heads, window, patch size) and num_classes.')
  flat = {p: np.asarray(v, dtype=shapes[p].dtype) for p, v in flat.items()}
  params = {p: v for p, v in flat.items() if not p.startswith(_BATCH_STATS)}
  stats = {p[len(_BATCH_STATS):]: v for p, v in flat.items() if p.startswith(_BATCH_STATS)}
  params = traverse_util.unflatten_dict(params, sep='/')
  if any(p.startswith(_BATCH_STATS) for p in shapes):
    return {'params': params, 'batch_stats': traverse_util.unflatten_dict(stats, sep='/')}
  return params


def save_params_npz(params: Mapping[str, Any], path: str) -> None:
  """Writes params as an .npz with flat '/'-joined keys (no pickle); `load_pretrained` reads it."""
  flat = traverse_util.flatten_dict(dict(params), sep='/')
  with open(path, 'xb') as f:  # 'x': never overwrite.
    np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})


def timm_numerics(model: str, model_overrides: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
  """create_model options under which converted timm weights reproduce timm's logits (numerics only: no parameter
  changes), as the model's family states them (e.g. exact GELU)."""
  spec = registry.get_model_spec(model)
  return dict(facts.get_family(spec.family).timm_numerics({**spec.kwargs, **dict(model_overrides or {})}))


def convert_file(model: str, src: str, out_dir: str, *, num_classes: Optional[int] = None,
                 image_size: Optional[int] = None, model_overrides: Optional[Mapping[str, Any]] = None,
                 layout: str = 'timm') -> str:
  """Converts `src` (.safetensors) into `out_dir`/params.npz (+ convert.json); returns the .npz path.

  Refuses a non-empty `out_dir`.
  """
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise ValueError(f'--out {out_dir} exists and is not an empty directory; refusing to overwrite. '
                     'Pick a new directory.')
  variables = timm_to_params(model, load_safetensors(src), layout=layout, num_classes=num_classes,
                             image_size=image_size, model_overrides=model_overrides)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, 'params.npz')
  save_params_npz(variables, path)  # With BatchNorm: 'params/...' and 'batch_stats/...' keys.
  params = variables['params'] if 'batch_stats' in variables else variables
  head = params.get('head', {}).get('kernel')
  meta = dict(model=model, timm_name=registry.get_model_spec(model).timm_name, source=os.path.abspath(src),
              layout=layout, num_classes=int(head.shape[-1]) if head is not None else 0,
              model_overrides=dict(model_overrides or {}), timm_numerics=timm_numerics(model, model_overrides),
              format=('flat "/"-joined flax variable paths (np.savez), "params/" and "batch_stats/" collections'
                      if 'batch_stats' in variables else 'flat "/"-joined flax param paths (np.savez)'))
  if meta['timm_numerics']:
    logging.info('To reproduce timm\'s logits with %s, build the model with %s (config.model.*).', path,
                 meta['timm_numerics'])
  with open(os.path.join(out_dir, 'convert.json'), 'x') as f:
    json.dump(meta, f, indent=2)
  return path


def _define_flags() -> flags.FlagValues:
  """The CLI's flags, on a private FlagValues so that importing this module defines no global flags."""
  fv = flags.FlagValues()
  flags.DEFINE_string('model', None, 'Registry model name, e.g. swin_t.', flag_values=fv)
  flags.DEFINE_string('src', None, 'Reference weights (.safetensors).', flag_values=fv)
  flags.DEFINE_string('layout', 'timm', "Source key layout: 'timm', or another the family has (e.g. 'hf').",
                      flag_values=fv)
  flags.DEFINE_string('out', None, 'New (or empty) output directory; receives params.npz and convert.json.',
                      flag_values=fv)
  flags.DEFINE_integer('num_classes', None, 'Head size (default: the checkpoint head; 0 drops it).',
                       flag_values=fv)
  flags.DEFINE_integer('image_size', None, 'Input size for parameter shapes (ViT: read from pos_embed).',
                       flag_values=fv)
  flags.DEFINE_string('model_overrides', None, 'JSON dict of create_model overrides, e.g. \'{"depths": [2, 2]}\'.',
                      flag_values=fv)
  return fv


def main(argv: Sequence[str]) -> str:
  """CLI entry point: `argv` as sys.argv (program name first). Returns the written .npz path."""
  fv = _define_flags()
  rest = fv(list(argv))
  if len(rest) > 1:
    raise app.UsageError(f'Unexpected arguments: {rest[1:]}')
  for flag in ('model', 'src', 'out'):
    if not fv[flag].value:
      raise app.UsageError(f'--{flag} is required.')
  overrides = None
  if fv.model_overrides:
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(fv.model_overrides).items()}
  path = convert_file(fv.model, fv.src, fv.out, num_classes=fv.num_classes, image_size=fv.image_size,
                      model_overrides=overrides, layout=fv.layout)
  print(f'Wrote {path}; use it as config.init_from={path!r} with config.model.name={fv.model!r}.')
  return path


def _cli(argv: Sequence[str]) -> None:
  try:
    main(argv)
  except ValueError as e:
    raise SystemExit(f'Error: {e}') from None


def _parse_global_flags(argv: list[str]) -> list[str]:
  # absl's own (logging) flags keep their defaults; the converter's flags are parsed by `main`.
  flags.FLAGS([argv[0]])
  return argv


if __name__ == '__main__':
  app.run(_cli, flags_parser=_parse_global_flags)
