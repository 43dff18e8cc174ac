"""MViTv2: parameter counts (REFERENCE.md section 1, exact timm counts), timm layout, rel-pos maths, forwards."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests import model_utils
from vit_jax.models import mvitv2
from vit_jax.models import registry

# Tiny config: 64 px -> stage maps 16, 8, 4, 2 with kv strides 4, 2, 1, 1, so the rel-pos tables see q/k ratios
# 4 (stage 0), 1 and 2 (stage 1), 1/2 (q smaller than k at stages 2-3 block 0). Widths 8, 16, 32, 64 with heads
# 1, 2, 4, 8 (head_dim 8), so every stage but the first opens with the widening shortcut projection.
# (CPU compiles dominate the run time: tests share these shapes and use eval_shape + random params.)
TINY = dict(num_classes=5, depths=(2, 1, 2, 1), embed_dim=8, num_heads=1, mlp_ratio=2.0, img_size=64,
            drop_path_rate=0.0)
TINY_SIZE = 64


_count = model_utils.count_params


def _images(size=TINY_SIZE, batch=2, seed=0, width=None):
  return model_utils.images(batch, size, seed, width)


_random_variables = model_utils.random_variables


def _loss(model, x):
  return lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)


@pytest.fixture(scope='module')
def tiny():
  """(model, variables, outputs): one jitted forward feeds all the forward-contract tests."""
  model = mvitv2.MultiScaleVisionTransformerV2(**TINY)
  x = _images()
  variables = _random_variables(model, x)

  @jax.jit
  def forward(variables, x):
    feats = model.apply(variables, x, method='forward_features')
    return dict(
        logits=model.apply(variables, x), features=feats,
        intermediates=model.apply(variables, x, method='forward_intermediates'),
        normed=model.apply(variables, x, norm=True, method='forward_intermediates'),
        pre_logits=model.apply(variables, feats, pre_logits=True, method='forward_head'),
        head=model.apply(variables, feats, method='forward_head'))
  return model, variables, forward(variables, x)


# -- counts and registry ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('name,expected,reference_m', [
    ('mvitv2_t', 24_173_320, 24.17), ('mvitv2_s', 34_870_216, 34.87), ('mvitv2_b', 51_472_744, 51.47)])
def test_param_counts(name, expected, reference_m):
  spec = registry.get_model_spec(name)
  assert spec.num_params == expected
  count = _count(registry.create_model(name, num_classes=1000), 224)
  assert count == expected  # timm 1.0.31: sum(p.numel()) of timm.create_model(timm_name) (B too).
  assert abs(count / 1e6 - reference_m) <= 0.005


def test_registry_metadata():
  assert set(registry.list_models('mvitv2*')) == {'mvitv2_t', 'mvitv2_s', 'mvitv2_b'}
  spec = registry.get_model_spec('mvitv2_t')
  assert spec.family == 'mvitv2' and spec.image_size == 224 and spec.timm_name == 'mvitv2_tiny.fb_in1k'
  assert registry.get_model_spec('mvitv2_s').timm_name == 'mvitv2_small.fb_in1k'
  model = registry.create_model('mvitv2_s', num_classes=10)
  assert model.depths == (1, 2, 11, 2) and model.num_features == 768 and model.drop_path_rate == 0.1


def test_timm_layout_full_size():
  """Names and shapes of timm's mvitv2_tiny state dict (conv OIHW -> HWIO, linear transposed)."""
  model = registry.create_model('mvitv2_t', num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))['params']
  flat = {k: v.shape for k, v in traverse_util.flatten_dict(shapes, sep='/').items()}
  assert flat['patch_embed/proj/kernel'] == (7, 7, 3, 96) and flat['patch_embed/proj/bias'] == (96,)
  assert 'patch_embed/norm/scale' not in flat
  # Rel-pos rows 2 * max(q, kv) - 1 at the block's input size: stage 0 (56: q 56, kv 14), stage 1 block 0
  # (56: q 28, kv 28), stage 2 block 0 (28: q 14, kv 28), stage 3 (14: q 7, kv 14), non-first blocks.
  for key, rows in [('stages_0/blocks_0', 111), ('stages_1/blocks_0', 55), ('stages_1/blocks_1', 55),
                    ('stages_2/blocks_0', 55), ('stages_2/blocks_4', 27), ('stages_3/blocks_0', 27),
                    ('stages_3/blocks_1', 13)]:
    assert flat[f'{key}/attn/rel_pos_h'] == (rows, 96) and flat[f'{key}/attn/rel_pos_w'] == (rows, 96)
  assert flat['stages_1/blocks_0/shortcut_proj_attn/kernel'] == (96, 192)
  assert 'stages_1/blocks_1/shortcut_proj_attn/kernel' not in flat
  assert 'stages_0/blocks_0/shortcut_proj_attn/kernel' not in flat
  assert flat['stages_1/blocks_0/attn/qkv/kernel'] == (96, 576)
  assert flat['stages_1/blocks_0/attn/proj/kernel'] == (192, 192)
  for name in 'qkv':
    assert flat[f'stages_3/blocks_1/attn/pool_{name}/kernel'] == (3, 3, 1, 96)  # shared over heads
    assert f'stages_3/blocks_1/attn/pool_{name}/bias' not in flat
    assert flat[f'stages_3/blocks_1/attn/norm_{name}/scale'] == (96,)
  assert flat['stages_3/blocks_1/mlp/fc1/kernel'] == (768, 3072)
  assert flat['norm/scale'] == (768,) and flat['head/kernel'] == (768, 1000)
  assert mvitv2.stage_strides(4) == ((1, 2, 2, 2), (4, 2, 1, 1))


