"""Converts timm (PyTorch) checkpoints into this project's flax parameters.

    params = timm_to_params('swin_t', load_safetensors('swin_tiny_patch4_window7_224.safetensors'))
    logits = create_model('swin_t', num_classes=1000).apply({'params': params}, images_nhwc)

Each model family has ONE rule table (`_TABLES`) from timm state-dict keys to our '/'-joined parameter paths; the
family comes from the registry (`get_model_spec(name).family`), so supporting a new family is adding a table.
A rule is (timm regex, our path template, kind). For module kinds ('linear', 'conv', 'norm', 'qkv', 'mha_out') the
regex names the module and the '.weight' / '.bias' leaf is handled by the kind; 'raw' copies one tensor as is and
'rel_table' is a Swin v1 relative-position table. Keys matching a family's ignore list (timm buffers recomputed by
our model) are dropped; any other unused key, or any model parameter not produced, raises a ValueError, and every
array is checked against `jax.eval_shape` of the model.

Layout facts (REFERENCE.md section 3): PyTorch Linear weight is (out, in) -> flax kernel (in, out); conv weight
OIHW -> HWIO; LayerNorm weight -> scale. timm ViT and Mixer use exact GELU: build our vit_* / mixer_* models
with gelu_approximate=False (their registry default is the tanh approximation; deit_* and Swin are exact already)
for exact parity. Families with tables: vit (incl. the R+ViT hybrids, whose timm ResNetV2 stem maps onto our
BiT stem names), deit (incl. distilled), mixer, swin, swinv2, pvt_v2, mvitv2.
Hybrids: timm's ResNetV2 standardises conv weights as (w - mean) / sqrt(var + 1e-8) and uses GroupNorm eps 1e-5,
where the official JAX code uses (w - mean) / (std + 1e-5) and eps 1e-6; build hybrids with
resnet_norm_style='timm' (and gelu_approximate=False) to reproduce timm's logits.

Only safetensors files are read (`load_safetensors`); pickled .pth/.pt/.bin files are refused, never unpickled.

CLI (writes DIR/params.npz with flat '/'-joined keys, readable by `vit_jax.checkpoint.load_pretrained`, i.e. usable
as `config.init_from=DIR/params.npz` for a config whose model is --model):

    python -m vit_jax.convert --model swin_t --src swin_tiny.safetensors --out DIR [--num_classes N]
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from absl import app
from absl import flags
from absl import logging
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import pretrained
from vit_jax.models import facts
from vit_jax.models import registry

# Importing the model modules registers their families.
import vit_jax.models  # noqa: F401  pylint: disable=unused-import

Rule = facts.Rule
# Flat paths of BatchNorm running statistics carry this prefix (the rest are params).
_BATCH_STATS = 'batch_stats/'


def _one_based(fmt: str, count: int = 2) -> Callable[['re.Match[str]'], str]:
  """Path builder for timm's 0-based indices that our names count from 1: the first `count` groups get + 1."""
  def expand(m):
    return fmt.format(*[int(g) + 1 if i < count else g for i, g in enumerate(m.groups())])
  return expand


_B = r'blocks\.(\d+)\.'
_RB = r'patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.'
_VB = r'Transformer/encoderblock_\1/'
_VIT: Sequence[Rule] = (
    (r'cls_token', 'cls', 'raw'),
    (r'pos_embed', 'Transformer/posembed_input/pos_embedding', 'raw'),
    (r'patch_embed\.proj', 'embedding', 'conv'),
    (_B + r'norm1', _VB + 'LayerNorm_0', 'norm'),
    (_B + r'attn\.qkv', _VB + 'MultiHeadDotProductAttention_0', 'qkv'),
    (_B + r'attn\.proj', _VB + 'MultiHeadDotProductAttention_0/out', 'mha_out'),
    (_B + r'norm2', _VB + 'LayerNorm_1', 'norm'),
    (_B + r'mlp\.fc1', _VB + 'MlpBlock_0/Dense_0', 'linear'),
    (_B + r'mlp\.fc2', _VB + 'MlpBlock_0/Dense_1', 'linear'),
    (r'norm', 'Transformer/encoder_norm', 'norm'),
    (r'head', 'head', 'linear'),
    # Hybrids (timm HybridEmbed over a ResNetV2 stem): our BiT stem names sit at the top level, 1-based.
    (r'patch_embed\.backbone\.(?:stem\.)?conv', 'conv_root', 'conv'),
    (r'patch_embed\.backbone\.(?:stem\.)?norm', 'gn_root', 'norm'),
    (_RB + r'conv([123])', _one_based('block{}/unit{}/conv{}'), 'conv'),
    (_RB + r'norm([123])', _one_based('block{}/unit{}/gn{}'), 'norm'),
    (_RB + r'downsample\.conv', _one_based('block{}/unit{}/conv_proj'), 'conv'),
    (_RB + r'downsample\.norm', _one_based('block{}/unit{}/gn_proj'), 'norm'),
)

