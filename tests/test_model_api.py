"""The timm-style model API, checked the same way for every family (tiny configs through the registry).

Every model has `forward_features` (final-normed, unpooled), `forward_head(features, pre_logits=True)` (pooled
pre-logits of width `num_features`), `forward_intermediates` (NHWC maps), a `drop_path_rate` override and a
per-block `remat` option that leaves the outputs unchanged. (Every parameter receiving a gradient is tested per
family: test_vit, test_deit, test_hybrid, test_mixer, test_swin, test_pvt_v2, test_mvitv2.)

Per-stage features: the hierarchical families (Swin v1/v2, PVTv2, MViTv2) return one map per stage at strides
4, 8, 16, 32 with the stage widths. ViT, DeiT, the hybrids and Mixer are isotropic: they return every block's
patch tokens as a map, all at the patch stride (stem stride x patch for hybrids) and hidden width, without the
class / distillation tokens.
"""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from vit_jax.models import create_model
from vit_jax.models import layers
from vit_jax.models import resnet_stem

_VIT = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
# family: (registry name, tiny overrides, image size, per-stage (stride, width) or None for isotropic models)
FAMILIES = {
    'vit': ('vit_ti16', dict(patch_size=4, **_VIT), 16, None),
    'deit': ('deit_ti16_distilled', dict(patch_size=4, **_VIT), 16, None),
    'hybrid': ('r26_vit_s32', dict(patch_size=1, resnet=(1,), resnet_width=0.5, **_VIT), 32, None),
    'mixer': ('mixer_s16', dict(patch_size=4, hidden_dim=16, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=32),
              16, None),
    'swin': ('swin_t', dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2), 64,
             [(4, 8), (8, 16), (16, 32), (32, 64)]),
    'swinv2': ('swinv2_t', dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2), 64,
               [(4, 8), (8, 16), (16, 32), (32, 64)]),
    'pvt_v2': ('pvt_v2_b0', dict(depths=(1, 1, 1, 1), embed_dims=(8, 16, 16, 24), num_heads=(1, 2, 2, 3)), 64,
               [(4, 8), (8, 16), (16, 16), (32, 24)]),
    'mvitv2': ('mvitv2_t', dict(depths=(1, 1, 1, 1), embed_dim=(8, 8, 16, 16), num_heads=(1, 1, 2, 2),
                                img_size=64), 64, [(4, 8), (8, 8), (16, 16), (32, 16)]),
    'maxvit': ('maxvit_t', dict(depths=(1, 1, 1, 1), embed_dim=(8, 8, 16, 16), stem_width=8, dim_head=8,
                                img_size=64), 64, [(4, 8), (8, 8), (16, 16), (32, 16)]),
}
# Residual branches with a DropPath per block: attention + MLP; MaxViT: MBConv + (attention + MLP) x block / grid.
DROP_PATHS_PER_BLOCK = {'maxvit': 5}
NUM_CLASSES = 3


def _model(family, **kw):
  name, overrides, _, _ = FAMILIES[family]
  return create_model(name, num_classes=NUM_CLASSES, **{**overrides, 'drop_path_rate': 0.0, **kw})


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family_outputs(request):
  """One jitted program per family computes everything the API tests look at (CPU compiles dominate)."""
  family = request.param
  size = FAMILIES[family][2]
  model, remat = _model(family), _model(family, remat=True)
  x = model_utils.images(2, size)
  variables = model_utils.random_variables(model, x)  # Plus BatchNorm statistics where the model has them.
  variables = {c: jax.tree.map(jnp.abs, t) if c == 'batch_stats' else t for c, t in variables.items()}

  @jax.jit
  def run(v, x):
    feats = model.apply(v, x, method='forward_features')
    return dict(
        features=feats, head=model.apply(v, feats, train=False, method='forward_head'),  # Every family takes train.
        pre_logits=model.apply(v, feats, pre_logits=True, method='forward_head'),
        stages=model.apply(v, x, norm=True, method='forward_intermediates'),
        logits=remat.apply(v, x))  # == forward_head(forward_features) checks remat and __call__ at once.
  return family, model, run(variables, x)


def test_forward_features_and_head(family_outputs):
  """__call__ == forward_head(forward_features); pre-logits pooled from the final-normed features."""
  family, model, out = family_outputs
  assert out['logits'].shape == (2, NUM_CLASSES) and out['logits'].dtype == jnp.float32
  np.testing.assert_allclose(out['head'], out['logits'], atol=1e-6)
  assert out['pre_logits'].shape == (2, model.num_features)
  feats, last = out['features'], out['stages'][-1]
  if FAMILIES[family][3] is None:  # Token sequence: prefix tokens + the last map's patch tokens, final-normed.
    prefix = feats.shape[1] - last.shape[1] * last.shape[2]
    assert prefix == {'deit': 2, 'mixer': 0}.get(family, 1)
    np.testing.assert_allclose(feats[:, prefix:].reshape(last.shape), last, atol=1e-6)
    pooled = {0: lambda: feats.mean(axis=1), 1: lambda: feats[:, 0], 2: lambda: feats[:, :2].mean(axis=1)}[prefix]()
    np.testing.assert_allclose(out['pre_logits'], pooled, atol=1e-6)
  else:  # NHWC map, final-normed; pooled by the mean over H, W.
    np.testing.assert_allclose(feats, last, atol=1e-6)
    if family != 'maxvit':  # MaxViT's pre-logits are its head's tanh(Linear(LN(mean))) (test_maxvit).
      np.testing.assert_allclose(out['pre_logits'], feats.mean(axis=(1, 2)), atol=1e-5)


