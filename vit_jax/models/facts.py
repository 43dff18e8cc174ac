"""What the generic modules need to know about one model family, registered by the family's own file.

Each family file (vit.py, swin.py, ...) calls `register_family(FamilyFacts(...))` once at import. The generic
modules look the facts up by the registry's family name and never name a family themselves:

- `vit_jax.convert` reads `layouts` (key tables from timm and other source layouts), `resize`,
  `infer_image_size`, `timm_numerics` and the classifier names (`heads`, `ConversionTable.source_heads`);
- `vit_jax.param_groups` reads `grouping` (layer ids for layer-wise lr decay and freezing);
- `vit_jax.flops` reads `forward_macs` (analytic count; absent -> XLA's cost analysis);
- `vit_jax.pretrained` reads `resize` (fitting tables of another geometry when fine-tuning at a new resolution);
- `vit_jax.deploy` reads `fold` (BatchNorm folding and branch re-parameterisation for inference);
- `vit_jax.pretrained` reads `adapt_checkpoint` (starting from another family's weights, e.g. video and audio
  transformers from an image ViT/DeiT checkpoint).

Adding a family is its model file (with its facts) plus one import line in vit_jax/models/__init__.py.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

Rule = tuple[str, Union[str, Callable[[re.Match], str]], Union[str, Callable]]
"""(source-key regex, our '/'-joined param path (template with \\1 groups, or function of the match), kind).

For module kinds the regex names the module; the '.weight'/'.bias' leaf is handled by the kind:
  'linear'    Linear (out, in) -> kernel (in, out); bias
  'conv'      Conv OIHW -> HWIO kernel (depthwise (C,1,kh,kw) -> (kh,kw,1,C) works as is); bias
  'norm'      LayerNorm/GroupNorm weight -> scale, bias -> bias
  'batchnorm' weight -> params scale, bias -> params bias, running_mean -> batch_stats mean,
              running_var -> batch_stats var; num_batches_tracked is dropped
  'qkv'       fused qkv Linear -> flax MultiHeadDotProductAttention query/key/value (H, Dh) kernels
  'mha_out'   out-projection Linear -> flax MHA out kernel (H, Dh, D)
Whole-key kinds (the regex matches the full key, no leaf):
  'raw'       copy the tensor as is
  'rel_table' a relative-position table, copied; fitted to the model's geometry afterwards by `resize`
  a callable  f(key: str, value: np.ndarray, path: str, shapes: Mapping[str, ShapeDtypeStruct]) ->
              dict[str, np.ndarray]: our flat param paths -> arrays, for anything the kinds above cannot express
              (e.g. a fused tensor to split).
"""

MODULE_KINDS = ('linear', 'conv', 'norm', 'batchnorm', 'qkv', 'mha_out')
WHOLE_KEY_KINDS = ('raw', 'rel_table')
GROUPING_KINDS = ('block1', 'block2', 'before', 'after')


@dataclasses.dataclass(frozen=True)
class ConversionTable:
  """Rules from one source layout's state-dict keys to our parameter paths."""
  rules: Sequence[Rule]
  ignore: Sequence[str] = ()  # Full-key regexes dropped (buffers our model recomputes).
  source_heads: Sequence[str] = ('head',)  # Source module prefixes holding the classifier (dropped for a new
                                           # class count).

  def __post_init__(self):
    for rule in self.rules:
      if len(rule) != 3:
        raise ValueError(f'A conversion rule is (regex, path, kind); got {rule!r}.')
      kind = rule[2]
      if not callable(kind) and kind not in MODULE_KINDS + WHOLE_KEY_KINDS:
        raise ValueError(f'Unknown conversion kind {kind!r} in rule {rule[0]!r}; use one of '
                         f'{MODULE_KINDS + WHOLE_KEY_KINDS} or a function.')


@dataclasses.dataclass(frozen=True)
class LayerGrouping:
  """Layer ids for layer-wise lr decay and freezing: stem = 0, blocks 1..L in forward order, the rest L+1."""
  blocks: Sequence[tuple[str, str]]  # (regex searched in the '/'-joined param path, kind):
                                     #  'block1': group 1 = block index (single stack)
                                     #  'block2': group 1 = stage, group 2 = block in stage
                                     #  'before': group 1 = stage; pinned to the stage's first block
                                     #  'after':  group 1 = stage; pinned to the stage's last block
  stem: str                          # Regex of the layer-0 params (patch embed, tokens, pos embeds, conv stem).

  def __post_init__(self):
    for rule in self.blocks:
      if len(rule) != 2 or rule[1] not in GROUPING_KINDS:
        raise ValueError(f'A layer-grouping rule is (regex, kind) with kind in {GROUPING_KINDS}; got {rule!r}.')


