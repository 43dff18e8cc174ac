"""ConvNeXt, CaiT and BEiT: published parameter counts, the timm-style API, timm parity on committed fixtures,
layer grouping, analytic FLOPs, BEiT's table resizing, and a few training steps of the main job per family.

Fixtures under tests/parity/fixtures/{convnext,cait,beit}.* were made by tests/parity/make_fixtures.py (torch +
timm); these tests need neither.
"""
import functools
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from vit_jax.models import beit
from vit_jax.models import cait
from vit_jax.models import convnext
from vit_jax.models import layers
from vit_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'parity', 'fixtures')
NUM_CLASSES = 3

# REFERENCE.md section 7: timm's counts at 224 px with 1000 classes.
PUBLISHED = {
    'convnext_t': (28_589_128, 'convnext_tiny'), 'convnext_s': (50_223_688, 'convnext_small'),
    'convnext_b': (88_591_464, 'convnext_base'), 'convnext_l': (197_767_336, 'convnext_large'),
    'cait_xxs24': (11_956_264, 'cait_xxs24_224'), 'cait_xxs36': (17_299_720, 'cait_xxs36_224'),
    'cait_s24': (46_916_200, 'cait_s24_224'),
    'beit_b16': (86_530_984, 'beit_base_patch16_224'), 'beit_l16': (304_430_568, 'beit_large_patch16_224'),
}

# family: (registry name, tiny overrides, image size, per-stage (stride, width))
TINY = {
    'convnext': ('convnext_t', dict(depths=(1, 1, 1, 1), dims=(8, 8, 16, 16)), 32,
                 [(4, 8), (8, 8), (16, 16), (32, 16)]),
    'cait': ('cait_xxs24', dict(patch_size=4, embed_dim=16, depth=2, num_heads=2), 16, [(4, 16)] * 2),
    'beit': ('beit_b16', dict(patch_size=4, embed_dim=16, depth=2, num_heads=2), 16, [(4, 16)] * 2),
}


def _model(family, **kw):
  name, overrides, _, _ = TINY[family]
  return registry.create_model(name, num_classes=NUM_CLASSES, **{**overrides, 'drop_path_rate': 0.0, **kw})


# -- registry -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_registered_counts_and_timm_names(name):
  spec = registry.get_model_spec(name)
  count, timm_name = PUBLISHED[name]
  assert spec.num_params == count and spec.timm_name == timm_name and spec.image_size == 224
  assert spec.family == name.split('_')[0]  # The eval_shape count is test_vit's registry-wide count test.


def test_family_hyperparameters():
  """The published shapes behind the counts: layer-scale inits and depths/widths (timm's constructors)."""
  kw = lambda n: registry.get_model_spec(n).kwargs
  assert kw('convnext_b')['dims'] == (128, 256, 512, 1024) and kw('convnext_s')['depths'] == (3, 3, 27, 3)
  assert convnext.ConvNeXt().layer_scale_init == 1e-6
  assert [kw(n)['layer_scale_init'] for n in ('cait_xxs24', 'cait_s24', 'beit_b16', 'beit_l16')] == [
      1e-5, 1e-5, 0.1, 1e-5]
  assert kw('cait_xxs36')['depth'] == 36 and cait.CaiT().depth_token_only == 2


# -- the timm-style API -------------------------------------------------------------------------------------------

@pytest.fixture(scope='module', params=sorted(TINY))
def outputs(request):
  """One jitted program per family (CPU compiles dominate): features, head, pre-logits, per-stage maps, and the
  logits of the remat and 'xla'-attention variants."""
  family = request.param
  size = TINY[family][2]
  model = _model(family)
  remat = _model(family, remat=True)
  xla = _model(family, attention_impl='xla') if family != 'convnext' else model
  x = model_utils.images(2, size)
  params = model_utils.random_variables(model, x)['params']

  @jax.jit
  def run(params, x):
    v = {'params': params}
    feats = model.apply(v, x, method='forward_features')
    return dict(features=feats, head=model.apply(v, feats, train=False, method='forward_head'),
                pre_logits=model.apply(v, feats, pre_logits=True, method='forward_head'),
                stages=model.apply(v, x, method='forward_intermediates'),
                logits=remat.apply(v, x), xla=xla.apply(v, x))
  return family, model, params, run(params, x)


def test_forward_head_and_pre_logits(outputs):
  """__call__ == forward_head(forward_features); pre-logits are each family's pooling (timm's forward_head)."""
  family, model, params, out = outputs
  assert out['logits'].shape == (2, NUM_CLASSES) and out['logits'].dtype == jnp.float32
  np.testing.assert_allclose(out['head'], out['logits'], atol=1e-6)  # Also: remat leaves the outputs unchanged.
  assert out['pre_logits'].shape == (2, model.num_features)
  feats = np.asarray(out['features'])
  if family == 'convnext':  # NHWC map; the head norm comes after the mean over H, W.
    pooled, norm = feats.mean(axis=(1, 2)), params['head_norm']
  elif family == 'beit':  # Tokens [cls, patches]; mean of the patch tokens, then fc_norm.
    pooled, norm = feats[:, 1:].mean(axis=1), params['fc_norm']
  else:  # CaiT: the (final-normed) class token.
    pooled, norm = feats[:, 0], None
  if norm is not None:
    mu, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
    pooled = (pooled - mu) / np.sqrt(var + 1e-6) * np.asarray(norm['scale']) + np.asarray(norm['bias'])
  np.testing.assert_allclose(out['pre_logits'], pooled, atol=1e-5)


