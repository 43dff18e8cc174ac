"""Every registered model's family states its facts (vit_jax/models/facts.py) and they hold.

Parametrised over `list_models()`, so a family added later is checked without touching this file:
- its LayerGrouping numbers every parameter (stem 0, blocks 1..L with L >= 1, the rest L + 1);
- each of its conversion tables turns a random state dict in the reference layout, made from the model's own
  variable shapes by inverting each rule kind, back into exactly those variables (nothing left over, nothing
  missing, every array where it came from);
- its analytic FLOP count (where it gives one) is within 2% of XLA's cost analysis of the model's matmuls and
  convolutions.
Shapes come from `jax.eval_shape` (no arrays are initialised).
"""
import functools
import re
from re import _constants as sre_c  # pylint: disable=protected-access
from re import _parser as sre_parse  # pylint: disable=protected-access

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import convert
from vit_jax import param_groups
from vit_jax.models import facts
from vit_jax.models import registry
from tests import model_utils

MODELS = registry.list_models()
_BATCH_STATS = 'batch_stats/'


def _kind(name: str) -> tuple:
  spec = registry.get_model_spec(name)
  return spec.family, spec.builder, tuple(sorted(spec.kwargs))


def _smallest_per_kind() -> set[str]:
  """The smallest model (by parameter count) of each family, builder and option set: the quick tier."""
  chosen = {}
  for name in sorted(MODELS, key=lambda n: registry.get_model_spec(n).num_params or 0):
    chosen.setdefault(_kind(name), name)
  return set(chosen.values())


def _tiered(items, name_of=lambda item: item):
  """pytest params: the smallest model of each kind runs always, the larger ones are marked slow (the full
  suite still checks every registered model)."""
  quick = _smallest_per_kind()
  return [pytest.param(*(item if isinstance(item, tuple) else (item,)),
                       marks=() if name_of(item) in quick else pytest.mark.slow) for item in items]


@functools.lru_cache(maxsize=None)
def _shapes(name: str) -> dict:
  """Flat {path: ShapeDtypeStruct} of the model's params and ('batch_stats/'-prefixed) running statistics."""
  return convert.model_variable_shapes(name, num_classes=1000)


def test_every_family_has_facts():
  families = {registry.get_model_spec(n).family for n in MODELS}
  assert families <= set(facts.known_families())
  with pytest.raises(ValueError, match='Known families'):
    facts.get_family('no_such_family')


@pytest.mark.parametrize('name', _tiered(MODELS))
def test_layer_grouping_numbers_every_parameter(name):
  family = registry.get_model_spec(name).family
  assert facts.get_family(family).grouping is not None, f'family {family!r} has no LayerGrouping'
  names = [p for p in _shapes(name) if not p.startswith(_BATCH_STATS)]
  ids, num_blocks = param_groups.layer_ids(names, family)
  assert num_blocks >= 1
  assert set(ids) == set(names) and set(ids.values()) <= set(range(num_blocks + 2))
  assert set(range(1, num_blocks + 1)) <= set(ids.values())  # Every block has parameters.
  assert 0 in ids.values() and num_blocks + 1 in ids.values()  # A stem and a head.
  # Found from the names alone too (the trainer's optimizer does not know the family).
  assert param_groups.layer_ids(names) == (ids, num_blocks)


# --- Conversion tables, inverted. -------------------------------------------------------------------------------

def _strings(parsed, numbers: range) -> list[str]:
  """Every string the parsed regex matches, with each run of digits taking the values in `numbers`."""
  out = ['']
  for op, arg in parsed:
    if op is sre_c.LITERAL:
      options = [chr(arg)]
    elif op is sre_c.SUBPATTERN:
      options = _strings(arg[3], numbers)
    elif op is sre_c.BRANCH:
      options = [s for branch in arg[1] for s in _strings(branch, numbers)]
    elif op is sre_c.IN:
      options = _class_chars(arg)
    elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT):
      lo, hi, item = arg
      if (lo, hi) == (0, 1):
        options = [''] + _strings(item, numbers)
      elif lo == 1 and hi == sre_c.MAXREPEAT and list(item) == [(sre_c.IN, [(sre_c.CATEGORY,
                                                                             sre_c.CATEGORY_DIGIT)])]:
        options = [str(i) for i in numbers]
      else:
        raise NotImplementedError(f'regex repeat {arg} in a conversion rule')
    else:
      raise NotImplementedError(f'regex op {op} in a conversion rule')
    out = [a + b for a in out for b in options]
  return out