# -- decomposed relative positions --------------------------------------------------------------------------------

def test_rel_pos_index_by_hand():
  # Equal sizes: dist = i - j + (k - 1).
  np.testing.assert_array_equal(mvitv2.rel_pos_index(3, 3), [[2, 1, 0], [3, 2, 1], [4, 3, 2]])
  # q 4, k 2 (keys pooled by 2): k_ratio 2, dist = i - 2 j + 2.
  np.testing.assert_array_equal(mvitv2.rel_pos_index(4, 2), [[2, 0], [3, 1], [4, 2], [5, 3]])
  # q 2, k 4 (queries strided): q_ratio 2, dist = 2 i - j + 3.
  np.testing.assert_array_equal(mvitv2.rel_pos_index(2, 4), [[3, 2, 1, 0], [5, 4, 3, 2]])
  # Non-integer ratios truncate like torch's .long() (values checked against timm's torch code):
  # q 3, k 2 -> k_ratio 1.5, dist = i - 1.5 j + 1.5; q 5, k 3 -> k_ratio 5/3.
  np.testing.assert_array_equal(mvitv2.rel_pos_index(3, 2), [[1, 0], [2, 1], [3, 2]])
  np.testing.assert_array_equal(mvitv2.rel_pos_index(5, 3), [[3, 1, 0], [4, 2, 1], [5, 3, 2], [6, 4, 3], [7, 5, 4]])


def test_rel_pos_bias_matches_numpy_loops():
  rng = np.random.default_rng(0)
  b, heads, d = 2, 3, 4
  (qh, qw), (kh, kw) = (4, 2), (2, 4)
  rows = 2 * 4 - 1
  q = rng.standard_normal((b, heads, qh * qw, d)).astype(np.float32)
  attn = rng.standard_normal((b, heads, qh * qw, kh * kw)).astype(np.float32)
  table_h = rng.standard_normal((rows, d)).astype(np.float32)
  table_w = rng.standard_normal((rows, d)).astype(np.float32)
  got = attn + np.asarray(mvitv2.rel_pos_bias(jnp.asarray(q), (qh, qw), (kh, kw), jnp.asarray(table_h),
                                              jnp.asarray(table_w)))
  want = attn.copy()
  for bi in range(b):
    for h in range(heads):
      for y in range(qh):
        for x in range(qw):
          qi = y * qw + x
          for ky in range(kh):
            for kx in range(kw):
              dh = int(y * max(kh / qh, 1) - ky * max(qh / kh, 1) + (kh - 1) * max(qh / kh, 1))
              dw = int(x * max(kw / qw, 1) - kx * max(qw / kw, 1) + (kw - 1) * max(qw / kw, 1))
              want[bi, h, qi, ky * kw + kx] += q[bi, h, qi] @ table_h[dh] + q[bi, h, qi] @ table_w[dw]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- forward contracts ----------------------------------------------------------------------------------------------