def test_per_stage_features(family_outputs):
  family, model, out = family_outputs
  _, overrides, size, stages = FAMILIES[family]
  if stages is None:
    depth = overrides.get('num_layers', overrides.get('num_blocks'))
    stride = overrides['patch_size'] * (4 if 'resnet' in overrides else 1)
    stages = [(stride, model.num_features)] * depth
  assert [m.shape for m in out['stages']] == [(2, size // s, size // s, c) for s, c in stages]
  assert model.num_features == stages[-1][1]


def test_remat_per_block_does_not_change_outputs(family_outputs):
  """`logits` come from the remat=True model; `head` from the plain one."""
  _, _, out = family_outputs
  np.testing.assert_allclose(out['logits'], out['head'], atol=1e-6)


# -- traced (not run) forwards: drop-path rates, Flax vs PyTorch defaults -----------------------------------------

def _trace(model, size):
  """Traces a training forward (nothing runs): every LayerNorm / GroupNorm / Conv / DropPath module called, as
  (path, module), and the jaxpr text."""
  seen = []

  def record(f, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(
        context.module, (nn.LayerNorm, nn.GroupNorm, nn.Conv, layers.DropPath)):
      seen.append(('/'.join(context.module.path), context.module))
    return f(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = model_utils.abstract_variables(model, x)
  with nn.intercept_methods(record):
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)},
                                                    mutable=['batch_stats'] if 'batch_stats' in v else False))(
        variables, x)
  return seen, str(jaxpr)


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def traced(request):
  family = request.param
  modules, jaxpr = _trace(_model(family, drop_path_rate=0.4), FAMILIES[family][2])
  return family, modules, jaxpr


def test_drop_path_rate_override(traced):
  """create_model(drop_path_rate=r) reaches every block's DropPath (growing linearly to r, or uniform for Mixer,
  as timm); that DropPath drops branches in training only is tested in test_vit / test_swin / test_pvt_v2."""
  family, modules, _ = traced
  rates = [m.rate for _, m in modules if isinstance(m, layers.DropPath)]
  overrides = FAMILIES[family][1]
  depth = sum(overrides.get('depths', ())) or overrides.get('num_layers') or overrides['num_blocks']
  assert len(rates) == DROP_PATHS_PER_BLOCK.get(family, 2) * depth  # E.g. the attention and MLP branches.
  assert max(rates) == pytest.approx(0.4) and min(rates) == (0.4 if family == 'mixer' else 0.0)
  assert rates == sorted(rates)


# LayerNorm epsilons of each family's reference: official flax ViT/Mixer and timm ViT/DeiT 1e-6; torch's
# nn.LayerNorm default 1e-5 for Swin; PVTv2 1e-6 in blocks/stages but 1e-5 in the patch embeddings and the
# spatial-reduction norm; MViTv2 1e-6.
_PVT_TORCH_DEFAULT = ('patch_embed/norm', 'downsample/norm', 'attn/norm')


def _expected_ln_eps(family, path):
  if family in ('swin', 'swinv2'):
    return 1e-5
  if family == 'pvt_v2' and path.endswith(_PVT_TORCH_DEFAULT):
    return 1e-5
  return 1e-6


def test_layer_norm_eps_and_conv_padding_follow_the_reference(traced):
  family, modules, _ = traced
  norms = [(p, m) for p, m in modules if isinstance(m, nn.LayerNorm)]
  assert norms, family
  wrong = [(p, m.epsilon) for p, m in norms if m.epsilon != _expected_ln_eps(family, p)]
  assert not wrong, wrong
  for path, m in modules:
    if isinstance(m, nn.GroupNorm):  # Hybrid stem: official flax GroupNorm eps (timm's 1e-5 is an option).
      assert m.epsilon == 1e-6 and m.num_groups == 32, path
    elif isinstance(m, resnet_stem.StdConv):  # TF 'SAME' padding, as the official code and timm's StdConv2dSame.
      assert m.padding == 'SAME', path
    elif isinstance(m, nn.Conv):  # PyTorch pads symmetrically; flax's default 'SAME' would not for stride 2.
      kernel = tuple(m.kernel_size)
      symmetric = tuple((k // 2, k // 2) for k in kernel)
      assert m.padding == 'VALID' and tuple(m.strides or (1, 1)) == kernel or m.padding == symmetric, (
          path, m.padding, kernel, m.strides)


def _gelu_kinds(jaxpr):
  return {'exact': bool(re.search(r'\berfc?\b', jaxpr)), 'tanh': bool(re.search(r'\btanh\b', jaxpr))}


def test_gelu_flavour(traced):
  """Official JAX ViT / hybrids / Mixer: tanh GELU by default (exact with gelu_approximate=False, as timm);
  DeiT, Swin, PVTv2, MViTv2, MaxViT (PyTorch-born): exact erf GELU (MaxViT's one tanh is its pre-logits
  activation; its TF-weights variants use the tanh GELU, test_maxvit)."""
  family, _, jaxpr = traced
  if family == 'maxvit':
    assert len(re.findall(r'\btanh\b', jaxpr)) == 1
    jaxpr = jaxpr.replace('tanh', 'pre_logits_act')
  if family in ('vit', 'hybrid', 'mixer'):
    assert _gelu_kinds(jaxpr) == {'exact': False, 'tanh': True}
    exact = _trace(_model(family, gelu_approximate=False), FAMILIES[family][2])[1]
    assert _gelu_kinds(exact) == {'exact': True, 'tanh': False}
  else:
    assert _gelu_kinds(jaxpr) == {'exact': True, 'tanh': False}