def _class_chars(items) -> list[str]:
  chars = []
  for op, arg in items:
    if op is sre_c.LITERAL:
      chars.append(chr(arg))
    elif op is sre_c.RANGE:
      chars.extend(chr(c) for c in range(arg[0], arg[1] + 1))
    elif op is sre_c.CATEGORY and arg is sre_c.CATEGORY_DIGIT:
      chars.extend('0123456789')
    else:
      raise NotImplementedError(f'regex class item {op} in a conversion rule')
  return chars


_LEAVES = {'batchnorm': ('weight', 'bias', 'running_mean', 'running_var')}


def _candidate_keys(table: facts.ConversionTable, numbers: range) -> list[str]:
  """Source keys the table's rules can match (module kinds with their leaves), in rule order."""
  keys = []
  for regex, _, kind in table.rules:
    if callable(kind):
      continue  # A function's source shapes cannot be inferred; its keys are not synthesised.
    leaves = [''] if kind in facts.WHOLE_KEY_KINDS else ['.' + x for x in _LEAVES.get(kind, ('weight', 'bias'))]
    keys += [s + leaf for s in _strings(sre_parse.parse(regex), numbers) for leaf in leaves]
  return keys


def _source_tensor(kind: str, leaf: str, path: str, ours: dict) -> tuple[list[str], np.ndarray]:
  """(our paths, source tensor): the inverse of `kind` for the '.leaf' of module `path`, from our arrays."""
  if kind in facts.WHOLE_KEY_KINDS:
    return [path], ours[path]
  if kind == 'batchnorm':
    target = {'weight': path + '/scale', 'bias': path + '/bias', 'running_mean': _BATCH_STATS + path + '/mean',
              'running_var': _BATCH_STATS + path + '/var'}[leaf]
    return [target], ours[target]
  if kind == 'norm':
    target = path + ('/scale' if leaf == 'weight' else '/bias')
    return [target], ours[target]
  if kind in ('linear', 'conv', 'mha_out') and leaf == 'bias':
    return [path + '/bias'], ours[path + '/bias']
  if kind == 'linear':
    return [path + '/kernel'], ours[path + '/kernel'].T
  if kind == 'conv':
    return [path + '/kernel'], ours[path + '/kernel'].transpose(3, 2, 0, 1)
  if kind == 'mha_out':  # (H, Dh, D) -> (D, H*Dh)
    kernel = ours[path + '/kernel']
    return [path + '/kernel'], kernel.reshape(-1, kernel.shape[-1]).T
  if kind == 'qkv':
    targets = [f'{path}/{part}/{"kernel" if leaf == "weight" else "bias"}' for part in ('query', 'key', 'value')]
    if leaf == 'weight':  # (D, H, Dh) each -> (3*H*Dh, D)
      return targets, np.concatenate([ours[t].reshape(ours[t].shape[0], -1).T for t in targets])
    return targets, np.concatenate([ours[t].reshape(-1) for t in targets])
  raise AssertionError(kind)


def _reference_state_dict(table: facts.ConversionTable, ours: dict, numbers: range) -> dict[str, np.ndarray]:
  """A state dict in the table's source layout holding `ours`: for every variable, the first candidate key that
  the table (first matching rule, as convert applies it) sends there."""
  compiled = [(re.compile(rx + convert._leaf_regex(kind)), tmpl, kind)  # pylint: disable=protected-access
              for rx, tmpl, kind in table.rules]
  sd, covered = {}, set()
  for key in _candidate_keys(table, numbers):
    if any(re.fullmatch(rx, key) for rx in table.ignore):
      continue
    for regex, tmpl, kind in compiled:
      m = regex.fullmatch(key)
      if m:
        break
    if not m or callable(kind):
      continue
    path = m.expand(tmpl) if isinstance(tmpl, str) else tmpl(m)
    leaf = None if kind in facts.WHOLE_KEY_KINDS else m.groups()[-1]
    try:
      targets, value = _source_tensor(kind, leaf, path, ours)
    except KeyError:
      continue  # Our model has no such variable: the candidate is not part of this model's layout.
    if covered.isdisjoint(targets):
      sd[key] = value
      covered.update(targets)
  return sd


