"""vit_jax.models.conv: the CPU formulations of depthwise and 1x1 convs equal flax's nn.Conv, and are the ones used."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import conv, layers

# (input shape, kernel, strides, kernel dilation, padding, features) for a depthwise conv (groups = channels).
DEPTHWISE_CASES = [
    ((2, 9, 9, 5), (3, 3), (1, 1), (1, 1), 'SAME', 5),
    ((1, 10, 11, 4), (7, 7), (2, 2), (1, 1), ((3, 3), (3, 3)), 4),
    ((1, 9, 9, 3), (7, 7), (2, 2), (1, 1), ((3, 3), (3, 3)), 6),  # channel multiplier 2 (FastViT's patch embedding)
    ((2, 12, 6), (5,), (2,), (1,), 'VALID', 6),
    ((1, 5, 6, 7, 3), (3, 3, 3), (1, 2, 1), (1, 1, 1), 'SAME', 3),
    ((1, 13, 13, 4), (3, 3), (1, 1), (2, 2), 'SAME', 4),
    ((1, 8, 8, 4), (4, 4), (2, 2), (1, 1), 'SAME', 4),  # even kernel: asymmetric SAME padding
    ((1, 8, 7, 4), (3, 3), (1, 1), (1, 1), ((0, 2), (1, 0)), 4),
]


def _pair(shape, features, kernel, **kw):
  """Our Conv and flax's nn.Conv with the same fields, one set of variables and an input."""
  ours, reference = conv.Conv(features, kernel, **kw), nn.Conv(features, kernel, **kw)
  x = jnp.asarray(np.random.default_rng(sum(shape)).standard_normal(shape), jnp.float32)
  variables = reference.init(jax.random.key(0), x)
  assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
  return ours, reference, variables, x


def _compiled_hlo(module, variables, x) -> str:
  return jax.jit(lambda v, x: module.apply(v, x)).lower(variables, x).compile().as_text()


def _assert_same(ours, reference, variables, x, atol):
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x), atol=atol, rtol=0)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  g_ours = jax.grad(loss(ours), argnums=(0, 1))(variables, x)
  g_ref = jax.grad(loss(reference), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=10 * atol, rtol=0)


@pytest.mark.parametrize('shape,kernel,strides,dilation,padding,features', DEPTHWISE_CASES)
def test_depthwise_equals_nn_conv_and_is_computed_without_a_convolution(shape, kernel, strides, dilation, padding,
                                                                         features):
  ours, reference, variables, x = _pair(shape, features, kernel, strides=strides, kernel_dilation=dilation,
                                        padding=padding, feature_group_count=shape[-1])
  _assert_same(ours, reference, variables, x, atol=2e-6)
  assert 'convolution(' not in _compiled_hlo(ours, variables, x)  # the shifted multiply-adds ran, not the library
  assert 'convolution(' in _compiled_hlo(reference, variables, x)


def test_pointwise_equals_nn_conv_and_is_a_dot():
  ours, reference, variables, x = _pair((2, 6, 5, 8), 12, (1, 1))
  _assert_same(ours, reference, variables, x, atol=2e-6)
  hlo = _compiled_hlo(ours, variables, x)
  assert 'convolution(' not in hlo and 'dot(' in hlo


@pytest.mark.parametrize('kw', [
    dict(kernel_size=(3, 3), feature_group_count=2),  # grouped, several channels per group
    dict(kernel_size=(3, 3)),  # dense
    dict(kernel_size=(3, 3), feature_group_count=8, input_dilation=(2, 2), padding=((1, 1), (1, 1))),  # input-dilated
    dict(kernel_size=(1, 1), strides=(2, 2)),  # strided 1x1
    dict(kernel_size=(1, 1), padding=((1, 1), (1, 1))),  # padded 1x1
])
def test_other_convolutions_go_to_the_library_unchanged(kw):
  kernel = kw.pop('kernel_size')
  ours, reference, variables, x = _pair((1, 7, 7, 8), 8, kernel, **kw)
  np.testing.assert_array_equal(ours.apply(variables, x), reference.apply(variables, x))
  assert 'convolution(' in _compiled_hlo(ours, variables, x)


def test_bfloat16_compute_keeps_its_dtype_and_accumulates_in_float32():
  ours, reference, variables, x = _pair((1, 16, 16, 8), 8, (7, 7), feature_group_count=8, dtype=jnp.bfloat16)
  y, y_ref = ours.apply(variables, x), reference.apply(variables, x)
  assert y.dtype == y_ref.dtype == jnp.bfloat16
  exact = nn.Conv(8, (7, 7), feature_group_count=8).apply(variables, x)
  # Both round the output once to bfloat16 (and the inputs on the way in): a few bfloat16 ulps of the float32 value.
  scale = float(jnp.max(jnp.abs(exact)))
  assert float(jnp.max(jnp.abs(y.astype(jnp.float32) - exact))) <= 0.02 * scale
  assert float(jnp.max(jnp.abs(y_ref.astype(jnp.float32) - exact))) <= 0.02 * scale


def test_exact_gelu_matches_the_erfc_form_and_keeps_bfloat16():
  x = jnp.linspace(-12.0, 12.0, 10001, dtype=jnp.float32)
  np.testing.assert_allclose(layers.gelu(x, approximate=False), jax.nn.gelu(x, approximate=False), atol=2e-6,
                             rtol=0)
  np.testing.assert_array_equal(layers.gelu(x), jax.nn.gelu(x, approximate=True))
  assert layers.gelu(x.astype(jnp.bfloat16), approximate=False).dtype == jnp.bfloat16
  grad = jax.grad(lambda x: jnp.sum(layers.gelu(x, approximate=False)))(x)
  np.testing.assert_allclose(grad, jax.grad(lambda x: jnp.sum(jax.nn.gelu(x, approximate=False)))(x), atol=2e-6)
