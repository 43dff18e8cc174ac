"""PVTv2: parameter counts (REFERENCE.md section 1), timm layout details and forward contracts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from vit_jax.models import pvt_v2
from vit_jax.models import registry

# Tiny config: a 64 px input gives stage maps 16, 8, 4, 2, so every spatial-reduction conv (8, 4, 2) yields a 2x2
# key/value map, and the linear variant pools 16/8/4/2 -> 7x7 (uneven, overlapping and upsampling bins).
# (CPU compiles dominate the run time: tests share these shapes and use eval_shape + random params.)
TINY = dict(num_classes=5, depths=(2, 1, 1, 1), embed_dims=(8, 16, 24, 32), num_heads=(1, 2, 3, 4),
            mlp_ratios=(2, 2, 2, 2), drop_path_rate=0.0)
TINY_SIZE = 64


_count = model_utils.count_params


def _images(size=TINY_SIZE, batch=2, seed=0, width=None):
  return model_utils.images(batch, size, seed, width)


_random_variables = model_utils.random_variables


def _loss(model, x):
  return lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)


@pytest.fixture(scope='module', params=[False, True], ids=['sr', 'linear'])
def tiny(request):
  """(model, variables, outputs): one jitted forward per variant feeds all the forward-contract tests."""
  model = pvt_v2.PyramidVisionTransformerV2(linear=request.param, **TINY)
  x = _images()
  variables = _random_variables(model, x)

  @jax.jit
  def forward(variables, x):
    feats = model.apply(variables, x, method='forward_features')
    return dict(
        logits=model.apply(variables, x), features=feats,
        intermediates=model.apply(variables, x, method='forward_intermediates'),
        pre_logits=model.apply(variables, feats, pre_logits=True, method='forward_head'),
        head=model.apply(variables, feats, method='forward_head'))
  return model, variables, forward(variables, x)


@pytest.fixture(scope='module')
def tiny_grads(tiny):
  model, variables, _ = tiny
  return jax.jit(jax.value_and_grad(_loss(model, _images())))(variables['params'])


# -- parameter counts and registry --------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['pvt_v2_b0', 'pvt_v2_b1', 'pvt_v2_b2', 'pvt_v2_b2_li'])
def test_registered_param_counts(name):
  spec = registry.get_model_spec(name)
  assert spec.family == 'pvt_v2' and spec.image_size == 224 and spec.timm_name == name
  expected = {'pvt_v2_b0': 3_666_760, 'pvt_v2_b1': 14_009_000, 'pvt_v2_b2': 25_362_856,
              'pvt_v2_b2_li': 22_553_512}[name]
  assert spec.num_params == expected
  assert _count(registry.create_model(name, num_classes=1000), 224) == expected


def test_registered_names():
  assert set(registry.list_models('pvt_v2*')) == {'pvt_v2_b0', 'pvt_v2_b1', 'pvt_v2_b2', 'pvt_v2_b2_li'}
  assert registry.create_model('pvt_v2_b2_li', num_classes=10).linear
  assert not registry.create_model('pvt_v2_b2', num_classes=10).linear
  assert registry.create_model('pvt_v2_b0', num_classes=10).num_features == 256


# -- layout ---------------------------------------------------------------------------------------------------------

def test_param_tree_names(tiny):
  model, variables, _ = tiny
  p = variables['params']
  assert set(p) == {'patch_embed', 'stages_0', 'stages_1', 'stages_2', 'stages_3', 'head'}
  assert p['patch_embed']['proj']['kernel'].shape == (7, 7, 3, 8)
  assert 'downsample' not in p['stages_0']
  for i, (c_in, c) in enumerate([(8, 16), (16, 24), (24, 32)], start=1):
    assert p[f'stages_{i}']['downsample']['proj']['kernel'].shape == (3, 3, c_in, c)
    assert set(p[f'stages_{i}']['downsample']) == {'proj', 'norm'}
  assert set(p['stages_0']) == {'blocks_0', 'blocks_1', 'norm'}
  for i, c in enumerate((8, 16, 24, 32)):
    blk = p[f'stages_{i}']['blocks_0']
    assert set(blk) == {'norm1', 'attn', 'norm2', 'mlp'}
    assert set(blk['mlp']) == {'fc1', 'dwconv', 'fc2'}
    assert blk['mlp']['dwconv']['kernel'].shape == (3, 3, 1, 2 * c)  # depthwise, like torch (2c, 1, 3, 3)
    assert blk['attn']['q']['kernel'].shape == (c, c) and blk['attn']['kv']['kernel'].shape == (c, 2 * c)
    attn_keys = {'q', 'kv', 'proj'}
    if model.linear:
      attn_keys |= {'sr', 'norm'}
      assert blk['attn']['sr']['kernel'].shape == (1, 1, c, c)
    elif i < 3:
      attn_keys |= {'sr', 'norm'}
      r = (8, 4, 2)[i]
      assert blk['attn']['sr']['kernel'].shape == (r, r, c, c)
    assert set(blk['attn']) == attn_keys


def test_overlap_patch_embed_padding_is_symmetric():
  """k7 s4 and k3 s2 convs pad k//2 on every side (PyTorch), unlike flax 'SAME' (which pads low 0 / high 1 here)."""
  rng = np.random.default_rng(0)
  for k, s, size in [(7, 4, 16), (7, 4, 15), (3, 2, 8), (3, 2, 7)]:
    embed = pvt_v2.OverlapPatchEmbed(k, s, 4)
    x = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    variables = _random_variables(embed, jnp.asarray(x))
    conv = variables['params']['proj']
    # Reference: explicit zero padding of k//2 per side, then a strided valid correlation, in numpy.
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    n_out = (size + 2 * p - k) // s + 1
    w = np.asarray(conv['kernel'])
    ref = np.zeros((1, n_out, n_out, 4), np.float32)
    for i in range(n_out):
      for j in range(n_out):
        patch = xp[0, i * s:i * s + k, j * s:j * s + k, :]
        ref[0, i, j] = np.einsum('hwc,hwco->o', patch, w) + np.asarray(conv['bias'])
    # And the module itself (conv + LayerNorm eps 1e-5) equals LN(reference conv).
    full = np.asarray(embed.apply(variables, jnp.asarray(x)))
    mu = ref.mean(-1, keepdims=True)
    var = ref.var(-1, keepdims=True)
    norm = variables['params']['norm']
    ln = (ref - mu) / np.sqrt(var + 1e-5) * np.asarray(norm['scale']) + np.asarray(norm['bias'])
    np.testing.assert_allclose(full, ln, rtol=1e-4, atol=1e-4)
    if size % 2 == 0:  # flax 'SAME' would pad (k//2 - 1, k//2) here: a different (shifted) result.
      same = jax.lax.conv_general_dilated(jnp.asarray(x), conv['kernel'], (s, s), 'SAME',
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + conv['bias']
      assert same.shape == ref.shape and not np.allclose(np.asarray(same), ref, atol=1e-3)


def test_adaptive_pool_matrix_matches_torch_bins():
  m = pvt_v2.adaptive_pool_matrix(10, 7)  # torch bins: [0,2) [1,3) [2,5) [4,6) [5,8) [7,9) [8,10)
  bins = [(0, 2), (1, 3), (2, 5), (4, 6), (5, 8), (7, 9), (8, 10)]
  for row, (a, b) in zip(m, bins):
    expected = np.zeros(10, np.float32)
    expected[a:b] = 1.0 / (b - a)
    np.testing.assert_allclose(row, expected)
  np.testing.assert_allclose(pvt_v2.adaptive_pool_matrix(14, 7), np.kron(np.eye(7), [[0.5, 0.5]]))
  up = pvt_v2.adaptive_pool_matrix(2, 7)  # upsampling: bins [0,1) x3, [0,2), [1,2) x3
  np.testing.assert_allclose(up, [[1, 0]] * 3 + [[0.5, 0.5]] + [[0, 1]] * 3)


# -- forward contracts ----------------------------------------------------------------------------------------------

def test_forward_shapes(tiny):
  model, _, out = tiny
  logits, feats = out['logits'], out['features']
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
  assert feats.shape == (2, 2, 2, 32) and model.num_features == 32
  np.testing.assert_allclose(out['pre_logits'], feats.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out['head'], logits, rtol=1e-5, atol=1e-6)


def test_forward_intermediates(tiny):
  model, _, out = tiny
  outs = out['intermediates']
  assert [o.shape for o in outs] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 24), (2, 2, 2, 32)]
  np.testing.assert_allclose(outs[-1], out['features'], rtol=1e-6, atol=1e-6)
  assert model.stage_resolutions(TINY_SIZE, TINY_SIZE) == [(16, 16), (8, 8), (4, 4), (2, 2)]
  # Non-square input: strides per axis.
  assert model.stage_resolutions(64, 96) == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_every_parameter_gets_a_gradient(tiny_grads):
  _, grads = tiny_grads
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  missing = [jax.tree_util.keystr(k) for k, g in flat if not bool(jnp.any(g != 0))]
  assert not missing, missing