def test_forward_shapes(tiny):
  model, _, out = tiny
  assert model.num_features == 64
  assert out['logits'].shape == (2, 5)
  assert out['features'].shape == (2, 2, 2, 64)
  assert [o.shape for o in out['intermediates']] == [(2, 16, 16, 8), (2, 8, 8, 16), (2, 4, 4, 32), (2, 2, 2, 64)]
  assert np.all(np.isfinite(np.asarray(out['logits'])))
  np.testing.assert_allclose(out['head'], out['logits'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['pre_logits'], jnp.mean(out['features'], axis=(1, 2)), rtol=1e-5, atol=1e-6)
  # forward_features is the final norm of the last stage; norm=True applies it to the last intermediate only.
  np.testing.assert_allclose(out['normed'][-1], out['features'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out['normed'][0], out['intermediates'][0], rtol=1e-6, atol=1e-6)
  assert not np.allclose(out['intermediates'][-1], out['features'])


def test_full_size_shapes():
  model = registry.create_model('mvitv2_s', num_classes=1000)
  x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  inter = jax.eval_shape(lambda v, x: model.apply(v, x, method='forward_intermediates'), shapes, x)
  assert [o.shape for o in inter] == [(1, 56, 56, 96), (1, 28, 28, 192), (1, 14, 14, 384), (1, 7, 7, 768)]
  assert jax.eval_shape(lambda v, x: model.apply(v, x), shapes, x).shape == (1, 1000)
  # Training mode (drop path 0.1) traces with a dropout rng; bf16 compute keeps float32 params.
  logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=True, rngs={'dropout': jax.random.PRNGKey(1)}),
                          shapes, x)
  assert logits.shape == (1, 1000)
  bf16 = registry.create_model('mvitv2_t', num_classes=0, dtype=jnp.bfloat16)
  bf_shapes = jax.eval_shape(bf16.init, jax.random.PRNGKey(0), x)
  assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(bf_shapes))
  assert jax.eval_shape(lambda v, x: bf16.apply(v, x), bf_shapes, x).shape == (1, 768)


def test_per_stage_widths_and_heads():
  model = mvitv2.MultiScaleVisionTransformerV2(num_classes=3, depths=(1, 1, 1, 1), embed_dim=(8, 16, 24, 32),
                                               num_heads=(1, 2, 3, 4), img_size=64)
  x = jnp.zeros((1, 64, 64, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)['params']
  assert shapes['stages_2']['blocks_0']['attn']['rel_pos_h'].shape == (15, 8)
  assert shapes['stages_2']['blocks_0']['attn']['pool_q']['kernel'].shape == (3, 3, 1, 8)
  assert model.num_features == 32


def test_every_parameter_gets_a_gradient(tiny):
  model, variables, _ = tiny
  grads = jax.jit(jax.grad(_loss(model, _images())))(variables['params'])
  flat = traverse_util.flatten_dict(grads, sep='/')
  assert len(flat) == len(traverse_util.flatten_dict(variables['params'], sep='/'))
  dead = [k for k, g in flat.items() if not np.any(np.asarray(g) != 0)]
  assert not dead, dead
  assert all(np.all(np.isfinite(np.asarray(g))) for g in flat.values())


def test_bad_inputs():
  model = mvitv2.MultiScaleVisionTransformerV2(**TINY)
  variables = _random_variables(model, jnp.zeros((1, TINY_SIZE, TINY_SIZE, 3)))
  with pytest.raises(ValueError, match='NHWC'):
    model.apply(variables, jnp.zeros((TINY_SIZE, TINY_SIZE, 3)))
  # Larger than img_size: the rel-pos tables are too short (timm would index out of range).
  with pytest.raises(ValueError, match='img_size=64'):
    jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((1, 96, 96, 3), jnp.float32))
  with pytest.raises(ValueError, match='empty'):
    model.stage_geometry(0, 64)
  # Smaller / non-square inputs whose indices fit run as in timm.
  assert model.stage_geometry(48, 64) == [(12, 16), (6, 8), (3, 4), (2, 2)]
  with pytest.raises(ValueError, match='num_heads'):
    bad = mvitv2.MultiScaleVisionTransformerV2(**{**TINY, 'num_heads': 3})
    jax.eval_shape(bad.init, jax.random.PRNGKey(0), jnp.zeros((1, TINY_SIZE, TINY_SIZE, 3)))
  with pytest.raises(ValueError, match='embed_dim'):
    bad = mvitv2.MultiScaleVisionTransformerV2(**{**TINY, 'embed_dim': (8, 16)})
    jax.eval_shape(bad.init, jax.random.PRNGKey(0), jnp.zeros((1, TINY_SIZE, TINY_SIZE, 3)))