def _layouts():
  return [(n, layout) for n in MODELS
          for layout in facts.get_family(registry.get_model_spec(n).family).layouts]


@pytest.mark.parametrize('name, layout', _tiered(_layouts(), lambda item: item[0]))
def test_conversion_table_inverts_to_every_variable(name, layout):
  spec = registry.get_model_spec(name)
  table = facts.get_family(spec.family).layouts[layout]
  shapes = _shapes(name)
  rng = np.random.default_rng(0)
  ours = {p: rng.standard_normal(s.shape).astype(np.float32) for p, s in shapes.items()}
  numbers = range(max([int(x) for p in shapes for x in re.findall(r'\d+', p)] + [0]) + 2)
  sd = _reference_state_dict(table, ours, numbers)
  flat, source, unused = convert._convert_keys(sd, table, shapes)  # pylint: disable=protected-access
  assert not unused, f'keys the table does not use: {unused}'
  left_over = sorted(set(flat) - set(shapes))
  assert not left_over, f'converted to paths the model lacks: {left_over}'
  missing = sorted(set(shapes) - set(flat))
  if any(callable(kind) for _, _, kind in table.rules):
    pytest.skip(f'{len(missing)} variables may come from function rules, which cannot be inverted generically')
  assert not missing, f'variables no rule produces: {missing}'
  for path, value in flat.items():
    np.testing.assert_array_equal(value, ours[path], err_msg=f'{path} (from {source[path]})')


def test_batchnorm_and_function_kinds_convert():
  table = facts.ConversionTable(rules=(
      (r'bn', 'norm', 'batchnorm'),
      (r'fused', 'split', lambda key, value, path, shapes: {f'{path}/a': value[:2], f'{path}/b': value[2:]}),
  ))
  shapes = {'norm/scale': None, 'norm/bias': None, 'batch_stats/norm/mean': None, 'batch_stats/norm/var': None,
            'split/a': None, 'split/b': None}
  sd = {'bn.weight': np.ones(3), 'bn.bias': np.zeros(3), 'bn.running_mean': np.full(3, 2.0),
        'bn.running_var': np.full(3, 4.0), 'bn.num_batches_tracked': np.array(7), 'fused': np.arange(5.0)}
  flat, _, unused = convert._convert_keys(sd, table, shapes)  # pylint: disable=protected-access
  assert not unused and set(flat) == set(shapes)
  np.testing.assert_array_equal(flat['batch_stats/norm/var'], np.full(3, 4.0))
  np.testing.assert_array_equal(flat['split/b'], [2.0, 3.0, 4.0])
  with pytest.raises(ValueError, match='Unknown conversion kind'):
    facts.ConversionTable(rules=((r'x', 'x', 'lienar'),))


# --- Analytic FLOPs against XLA. ----------------------------------------------------------------------------------

def _analytic_models():
  """Per family with an analytic count, its smallest registered model that the count applies to."""
  chosen = {}
  for name in sorted(MODELS, key=lambda n: registry.get_model_spec(n).num_params or 0):
    spec = registry.get_model_spec(name)
    count = facts.get_family(spec.family).forward_macs
    if count and spec.family not in chosen:
      model = registry.create_model(name, num_classes=10)
      if count(model, spec.image_size) is not None:
        chosen[spec.family] = name
  return sorted(chosen.values())


@pytest.mark.parametrize('name', _analytic_models())
def test_analytic_flops_match_xla_matmul_count(name):
  spec = registry.get_model_spec(name)
  model = registry.create_model(name, num_classes=10)
  size = spec.image_size
  analytic = 2 * facts.get_family(spec.family).forward_macs(model, size)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
  xla = model_utils.xla_matmul_flops(lambda v, img: model.apply(v, img), variables, jnp.zeros(x.shape, x.dtype))
  assert analytic == pytest.approx(xla, rel=0.02), (name, analytic, xla)

