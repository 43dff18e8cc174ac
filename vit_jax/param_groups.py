"""Per-parameter optimizer settings chosen by regex on '/'-joined parameter paths.

Paths look like 'Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel' (ViT) or 'layers_2/blocks_5/attn/qkv/kernel'
(Swin). Rules are (regex, multiplier) pairs matched with `re.search`; the FIRST matching rule wins (big_vision's
convention), unmatched parameters get the default. Layer-wise lr decay numbers the parameters from the input up:
the stem (patch embedding, class/distillation tokens, position embedding, ResNet stem) is layer 0, the transformer
blocks are 1..L in forward order (Swin/PVT/MViT stages flattened), everything after them (final norm, head) is L + 1;
layer i gets multiplier decay ** (L + 1 - i) (BEiT / timm convention). Which parameters form the stem and the
blocks is each family's `LayerGrouping` (vit_jax/models/facts.py), found by the family name or, when none is
given, as the registered grouping that recognises the parameter names.
"""
from __future__ import annotations

import bisect
import math
import re
from typing import Any, Callable, Optional, Sequence, Union

from flax.core import meta
import jax
import jax.numpy as jnp
import optax

from vit_jax.models import facts

Rules = Sequence[tuple[str, float]]

def path_name(path: Sequence[Any]) -> str:
  """'/'-joined dict keys of a jax key path; attribute steps (e.g. the `value` of an nn.Partitioned box carrying
  logical axis names) are skipped, so boxed and plain trees give the same names."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
  return '/'.join(parts)


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _is_leaf(x: Any) -> bool:
  """Frozen (masked) params and boxed params (nn.Partitioned: logical axis names) count as one leaf each, so a
  label tree is a prefix of the boxed params and optax masks whole boxes."""
  return isinstance(x, (optax.MaskedNode, meta.AxisMetadata))


def named_map(fn: Callable[[str, Any], Any], tree: Any) -> Any:
  """tree_map with the '/'-joined path name; optax MaskedNodes (frozen parameters) are passed through."""
  return jax.tree_util.tree_map_with_path(lambda p, x: x if _is_masked(x) else fn(path_name(p), x), tree,
                                          is_leaf=_is_leaf)


def all_names(tree: Any) -> list[str]:
  """Path names of every leaf, frozen (masked) ones included, so numbering ignores what is frozen."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]
  return [path_name(p) for p, _ in leaves]


def check_rules(rules: Rules, what: str) -> list[tuple[re.Pattern, float]]:
  """Compiles (regex, multiplier) rules; a bad regex or a negative multiplier names the config key."""
  compiled = []
  for rule in rules:
    if not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ValueError(f'{what}: each rule must be a (regex, multiplier) pair, got {rule!r}.')
    pattern, mult = rule
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f'{what}: bad regex {pattern!r}: {e}.') from None
    if not isinstance(mult, (int, float)) or mult < 0:
      raise ValueError(f'{what}: multiplier for {pattern!r} must be a number >= 0, got {mult!r}.')
    compiled.append((regex, float(mult)))
  return compiled


def rule_value(name: str, rules: Sequence[tuple[re.Pattern, float]], default: float) -> float:
  """Multiplier of the first rule whose regex matches `name`, else `default`."""
  for regex, mult in rules:
    if regex.search(name):
      return mult
  return default


def _block_key(name: str, grouping: facts.LayerGrouping) -> Optional[tuple[str, int, float]]:
  """('block', stage, block) for a block's parameter, (before|after, stage, -+inf) for a stage's extra modules."""
  for pattern, kind in grouping.blocks:
    m = re.search(pattern, name)
    if m:
      if kind == 'block1':
        return ('block', 0, int(m.group(1)))
      if kind == 'block2':
        return ('block', int(m.group(1)), int(m.group(2)))
      return (kind, int(m.group(1)), math.inf if kind == 'after' else -math.inf)
  return None


def _ids(names: Sequence[str], grouping: facts.LayerGrouping) -> tuple[dict[str, int], int]:
  keys = {n: _block_key(n, grouping) for n in names}
  blocks = sorted({(k[1], k[2]) for k in keys.values() if k and k[0] == 'block'})
  num_blocks = len(blocks)
  ids = {}
  for n, k in keys.items():
    if k is None:
      ids[n] = 0 if re.search(grouping.stem, n) else num_blocks + 1
    elif k[0] == 'block':
      ids[n] = blocks.index((k[1], k[2])) + 1
    elif k[0] == 'before':  # First block of the stage (or, if the stage has none, the next one).
      ids[n] = min(bisect.bisect_left(blocks, (k[1], -math.inf)) + 1, num_blocks + 1)
    else:  # Last block of the stage.
      ids[n] = max(bisect.bisect_right(blocks, (k[1], math.inf)), 0)
  return ids, num_blocks


def _candidate_groupings() -> dict[str, facts.LayerGrouping]:
  return {n: facts.get_family(n).grouping for n in facts.known_families() if facts.get_family(n).grouping}