_SB = r'layers\.(\d+)\.blocks\.(\d+)\.'
_OB = r'layers_\1/blocks_\2/'
_SWIN: Sequence[Rule] = (
    (r'patch_embed\.proj', 'patch_embed/proj', 'conv'),
    (r'patch_embed\.norm', 'patch_embed/norm', 'norm'),
    (r'layers\.(\d+)\.downsample\.norm', r'layers_\1/downsample/norm', 'norm'),
    (r'layers\.(\d+)\.downsample\.reduction', r'layers_\1/downsample/reduction', 'linear'),
    (_SB + r'norm([12])', _OB + r'norm\3', 'norm'),
    (_SB + r'attn\.(qkv|proj)', _OB + r'attn/\3', 'linear'),
    (_SB + r'attn\.relative_position_bias_table', _OB + 'attn/relative_position_bias_table', 'rel_table'),
    (_SB + r'attn\.(q_bias|v_bias|logit_scale)', _OB + r'attn/\3', 'raw'),
    (_SB + r'attn\.cpb_mlp\.0', _OB + 'attn/cpb_mlp/fc1', 'linear'),
    (_SB + r'attn\.cpb_mlp\.2', _OB + 'attn/cpb_mlp/fc2', 'linear'),
    (_SB + r'mlp\.fc([12])', _OB + r'mlp/fc\3', 'linear'),
    (r'norm', 'norm', 'norm'),
    (r'head\.fc', 'head', 'linear'),
    (r'head', 'head', 'linear'),  # Older timm Swin checkpoints.
)
# timm buffers that our modules recompute from the geometry (present in older checkpoints).
_SWIN_IGNORED = (r'.*\.relative_position_index', r'.*\.attn_mask', r'.*\.relative_coords_table')

# DeiT: plain ViT names plus the distillation token and head (timm VisionTransformerDistilled).
_DEIT: Sequence[Rule] = _VIT + (
    (r'dist_token', 'dist', 'raw'),
    (r'head_dist', 'head_dist', 'linear'),
)

_MB = r'blocks\.(\d+)\.'
_OMB = r'MixerBlock_\1/'
_MIXER: Sequence[Rule] = (
    (r'stem\.proj', 'stem', 'conv'),
    (_MB + r'norm1', _OMB + 'LayerNorm_0', 'norm'),
    (_MB + r'mlp_tokens\.fc1', _OMB + 'token_mixing/Dense_0', 'linear'),
    (_MB + r'mlp_tokens\.fc2', _OMB + 'token_mixing/Dense_1', 'linear'),
    (_MB + r'norm2', _OMB + 'LayerNorm_1', 'norm'),
    (_MB + r'mlp_channels\.fc1', _OMB + 'channel_mixing/Dense_0', 'linear'),
    (_MB + r'mlp_channels\.fc2', _OMB + 'channel_mixing/Dense_1', 'linear'),
    (r'norm', 'pre_head_layer_norm', 'norm'),
    (r'head', 'head', 'linear'),
)