@dataclasses.dataclass(frozen=True)
class ResizeContext:
  """What a family's `resize` may need besides the tensor: the target model and input size."""
  model: Any  # The target flax module (built with the target options).
  image_size: int  # The target input size.
  method: str  # Interpolation asked for (e.g. 'bicubic', 'linear', 'bicubic_torch').


def _no_numerics(options: Mapping[str, Any]) -> dict:
  del options
  return {}


@dataclasses.dataclass(frozen=True)
class FamilyFacts:
  """Everything family-specific that the generic modules (convert, param_groups, flops, pretrained) consult."""
  name: str
  # 'timm' is the default source layout; others e.g. 'hf', 'mae'.
  layouts: Mapping[str, ConversionTable] = dataclasses.field(default_factory=dict)
  grouping: Optional[LayerGrouping] = None
  # (model, image_size) -> multiply-adds of one forward pass on one image (matmuls + convs, the published
  # "GMACs"), or None where the analytic count does not apply; None/absent -> XLA cost analysis.
  forward_macs: Optional[Callable[[Any, int], Optional[float]]] = None
  # (our param path, checkpoint value, model's shape, context) -> the value fitted to the model, or None if that
  # path is not a resizable table (then a shape mismatch is an error).
  resize: Optional[Callable[[str, np.ndarray, tuple, ResizeContext], Optional[np.ndarray]]] = None
  # (source state dict, model options) -> the image size the checkpoint was built for, if its shapes tell.
  infer_image_size: Optional[Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], Optional[int]]] = None
  # Model options -> create_model overrides that reproduce the reference numerics (e.g. exact GELU).
  timm_numerics: Callable[[Mapping[str, Any]], dict] = _no_numerics
  heads: Sequence[str] = ('head',)  # Our top-level classifier modules (re-initialised for a new class count).
  # (model options, variables) -> (deploy-form options, deploy-form variables): the same registry model built for
  # inference (BatchNorm folded into the preceding linear/conv, parallel branches merged into one conv) and its
  # variables, giving the same logits. None -> the family has nothing to fold (vit_jax.deploy returns it as is).
  fold: Optional[Callable[[Mapping[str, Any], Mapping[str, Any]], tuple[dict, dict]]] = None
  # (flat checkpoint arrays under our names, the model's flat param shapes, context) -> (the checkpoint refitted to
  # this family's parameters, paths to keep at their initial values), or None when the checkpoint already has this
  # family's layout. How a family starts from another's weights (ViViT from an image ViT: inflated patch kernel,
  # tiled position embeddings); `vit_jax.pretrained.load_pretrained` calls it before matching parameters.
  adapt_checkpoint: Optional[Callable[[dict[str, np.ndarray], Mapping[str, Any], 'ResizeContext'],
                                      Optional[tuple[dict[str, np.ndarray], set[str]]]]] = None

  def __post_init__(self):
    if not self.name or not isinstance(self.name, str):
      raise ValueError(f'FamilyFacts needs a family name, got {self.name!r}.')
    for layout, table in self.layouts.items():
      if not isinstance(table, ConversionTable):
        raise ValueError(f'Family {self.name!r}: layout {layout!r} must be a ConversionTable, got {type(table)}.')


_FAMILIES: dict[str, FamilyFacts] = {}


def register_family(facts: FamilyFacts) -> FamilyFacts:
  """Registers a family's facts (once, at the import of the family's file); returns them."""
  if not isinstance(facts, FamilyFacts):
    raise ValueError(f'register_family takes a FamilyFacts, got {type(facts).__name__}.')
  if facts.name in _FAMILIES and _FAMILIES[facts.name] is not facts:
    raise ValueError(f'Family {facts.name!r} is registered twice; each family registers its facts once.')
  _FAMILIES[facts.name] = facts
  return facts


def get_family(name: str) -> FamilyFacts:
  """The facts of family `name`; an unknown name raises a ValueError naming the known families."""
  try:
    return _FAMILIES[name]
  except KeyError:
    raise ValueError(f'No facts registered for model family {name!r}. Known families: {known_families()}. '
                     'A family registers them with vit_jax.models.facts.register_family in its model file, '
                     'imported from vit_jax/models/__init__.py.') from None


def known_families() -> list[str]:
  """Sorted names of the families with registered facts."""
  return sorted(_FAMILIES)
