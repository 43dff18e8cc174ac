"""Swin Transformer v1/v2: parameter counts, geometry details from REFERENCE.md section 3, forward contracts."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from vit_jax.models import registry
from vit_jax.models import swin

# A tiny config whose 64 px input exercises every geometry case: stage resolutions 16, 8, 4, 2 with window 4 give
# shifted + masked blocks in stages 0-1, a clamped unshifted stage 2 (4 <= 4) and a clamped 2x2 window in stage 3.
# (CPU compiles dominate the run time: tests share these shapes, run eagerly, and use eval_shape + random params.)
TINY = dict(num_classes=5, embed_dim=8, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4,
            drop_path_rate=0.0)
TINY_SIZE = 64


_count = model_utils.count_params


def _images(size=TINY_SIZE, batch=2, seed=0, width=None):
  return model_utils.images(batch, size, seed, width)


_random_variables = model_utils.random_variables


@pytest.fixture(scope='module', params=[swin.SwinTransformer, swin.SwinTransformerV2], ids=['v1', 'v2'])
def tiny(request):
  model = request.param(**TINY)
  return model, _random_variables(model, _images())


@pytest.fixture(scope='module')
def v2_block():
  block = swin.SwinBlock(num_heads=2, window=(4, 4), shift=(2, 2), version=2)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 16))
  return block, block.init(jax.random.PRNGKey(0), x), x


# -- parameter counts (REFERENCE.md section 1) --------------------------------------------------------------------

@pytest.mark.parametrize('name', registry.list_models('swin*'))
def test_registered_param_counts(name):
  spec = registry.get_model_spec(name)
  assert spec.family in ('swin', 'swinv2')
  assert spec.num_params is not None
  model = registry.create_model(name, num_classes=1000)
  assert _count(model, spec.image_size) == spec.num_params


def test_registered_names():
  assert set(registry.list_models('swin*')) == {
      'swin_t', 'swin_s', 'swin_b', 'swin_l', 'swin_b_384', 'swinv2_t', 'swinv2_s', 'swinv2_b', 'swinv2_l'}
  assert registry.get_model_spec('swin_t').timm_name == 'swin_tiny_patch4_window7_224'
  assert registry.get_model_spec('swinv2_t').timm_name == 'swinv2_tiny_window8_256'


def test_swin_t_window12_384_count():
  model = registry.create_model('swin_t', num_classes=1000, window_size=12)
  assert _count(model, 384) == 28_338_034


def test_swinv2_count_independent_of_window_and_size():
  model = registry.create_model('swinv2_t', num_classes=1000, window_size=16)
  assert _count(model, 256) == 28_347_154
  model = registry.create_model('swinv2_t', num_classes=1000, window_size=12, pretrained_window_size=8)
  assert _count(model, 192) == 28_347_154


# -- geometry (REFERENCE.md section 3) ------------------------------------------------------------------------------

def test_relative_position_index():
  np.testing.assert_array_equal(swin.relative_position_index(2, 2),
                                [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
  np.testing.assert_array_equal(swin.relative_position_index(3, 5)[0],
                                [22, 21, 20, 19, 18, 13, 12, 11, 10, 9, 4, 3, 2, 1, 0])
  idx = swin.relative_position_index(7, 7)
  assert idx.shape == (49, 49) and idx.min() == 0 and idx.max() == 13 * 13 - 1
  assert np.all(np.diag(idx) == 6 * 13 + 6)


def test_shifted_window_mask_4x4():
  mask = swin.shifted_window_mask((4, 4), (2, 2), (1, 1))
  assert mask.shape == (4, 4, 4)
  assert set(np.unique(mask)) == {0.0, -100.0}
  np.testing.assert_array_equal((mask == -100).sum(axis=(1, 2)), [0, 8, 8, 12])
  np.testing.assert_array_equal(mask, mask.transpose(0, 2, 1))


def test_shifted_window_mask_56_w7():
  mask = swin.shifted_window_mask((56, 56), (7, 7), (3, 3))
  assert mask.shape == (64, 49, 49)
  assert int(((mask == -100).any(axis=(1, 2))).sum()) == 15
  assert swin.shifted_window_mask((56, 56), (7, 7), (0, 0)) is None


def test_window_partition_roundtrip():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  w = swin.window_partition(x, (4, 4))
  assert w.shape == (2, 6, 16, 3)
  np.testing.assert_array_equal(w[0, 1].reshape(4, 4, 3), x[0, 0:4, 4:8])  # windows are row-major
  np.testing.assert_array_equal(swin.window_reverse(w, (4, 4), 8, 12), x)


def test_window_shift_clamping():
  assert swin.window_and_shift((56, 56), (7, 7), shifted=True) == ((7, 7), (3, 3))
  assert swin.window_and_shift((56, 56), (7, 7), shifted=False) == ((7, 7), (0, 0))
  assert swin.window_and_shift((7, 7), (7, 7), shifted=True) == ((7, 7), (0, 0))  # 224/w7 stage 3: no shift
  assert swin.window_and_shift((4, 4), (7, 7), shifted=True) == ((4, 4), (0, 0))
  assert swin.window_and_shift((7, 14), (7, 7), shifted=True) == ((7, 7), (0, 3))  # per axis, as timm
  geo = swin.SwinTransformer(window_size=7).stage_geometry(224, 224)
  assert [g['resolution'] for g in geo] == [(56, 56), (28, 28), (14, 14), (7, 7)]
  assert [g['shift'] for g in geo] == [(3, 3), (3, 3), (3, 3), (0, 0)]
  geo = swin.SwinTransformerV2(window_size=16).stage_geometry(256, 256)
  assert [g['window'] for g in geo] == [(16, 16), (16, 16), (16, 16), (8, 8)]
  assert [g['shift'] for g in geo] == [(8, 8), (8, 8), (0, 0), (0, 0)]


def test_clamped_window_uses_table_centre():
  # A 3x3 map with a configured window of 5 attends over the whole map with the centre 5x5 of the 9x9 table.
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 9, 4))
  full = swin.WindowAttention(num_heads=2, window=(3, 3), table_window=(5, 5))
  variables = full.init(jax.random.PRNGKey(1), x, None)
  table = variables['params']['relative_position_bias_table']
  assert table.shape == (81, 2)
  small = swin.WindowAttention(num_heads=2, window=(3, 3))
  centre = table.reshape(9, 9, 2)[2:7, 2:7].reshape(25, 2)
  small_vars = {'params': dict(variables['params'], relative_position_bias_table=centre)}
  np.testing.assert_allclose(full.apply(variables, x, None), small.apply(small_vars, x, None), rtol=1e-6)


def test_patch_merge_order():
  x = jnp.arange(1 * 4 * 6 * 3).reshape(1, 4, 6, 3)
  merged = swin.merge_patches(x)
  assert merged.shape == (1, 2, 3, 12)
  np.testing.assert_array_equal(merged[0, 0, 0], [0, 1, 2, 18, 19, 20, 3, 4, 5, 21, 22, 23])


@pytest.mark.parametrize('version', [1, 2])
def test_patch_merging_norm_placement(version):
  m = swin.PatchMerging(out_dim=6, version=version)
  params = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))['params']
  assert params['reduction']['kernel'].shape == (12, 6) and 'bias' not in params['reduction']
  assert params['norm']['scale'].shape == ((12,) if version == 1 else (6,))


def test_v2_cpb_coordinate_table():
  table = swin.relative_coords_table((2, 2))
  assert table.shape == (3, 3, 2) and table.dtype == np.float32
  # t = [-1, 0, 1] / (2-1) * 8 -> sign * log2(9) / 3.
  v = np.log2(9.0) / 3.0
  np.testing.assert_allclose(table[:, 0, 0], [-v, 0, v], rtol=1e-6)
  np.testing.assert_allclose(table[0, :, 1], [-v, 0, v], rtol=1e-6)
  # With a pretrained window the coordinates are normalised by it: window 8, pretrained 12 -> 7/11*8.
  table = swin.relative_coords_table((8, 8), (12, 12))
  assert table.shape == (15, 15, 2)
  np.testing.assert_allclose(table[-1, 0, 0], np.log2(7 / 11 * 8 + 1) / 3, rtol=1e-6)
  np.testing.assert_allclose(swin.relative_coords_table((8, 8))[-1, -1], [np.log2(9) / 3] * 2, rtol=1e-6)
  # Odd symmetry, and a 1-wide window gives zeros rather than timm's 0/0 NaN.
  np.testing.assert_allclose(table, -table[::-1, ::-1], atol=1e-7)
  np.testing.assert_array_equal(swin.relative_coords_table((1, 1)), np.zeros((1, 1, 2)))


# -- v2 specifics --------------------------------------------------------------------------------------------------

def test_v2_init_values(v2_block):
  _, variables, _ = v2_block
  p = variables['params']
  np.testing.assert_allclose(p['attn']['logit_scale'], np.full((2, 1, 1), np.log(10.0)), rtol=1e-6)
  for name in ('q_bias', 'v_bias'):
    np.testing.assert_array_equal(p['attn'][name], 0.0)
  assert 'bias' not in p['attn']['qkv']
  assert p['attn']['cpb_mlp']['fc1']['kernel'].shape == (2, 512)
  assert set(p['attn']['cpb_mlp']['fc2']) == {'kernel'}
  for norm in ('norm1', 'norm2'):  # res-post-norm starts at weight 0, bias 0
    np.testing.assert_array_equal(p[norm]['scale'], 0.0)
    np.testing.assert_array_equal(p[norm]['bias'], 0.0)


def test_fresh_v2_block_is_identity(v2_block):
  block, variables, x = v2_block
  np.testing.assert_array_equal(block.apply(variables, x), x)
  unshifted = swin.SwinBlock(num_heads=2, window=(4, 4), shift=(0, 0), version=2)
  np.testing.assert_array_equal(unshifted.apply(variables, x), x)


def test_v2_logit_scale_is_clamped(v2_block):
  block, variables, x = v2_block
  params = dict(variables['params'], norm1={'scale': jnp.ones(16), 'bias': jnp.zeros(16)})

  def out(scale):
    p = dict(params, attn=dict(params['attn'], logit_scale=jnp.full((2, 1, 1), scale)))
    return block.apply({'params': p}, x)
  np.testing.assert_allclose(out(np.log(100.0)), out(10.0), atol=1e-6)
  assert not np.allclose(out(np.log(10.0)), out(np.log(100.0)), atol=1e-3)


# -- forward contracts ---------------------------------------------------------------------------------------------

def test_param_tree_names(tiny):
  model, variables = tiny
  p = variables['params']
  assert set(p) == {'patch_embed', 'layers_0', 'layers_1', 'layers_2', 'layers_3', 'norm', 'head'}
  assert set(p['patch_embed']) == {'proj', 'norm'}
  assert 'downsample' not in p['layers_0']
  for i in (1, 2, 3):
    assert set(p[f'layers_{i}']['downsample']) == {'norm', 'reduction'}
  blk = p['layers_0']['blocks_1']
  assert set(blk) == {'norm1', 'attn', 'norm2', 'mlp'}
  assert set(blk['mlp']) == {'fc1', 'fc2'}
  if isinstance(model, swin.SwinTransformerV2):
    assert set(blk['attn']) == {'qkv', 'proj', 'q_bias', 'v_bias', 'logit_scale', 'cpb_mlp'}
  else:
    assert set(blk['attn']) == {'qkv', 'proj', 'relative_position_bias_table'}
    assert blk['attn']['relative_position_bias_table'].shape == (7 * 7, 1)
    # Tables are sized for the configured window even where it is clamped (stage 3 is 2x2 < 4).
    assert p['layers_3']['blocks_0']['attn']['relative_position_bias_table'].shape == (7 * 7, 4)


def test_forward_shapes(tiny):
  model, variables = tiny
  x = _images()
  logits = model.apply(variables, x)
  assert logits.shape == (2, 5) and bool(jnp.all(jnp.isfinite(logits)))
  feats = model.apply(variables, x, method='forward_features')
  assert feats.shape == (2, 2, 2, 64) and model.num_features == 64
  pre = model.apply(variables, feats, pre_logits=True, method='forward_head')
  np.testing.assert_allclose(pre, feats.mean(axis=(1, 2)), rtol=1e-6)
  np.testing.assert_allclose(model.apply(variables, feats, method='forward_head'), logits, rtol=1e-5, atol=1e-6)
  # forward_features ends with the final LayerNorm: undoing its affine leaves zero-mean, unit-variance tokens.
  norm = variables['params']['norm']
  z = (feats - norm['bias']) / norm['scale']
  np.testing.assert_allclose(z.mean(-1), 0.0, atol=1e-4)
  np.testing.assert_allclose(z.var(-1), 1.0, atol=1e-2)


def test_forward_intermediates(tiny):
  model, variables = tiny
  x = _images()
  outs = model.apply(variables, x, method='forward_intermediates')
  assert [o.shape for o in outs] == [(2, TINY_SIZE // s, TINY_SIZE // s, 8 * 2 ** i)
                                     for i, s in enumerate((4, 8, 16, 32))]
  normed = model.apply(variables, x, norm=True, method='forward_intermediates')
  np.testing.assert_allclose(normed[-1], model.apply(variables, x, method='forward_features'), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(normed[0], outs[0])


def test_same_parameters_for_any_valid_size(tiny):
  model, variables = tiny
  # 64x32: stage 3 is 2x1, so its window is clamped to 2x1 (a 1-wide CPB axis for v2), with the same parameters.
  out = jax.jit(model.apply)(variables, _images(width=32))
  assert out.shape == (2, 5) and bool(jnp.all(jnp.isfinite(out)))


def test_num_classes_zero(tiny):
  model, variables = tiny
  headless = model.clone(num_classes=0)
  params = {k: v for k, v in variables['params'].items() if k != 'head'}
  assert jax.tree_util.tree_structure(_random_variables(headless, _images())) == \
      jax.tree_util.tree_structure({'params': params})
  out = headless.apply({'params': params}, _images())
  np.testing.assert_allclose(out, model.apply(variables, _images(), method='forward_features').mean(axis=(1, 2)),
                             rtol=1e-5, atol=1e-6)


def test_remat_same_gradients():
  # One shifted, masked v2 stage (with patch merging) is enough to check the rematerialised backward pass.
  stage = swin.SwinStage(out_dim=16, depth=2, num_heads=2, window_size=4, downsample=True, version=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 16, 16, 8))
  variables = _random_variables(stage, x)

  def grads(m):
    return jax.jit(jax.grad(lambda p: jnp.sum(m.apply({'params': p}, x) ** 2)))(variables['params'])
  for a, b in zip(jax.tree_util.tree_leaves(grads(stage)), jax.tree_util.tree_leaves(grads(stage.clone(remat=True)))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_every_parameter_gets_a_gradient(tiny):
  model, variables = tiny
  x = _images()
  y = jax.random.normal(jax.random.PRNGKey(3), (2, 5))
  grads = jax.jit(jax.grad(lambda p: jnp.sum((model.apply({'params': p}, x) - y) ** 2)))(variables['params'])
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert len(flat) == len(jax.tree_util.tree_leaves(variables['params']))
  dead = [jax.tree_util.keystr(k) for k, g in flat if not np.any(np.asarray(g) != 0)]
  assert not dead, dead


def test_train_mode_dropout_and_drop_path(tiny):
  model, variables = tiny
  if isinstance(model, swin.SwinTransformerV2):
    pytest.skip('the wiring is shared; one version keeps the compile time down')
  x = _images()
  eval_out = model.apply(variables, x)
  # Attention / projection dropout are plain nn.Dropout layers; drop path and head dropout are cheap to sample.
  np.testing.assert_allclose(
      model.clone(drop_path_rate=0.5, drop_rate=0.2, attn_drop_rate=0.1, proj_drop_rate=0.1).apply(variables, x),
      eval_out, rtol=1e-6)  # rates are inert at eval
  model = model.clone(drop_path_rate=0.5, drop_rate=0.2)
  train_apply = jax.jit(lambda key: model.apply(variables, x, train=True, rngs={'dropout': key}))
  a, b = train_apply(jax.random.PRNGKey(1)), train_apply(jax.random.PRNGKey(2))
  assert not np.allclose(a, b) and not np.allclose(a, eval_out)


def test_drop_path_linspace(tiny):
  model, variables = tiny
  bound = model.clone(drop_path_rate=0.6).bind(variables)
  rates = [r for stage in bound.layers for r in stage.drop_path_rates]
  np.testing.assert_allclose(rates, np.linspace(0, 0.6, sum(TINY['depths'])))


def test_drop_path_module():
  x = jnp.ones((1000, 3))
  y = swin.DropPath(0.25).apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(0)})
  kept = np.asarray(y[:, 0] != 0)
  assert 0.65 < kept.mean() < 0.85
  np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-6)  # survivors rescaled; whole rows dropped
  assert np.all((y == 0).all(axis=1) | (y != 0).all(axis=1))
  np.testing.assert_array_equal(swin.DropPath(0.25).apply({}, x), x)


# -- errors --------------------------------------------------------------------------------------------------------

def test_bad_input_size_raises_clear_error():
  model = swin.SwinTransformer(**TINY)
  with pytest.raises(ValueError, match=r'Input size 48x48 .*stage 1 has resolution 6.*window 4.*64') as err:
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)))
  assert 'Fix' in str(err.value)
  with pytest.raises(ValueError, match='not divisible by patch_size 4'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 66, 64, 3)))
  # The registered Swin-T at 256 px: stage 0 is 64x64, not divisible by window 7.
  with pytest.raises(ValueError, match=r'Input size 256x256.*stage 0.*window 7.*224'):
    jax.eval_shape(registry.create_model('swin_t', num_classes=10).init, jax.random.PRNGKey(0),
                   jnp.zeros((1, 256, 256, 3)))


def test_bad_options():
  with pytest.raises(ValueError, match='no option'):
    registry.create_model('swin_t', num_classes=10, pretrained_window_size=8)  # v2-only option
  with pytest.raises(ValueError, match='one value per stage'):
    swin.SwinTransformer(**dict(TINY, window_size=(4, 4))).init(jax.random.PRNGKey(0), _images())