_PB = r'stages\.(\d+)\.blocks\.(\d+)\.'
_OPB = r'stages_\1/blocks_\2/'
_PVT_V2: Sequence[Rule] = (
    (r'patch_embed\.proj', 'patch_embed/proj', 'conv'),
    (r'patch_embed\.norm', 'patch_embed/norm', 'norm'),
    (r'stages\.(\d+)\.downsample\.proj', r'stages_\1/downsample/proj', 'conv'),
    (r'stages\.(\d+)\.downsample\.norm', r'stages_\1/downsample/norm', 'norm'),
    (_PB + r'norm([12])', _OPB + r'norm\3', 'norm'),
    (_PB + r'attn\.(q|kv|proj)', _OPB + r'attn/\3', 'linear'),
    (_PB + r'attn\.sr', _OPB + 'attn/sr', 'conv'),
    (_PB + r'attn\.norm', _OPB + 'attn/norm', 'norm'),
    (_PB + r'mlp\.fc([12])', _OPB + r'mlp/fc\3', 'linear'),
    (_PB + r'mlp\.dwconv', _OPB + 'mlp/dwconv', 'conv'),  # Depthwise: (C, 1, 3, 3) -> (3, 3, 1, C).
    (r'stages\.(\d+)\.norm', r'stages_\1/norm', 'norm'),
    (r'head', 'head', 'linear'),
)

_MVITV2: Sequence[Rule] = (
    (r'patch_embed\.proj', 'patch_embed/proj', 'conv'),
    (_PB + r'norm([12])', _OPB + r'norm\3', 'norm'),
    (_PB + r'shortcut_proj_attn', _OPB + 'shortcut_proj_attn', 'linear'),
    (_PB + r'attn\.(qkv|proj)', _OPB + r'attn/\3', 'linear'),
    (_PB + r'attn\.pool_([qkv])', _OPB + r'attn/pool_\3', 'conv'),
    (_PB + r'attn\.norm_([qkv])', _OPB + r'attn/norm_\3', 'norm'),
    (_PB + r'attn\.(rel_pos_[hw])', _OPB + r'attn/\3', 'raw'),
    (_PB + r'mlp\.fc([12])', _OPB + r'mlp/fc\3', 'linear'),
    (r'norm', 'norm', 'norm'),
    (r'head\.fc', 'head', 'linear'),
)

# family -> (rules, ignored-key regexes). Add a family by adding its table here.
_TABLES: dict[str, tuple[Sequence[Rule], Sequence[str]]] = {
    'vit': (_VIT, ()),
    'deit': (_DEIT, ()),
    'mixer': (_MIXER, ()),
    'swin': (_SWIN, _SWIN_IGNORED),
    'swinv2': (_SWIN, _SWIN_IGNORED + (r'.*\.attn\.k_bias',)),
    'pvt_v2': (_PVT_V2, ()),
    'mvitv2': (_MVITV2, ()),
}
# Classifier heads: timm module prefixes and our top-level modules (dropped / re-initialised for a new class count).
_TIMM_HEADS = ('head', 'head.fc', 'head_dist')
_OUR_HEADS = ('head', 'head_dist')


def supported_families(layout: str = 'timm') -> list[str]:
  """Families with a conversion table for source `layout`."""
  names = set(facts.known_families()) | set(_TABLES)
  return sorted(n for n in names if layout in family_facts(n).layouts)


def _legacy_infer_image_size(sd: Mapping[str, np.ndarray], options: Mapping[str, Any],
                             family: str) -> Optional[int]:
  """ViT/DeiT/hybrid (pos_embed) and Mixer (token MLP) shapes depend on the image size: read it off the checkpoint.

  MViTv2's tables depend on its `img_size` option instead, and only that input size is sure to fit them.
  """
  tokens = None
  if 'pos_embed' in sd:
    tokens = sd['pos_embed'].shape[1] - sum(k in sd for k in ('cls_token', 'dist_token'))
  elif 'blocks.0.mlp_tokens.fc1.weight' in sd:
    tokens = sd['blocks.0.mlp_tokens.fc1.weight'].shape[1]
  if tokens:
    stride = options.get('patch_size', 16)
    resnet = options.get('resnet', None)
    if resnet is not None:  # Hybrids: the patches are cut from the stem's feature map.
      stride *= 4 * 2 ** max(len(resnet) - 1, 0)
    grid = int(round(math.sqrt(tokens)))
    if grid * grid == tokens:
      return grid * stride
  if family == 'mvitv2':  # Its relative-position tables are sized for img_size: use that input size.
    return options.get('img_size', None)
  return None