def test_remat_same_outputs(tiny, tiny_grads):
  model, variables, _ = tiny
  x = _images()
  remat = pvt_v2.PyramidVisionTransformerV2(remat=True, linear=model.linear, **TINY)
  if model.linear:
    pytest.skip('remat is checked once, on the sr variant (compile time).')
  assert jax.tree_util.tree_structure(jax.eval_shape(remat.init, jax.random.PRNGKey(0), x)) == \
      jax.tree_util.tree_structure(variables)
  l0, g0 = tiny_grads
  l1, g1 = jax.jit(jax.value_and_grad(_loss(remat, x)))(variables['params'])
  np.testing.assert_allclose(l0, l1, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g0, g1)


def test_train_mode_dropout_and_drop_path():
  model = pvt_v2.PyramidVisionTransformerV2(**{**TINY, 'drop_path_rate': 0.5, 'drop_rate': 0.1})
  x = _images()
  variables = _random_variables(model, x)
  train = jax.jit(lambda rng: model.apply(variables, x, train=True, rngs={'dropout': rng}))
  a, b = train(jax.random.PRNGKey(1)), train(jax.random.PRNGKey(2))
  assert bool(jnp.all(jnp.isfinite(a))) and not np.allclose(a, b)
  rates = [float(r) for r in np.linspace(0.0, 0.5, sum(TINY['depths']))]
  assert rates[0] == 0.0 and rates[-1] == 0.5  # timm's linspace over all blocks


def test_bad_input_size_raises_clear_error():
  model = pvt_v2.PyramidVisionTransformerV2(**TINY)
  with pytest.raises(ValueError, match=r'too small.*stage 0 would be 4x4.*ratio 8.*at least 29x29'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match='NHWC'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((16, 16, 3)))
  # 29 px is the smallest that works for sr_ratios (8, 4, 2, 1); the linear variant takes any size.
  jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 29, 29, 3)))
  linear = pvt_v2.PyramidVisionTransformerV2(linear=True, **TINY)
  out = jax.eval_shape(linear.init, jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  assert _count(linear, 16) == _count(linear, 64) == sum(int(np.prod(s.shape))
                                                         for s in jax.tree_util.tree_leaves(out))


def test_bf16_compute_keeps_f32_params():
  model = pvt_v2.PyramidVisionTransformerV2(dtype=jnp.bfloat16, **TINY)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), _images())
  assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(shapes))
  out = jax.eval_shape(model.apply, shapes, _images())
  assert out.dtype == jnp.bfloat16 and out.shape == (2, 5)
