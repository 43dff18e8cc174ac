"""The shared folding arithmetic of vit_jax.deploy, checked against running the unfolded layers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import deploy


def _bn(z, scale, offset, mean, var, eps):
  return (z - mean) / np.sqrt(var + eps) * scale + offset


@pytest.mark.parametrize('affine', [True, False])
def test_fold_batchnorm_into_dense(affine):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  w, b = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
  mean, var = rng.normal(size=5).astype(np.float32), rng.uniform(0.5, 2, size=5).astype(np.float32)
  scale = rng.normal(size=5).astype(np.float32) if affine else None
  offset = rng.normal(size=5).astype(np.float32) if affine else None
  want = _bn(x @ w + b, 1.0 if scale is None else scale, 0.0 if offset is None else offset, mean, var, 1e-5)
  w2, b2 = deploy.fold_batchnorm(w, b, scale=scale, offset=offset, mean=mean, var=var, epsilon=1e-5)
  np.testing.assert_allclose(x @ np.asarray(w2) + np.asarray(b2), want, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_into_conv_without_bias():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 7, 7, 3)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
  conv = lambda kernel: jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  scale, offset = rng.normal(size=4), rng.normal(size=4)
  mean, var = rng.normal(size=4), rng.uniform(0.5, 2, size=4)
  want = _bn(np.asarray(conv(k)), scale, offset, mean, var, 1e-3)
  k2, b2 = deploy.fold_batchnorm(k, None, scale=scale, offset=offset, mean=mean, var=var, epsilon=1e-3)
  np.testing.assert_allclose(np.asarray(conv(k2.astype(jnp.float32)) + b2), want, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_rejects_mismatched_channels():
  with pytest.raises(ValueError, match='cannot fold'):
    deploy.fold_batchnorm(np.zeros((3, 4)), None, scale=None, offset=None, mean=np.zeros(5), var=np.ones(5),
                          epsilon=1e-5)


@pytest.mark.parametrize('groups', [1, 4])
def test_branches_sum_into_one_conv(groups):
  rng = np.random.default_rng(2)
  c = 4
  x = jnp.asarray(rng.normal(size=(1, 6, 6, c)), jnp.float32)
  conv = lambda kernel: jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', feature_group_count=groups,
                                                     dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  k3 = jnp.asarray(rng.normal(size=(3, 3, c // groups, c)), jnp.float32)
  k1 = jnp.asarray(rng.normal(size=(1, 1, c // groups, c)), jnp.float32)
  want = conv(k3) + conv(k1) + x
  merged = k3 + deploy.pad_kernel_to(k1, (3, 3)) + deploy.identity_kernel(c, (3, 3), groups=groups)
  np.testing.assert_allclose(np.asarray(conv(merged)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_pad_kernel_rejects_odd_difference():
  with pytest.raises(ValueError, match='even'):
    deploy.pad_kernel_to(jnp.zeros((2, 2, 1, 1)), (3, 3))


def test_family_without_fold_is_returned_unchanged():
  from vit_jax import models
  model = models.create_model('vit_ti16', num_classes=3, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16,
                              patch_size=8)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=False)
  folded_model, folded = deploy.fold_for_inference('vit_ti16', variables, num_classes=3, hidden_size=8,
                                                   num_layers=1, num_heads=2, mlp_dim=16, patch_size=8)
  x = jnp.ones((1, 16, 16, 3))
  np.testing.assert_array_equal(folded_model.apply(folded, x, train=False), model.apply(variables, x, train=False))


def test_fold_batchnorm_before_dense():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  w, b = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=5).astype(np.float32)
  scale, offset = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
  mean, var = rng.normal(size=6).astype(np.float32), rng.uniform(0.5, 2, size=6).astype(np.float32)
  want = _bn(x, scale, offset, mean, var, 1e-5) @ w + b
  w2, b2 = deploy.fold_batchnorm_before(w, b, scale=scale, offset=offset, mean=mean, var=var, epsilon=1e-5)
  np.testing.assert_allclose(x @ np.asarray(w2) + np.asarray(b2), want, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_pairs_rewrites_every_pair_and_keeps_the_rest():
  rng = np.random.default_rng(4)
  r = lambda *s: rng.normal(size=s).astype(np.float32)
  params = {'block': {'conv': {'kernel': r(3, 4)}, 'bn': {'scale': r(4), 'bias': r(4)}, 'other': {'w': r(2)}},
            'head': {'kernel': r(4, 2)}}
  stats = {'block': {'bn': {'mean': r(4), 'var': np.abs(r(4)) + 0.5}}}
  out = deploy.fold_batchnorm_pairs(params, stats, layer='conv', norm='bn', epsilon=1e-5)
  assert set(out['block']) == {'conv', 'other'} and set(out['block']['conv']) == {'kernel', 'bias'}
  np.testing.assert_array_equal(out['head']['kernel'], params['head']['kernel'])
  x = r(5, 3)
  bn = params['block']['bn']
  want = _bn(x @ params['block']['conv']['kernel'], bn['scale'], bn['bias'], stats['block']['bn']['mean'],
             stats['block']['bn']['var'], 1e-5)
  got = x @ np.asarray(out['block']['conv']['kernel']) + np.asarray(out['block']['conv']['bias'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match='running statistics'):
    deploy.fold_batchnorm_pairs(params, {}, layer='conv', norm='bn', epsilon=1e-5)