def _legacy_numerics(family: str, options: Mapping[str, Any]) -> dict[str, Any]:
  """timm's ViT and Mixer use exact GELU; its ResNetV2 stem standardises weights its own way."""
  out: dict[str, Any] = {}
  if family in ('vit', 'mixer'):
    out['gelu_approximate'] = False
  if options.get('resnet') is not None:
    out['resnet_norm_style'] = 'timm'
  return out


def _legacy_facts(family: str) -> facts.FamilyFacts:
  """Facts of a family whose knowledge still lives in this module's tables."""
  rules, ignored = _TABLES[family]
  return facts.FamilyFacts(
      name=family, layouts={'timm': facts.ConversionTable(rules, ignored, source_heads=_TIMM_HEADS)},
      infer_image_size=lambda sd, options: _legacy_infer_image_size(sd, options, family),
      timm_numerics=lambda options: _legacy_numerics(family, options), heads=_OUR_HEADS)


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
  return dict(load_file(str(path)))


def _centre_table(table: np.ndarray, target_rows: int, key: str) -> np.ndarray:
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


def _fit_tables(flat: dict[str, np.ndarray], shapes: Mapping[str, Any], source: Mapping[str, str], family: str,
                name: str, image_size: int, overrides: Mapping[str, Any], num_classes: int) -> None:
  """Fits size-dependent tables of another geometry to the model, in place (fine-tuning at a new resolution).

  ViT/DeiT pos_embed: resized to the model's grid bicubically as timm's resample_abs_pos_embed, keeping the
  class (and distillation) token rows. Swin v1 bias tables: a table for the stage's clamped window (a timm model
  built at a size where the window covers the whole map) is placed at the centre of ours; any other size is
  resized bicubically (official Swin / timm fine-tuning). SwinV2 has no such tables (set pretrained_window_size).
  """
  pe = 'Transformer/posembed_input/pos_embedding'
  if pe in flat and pe in shapes and flat[pe].ndim == 3 and flat[pe].shape[1:] != tuple(shapes[pe].shape[1:]):
    if flat[pe].shape[2] == shapes[pe].shape[2]:
      prefix = int('cls' in shapes) + int('dist' in shapes)
      flat[pe] = pretrained.resize_posemb(flat[pe], shapes[pe].shape[1], num_prefix_tokens=prefix,
                                          method='bicubic')
  tables = [p for p in flat if p.endswith('/relative_position_bias_table') and p in shapes]
  if family != 'swin' or not tables:
    return
  model = registry.create_model(name, num_classes=num_classes, **dict(overrides))
  geometry = model.stage_geometry(image_size, image_size)
  for path in tables:
    value, want = flat[path], tuple(shapes[path].shape)
    if value.shape == want or value.ndim != 2 or value.shape[1] != want[1]:
      continue  # Equal, or reported as a shape mismatch by the caller.
    wh, ww = geometry[int(re.match(r'layers_(\d+)/', path).group(1))]['window']
    if value.shape[0] == (2 * wh - 1) * (2 * ww - 1) and value.shape[0] < want[0]:
      flat[path] = _centre_table(value, want[0], source[path])
    else:
      flat[path] = pretrained.resize_rel_pos_bias_table(value, want[0])


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
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
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


def family_facts(family: str) -> facts.FamilyFacts:
  """The registered facts of `family` (a ValueError naming the known families if there are none)."""
  if facts.has_family(family):
    return facts.get_family(family)
  if family in _TABLES:  # Not yet moved into its model file.
    return _legacy_facts(family)
  return facts.get_family(family)


def conversion_table(family: str, layout: str = 'timm') -> facts.ConversionTable:
  """The family's ConversionTable for source `layout`; a ValueError names the layouts it has."""
  table = family_facts(family).layouts.get(layout)
  if table is None:
    have = sorted(family_facts(family).layouts)
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
  family = family_facts(spec.family)
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
  if spec.family in _TABLES and not facts.has_family(spec.family):
    _fit_tables(flat, shapes, source, spec.family, name, image_size, overrides, num_classes)
  else:
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
  return dict(family_facts(spec.family).timm_numerics({**spec.kwargs, **dict(model_overrides or {})}))


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