def test_per_stage_features(outputs):
  family, model, _, out = outputs
  _, _, size, stages = TINY[family]
  assert [m.shape for m in out['stages']] == [(2, size // s, size // s, c) for s, c in stages]
  assert model.num_features == stages[-1][1]
  feats = out['features']
  last = out['stages'][-1]
  if family == 'convnext':  # forward_features is the last stage map (timm's norm_pre is the identity).
    np.testing.assert_allclose(feats, last, atol=1e-6)
  elif family == 'beit':  # No final norm: the last block's patch tokens.
    np.testing.assert_allclose(feats[:, 1:].reshape(last.shape), last, atol=1e-6)


def test_attention_kernel_choice_keeps_logits(outputs):
  """attention_impl='xla' (jax.nn.dot_product_attention) gives the einsum path's logits (CaiT: class attention)."""
  _, _, _, out = outputs
  np.testing.assert_allclose(out['xla'], out['logits'], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(TINY))
def test_every_parameter_gets_a_gradient(family):
  model = _model(family)
  x = model_utils.images(2, TINY[family][2])
  params = model_utils.random_variables(model, x)['params']
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)))(params)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
  assert not dead, dead


def _trace(model, size):
  """Traces a training forward (nothing runs): every LayerNorm / Conv / DropPath module called, and the jaxpr."""
  seen = []

  def record(f, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, (nn.LayerNorm, nn.Conv, layers.DropPath)):
      seen.append(('/'.join(context.module.path), context.module))
    return f(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = model_utils.abstract_variables(model, x)
  with nn.intercept_methods(record):
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)}))(
        variables, x)
  return seen, str(jaxpr)


@pytest.mark.parametrize('family', sorted(TINY))
def test_drop_path_eps_gelu_and_padding(family):
  """drop_path_rate reaches every residual branch (linear in depth; constant in CaiT's self-attention blocks and
  none in its class-attention blocks); LayerNorm eps 1e-6; exact GELU; PyTorch conv padding."""
  modules, jaxpr = _trace(_model(family, drop_path_rate=0.4), TINY[family][2])
  rates = [(p, m.rate) for p, m in modules if isinstance(m, layers.DropPath)]
  overrides = TINY[family][1]
  if family == 'convnext':
    assert [r for _, r in rates] == pytest.approx(list(np.linspace(0, 0.4, sum(overrides['depths']))))
  elif family == 'beit':
    assert [r for _, r in rates] == pytest.approx(list(np.repeat(np.linspace(0, 0.4, overrides['depth']), 2)))
  else:
    assert [r for _, r in rates] == [0.4] * (2 * overrides['depth'])
    assert not any('token_only' in p for p, _ in rates)
  norms = [(p, m.epsilon) for p, m in modules if isinstance(m, nn.LayerNorm)]
  assert norms and all(eps == 1e-6 for _, eps in norms), norms
  assert re.search(r'\berfc?\b', jaxpr) and not re.search(r'\btanh\b', jaxpr)
  for path, m in modules:
    if isinstance(m, nn.Conv):
      kernel = tuple(m.kernel_size)
      patchify = m.padding == 'VALID' and tuple(m.strides) == kernel
      assert patchify or m.padding == tuple((k // 2, k // 2) for k in kernel), (path, m.padding)


@pytest.mark.parametrize('family, size, match', [
    ('convnext', 16, 'too small'), ('cait', 18, 'multiple of patch_size'), ('beit', 18, 'multiple of patch_size')])
def test_bad_input_size_names_the_fix(family, size, match):
  with pytest.raises(ValueError, match=match):
    model_utils.abstract_params(_model(family), size)


def test_parameters_follow_the_grid_and_refuse_another():
  """CaiT's pos_embed and BEiT's bias tables are sized by the patch grid; other sizes are refused by name."""
  for family, what in (('cait', 'pos_embed'), ('beit', 'relative_position_bias_table')):
    model = _model(family)
    params = model_utils.random_params(model, 16)
    with pytest.raises(ValueError, match=what):
      jax.eval_shape(functools.partial(model.apply, {'params': params}), jnp.zeros((1, 24, 24, 3)))


def test_beit_relative_position_index():
  """timm's gen_relative_position_index for a 2x2 grid: offsets (dy + 1) * 3 + (dx + 1), then the class rows."""
  index = beit.relative_position_index((2, 2))
  assert index.shape == (5, 5) and beit.table_rows((2, 2)) == 12
  np.testing.assert_array_equal(index[1:, 1:], [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
  assert (index[0, 1:] == 9).all() and (index[1:, 0] == 10).all() and index[0, 0] == 11


def test_cait_talking_heads_mix_after_softmax():
  """proj_w maps the softmax weights across heads: with a zero kernel and bias 1/N every query weighs all N keys
  equally, whatever the logits (so proj_w really acts on the post-softmax weights, per head axis)."""
  attn = cait.TalkingHeadAttention(num_heads=2)
  x = model_utils.images(1, 4)[:, 0, :, :2].repeat(2, axis=-1)  # (1, 4 tokens, width 4)
  params = model_utils.randomize(jax.eval_shape(attn.init, jax.random.key(0), x)['params'])
  params = {**params, 'proj_w': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.full((2,), 0.25)}}
  out = attn.apply({'params': params}, x)
  v = (x @ params['qkv']['kernel'] + params['qkv']['bias'])[..., 8:]  # The value third of the fused projection.
  mean_v = jnp.broadcast_to(v.mean(axis=1, keepdims=True), v.shape)
  np.testing.assert_allclose(out, mean_v @ params['proj']['kernel'] + params['proj']['bias'], atol=1e-5)