def _detect_grouping(names: Sequence[str]) -> facts.LayerGrouping:
  """The registered grouping that recognises the most of `names` (as block, stage or stem parameters), the more
  specific one (more of its rules used) on a tie. Groupings that still tie must agree on every id; otherwise the
  caller has to name the family. Families anchor their regexes ('^...') so that they do not claim another
  family's parameters (e.g. MAE's decoder blocks, which are not ViT encoder blocks)."""
  def score(grouping):
    fired = [next((i for i, (rx, _) in enumerate(grouping.blocks) if re.search(rx, n)), None) for n in names]
    known = sum(f is not None or bool(re.search(grouping.stem, n)) for f, n in zip(fired, names))
    return known, len({f for f in fired if f is not None})
  scored = [(score(g), fam, g) for fam, g in _candidate_groupings().items()]
  if not scored:
    raise ValueError('No model family registers a LayerGrouping; layer-wise lr decay cannot number the layers.')
  best = max(s for s, _, _ in scored)
  top = [(fam, g) for s, fam, g in scored if s == best]
  results = {fam: _ids(names, g) for fam, g in top}
  if len({repr(sorted(r[0].items())) + str(r[1]) for r in results.values()}) > 1:
    raise ValueError(f'The parameter names fit the layer groupings of families {sorted(results)} equally but '
                     'they number the layers differently; pass family= (the model\'s registry family).')
  return top[0][1]


def grouping_for(names: Sequence[str], family: Optional[str] = None) -> facts.LayerGrouping:
  """The LayerGrouping of `family` (from its registered facts), or the one that recognises `names` if None."""
  if family is None:
    return _detect_grouping(names)
  grouping = facts.get_family(family).grouping
  if grouping is None:
    raise ValueError(f'Model family {family!r} registers no LayerGrouping, so layer-wise lr decay cannot number '
                     'its layers; add one to its FamilyFacts (or set config.optimizer.layer_decay=1).')
  return grouping


def layer_ids(names: Sequence[str], family: Optional[str] = None) -> tuple[dict[str, int], int]:
  """{name: layer id} (0 stem, 1..L blocks, L + 1 after) and L, the number of blocks.

  The numbering follows `family`'s LayerGrouping (by default, the registered grouping that fits the names).
  """
  return _ids(names, grouping_for(names, family))


def lr_multipliers(tree: Any, rules: Rules = (), layer_decay: float = 1.0, family: Optional[str] = None) -> Any:
  """Tree of floats: the regex multiplier times decay ** (L + 1 - layer id) (layers as `layer_ids`)."""
  compiled = check_rules(rules, 'config.optimizer.lr_multipliers')
  names = all_names(tree)
  if layer_decay != 1.0 and any('/encoderblock/' in f'/{n}' for n in names):
    raise ValueError('config.optimizer.layer_decay needs one parameter set per block; with config.scan_layers=True '
                     'the blocks are stacked. Set scan_layers=False (or layer_decay=1).')
  ids, num_blocks = layer_ids(names, family) if layer_decay != 1.0 else ({}, 0)
  def mult(name, _):
    m = rule_value(name, compiled, 1.0)
    if layer_decay != 1.0:
      m *= layer_decay ** (num_blocks + 1 - ids[name])
    return m
  return named_map(mult, tree)


def wd_multipliers(tree: Any, rules: Rules = ()) -> Any:
  """Tree of floats: the regex multiplier; unmatched weight matrices / conv kernels 1, everything else 0."""
  compiled = check_rules(rules, 'config.optimizer.wd_multipliers')
  def mult(name, _):
    return rule_value(name, compiled, 1.0 if name.rsplit('/', 1)[-1] == 'kernel' else 0.0)
  return named_map(mult, tree)


def frozen_labels(tree: Any, freeze: str) -> Any:
  """'frozen' for parameters whose name matches the `freeze` regex, else 'trainable'."""
  try:
    regex = re.compile(freeze)
  except re.error as e:
    raise ValueError(f'config.optimizer.freeze: bad regex {freeze!r}: {e}.') from None
  return named_map(lambda name, _: 'frozen' if regex.search(name) else 'trainable', tree)


def scale_by_multipliers(multipliers_fn: Callable[[Any], Any]) -> optax.GradientTransformation:
  """Multiplies each update by its multiplier (computed from the tree's structure, so it is static)."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    mults = multipliers_fn(updates)
    scaled = jax.tree.map(lambda u, m: u if _is_masked(u) or m == 1.0 else u * m, updates, mults, is_leaf=_is_masked)
    return scaled, state
  return optax.GradientTransformation(init_fn, update_fn)


def add_decayed_weights(weight_decay: Union[float, optax.Schedule],
                        multipliers_fn: Callable[[Any], Any]) -> optax.GradientTransformation:
  """updates + weight_decay * multiplier * params, per parameter (optax.add_decayed_weights with real multipliers).

  `weight_decay` may be a schedule of the update count (e.g. DINO's cosine 0.04 -> 0.4); its state then counts
  updates (a float keeps the empty state, so existing checkpoints restore unchanged).
  """
  scheduled = callable(weight_decay)

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32)) if scheduled else optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError('add_decayed_weights needs the params.')
    mults = multipliers_fn(updates)
    wd = weight_decay(state.count) if scheduled else weight_decay
    out = jax.tree.map(lambda u, p, m: u if _is_masked(u) or m == 0.0 else u + (wd * m) * p.astype(u.dtype),
                       updates, params, mults, is_leaf=_is_masked)
    if scheduled:
      state = optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))
    return out, state
  return optax.GradientTransformation(init_fn, update_fn)
