"""Tests for vit_jax.models.mixer (tiny widths; full sizes only via eval_shape)."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from vit_jax.models import mixer  # Registers mixer_* (until vit_jax.models imports it).
from vit_jax.models import registry

TINY = dict(num_classes=10, patch_size=4, hidden_dim=32, num_blocks=2, tokens_mlp_dim=8, channels_mlp_dim=64)


def _tiny(**kw) -> mixer.MlpMixer:
  return mixer.MlpMixer(**{**TINY, **kw})


_images = model_utils.images
_abstract_params = model_utils.abstract_params
_random_params = model_utils.random_params


@pytest.mark.parametrize('name', ['mixer_s16', 'mixer_s32', 'mixer_b16', 'mixer_b32', 'mixer_l16'])
def test_counts(name):
  """Also asserted by test_vit's registry-wide test once vit_jax.models imports mixer."""
  spec = registry.get_model_spec(name)
  model = registry.create_model(name, num_classes=1000)
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(_abstract_params(model, 224))) == spec.num_params
  assert spec.family == 'mixer' and spec.timm_name.startswith(name + '_224')


def test_official_names_and_shapes_b16():
  model = registry.create_model('mixer_b16', num_classes=1000)
  flat = {k: v.shape for k, v in traverse_util.flatten_dict(_abstract_params(model, 224), sep='/').items()}
  expected = {
      'stem/kernel': (16, 16, 3, 768), 'stem/bias': (768,),
      'pre_head_layer_norm/scale': (768,), 'pre_head_layer_norm/bias': (768,),
      'head/kernel': (768, 1000), 'head/bias': (1000,),
  }
  for i in range(12):
    b = f'MixerBlock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_1'):
      expected[b + ln + '/scale'] = expected[b + ln + '/bias'] = (768,)
    expected.update({
        b + 'token_mixing/Dense_0/kernel': (196, 384), b + 'token_mixing/Dense_0/bias': (384,),
        b + 'token_mixing/Dense_1/kernel': (384, 196), b + 'token_mixing/Dense_1/bias': (196,),
        b + 'channel_mixing/Dense_0/kernel': (768, 3072), b + 'channel_mixing/Dense_0/bias': (3072,),
        b + 'channel_mixing/Dense_1/kernel': (3072, 768), b + 'channel_mixing/Dense_1/bias': (768,),
    })
  assert flat == expected


def test_shapes_and_token_mixing():
  model = _tiny()
  params = _random_params(model)
  assert model.num_features == 32
  x = _images()
  x2 = x.at[:, :4, :4].add(1.0)  # Perturb the first patch only.

  @jax.jit
  def run(params, x, x2):
    v = {'params': params}
    feats = model.apply(v, x, method=model.forward_features)
    return (model.apply(v, x), feats, model.apply(v, feats, pre_logits=True, method=model.forward_head),
            model.apply(v, x2, method=model.forward_features), _tiny(num_classes=0).apply(v, x))

  logits, feats, pre, feats2, no_head = run(params, x, x2)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert feats.shape == (2, 16, 32) and pre.shape == (2, 32)
  np.testing.assert_allclose(pre, feats.mean(1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(no_head, pre, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, pre @ params['head']['kernel'] + params['head']['bias'], rtol=1e-4,
                             atol=1e-5)
  # Token mixing spreads a change in one patch to every token.
  assert np.all(np.abs(np.asarray(feats2 - feats)).max(-1) > 1e-4)


def test_head_zero_init():
  model = _tiny(num_blocks=1)
  params = jax.jit(model.init)(jax.random.key(0, impl='unsafe_rbg'), _images())['params']
  assert not np.any(params['head']['kernel']) and not np.any(params['head']['bias'])
  assert np.any(params['MixerBlock_0']['token_mixing']['Dense_0']['kernel'])


def test_remat_same_outputs():
  params = _random_params(_tiny())
  x = _images()

  def loss(params, remat):
    return jnp.sum(_tiny(remat=remat).apply({'params': params}, x) ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  l0, g0 = grad_fn(params, False)
  l1, g1 = grad_fn(params, True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_every_param_gets_gradient():
  model = _tiny()
  params = _random_params(model)
  x, labels = _images(), jnp.arange(2)

  def loss(params):
    logits = model.apply({'params': params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

  grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params), sep='/')
  zero = [k for k, g in grads.items() if not np.any(np.asarray(g))]
  assert not zero, zero


def test_gelu_and_drop_path():
  params = _random_params(_tiny())
  x = _images()
  noisy = _tiny(drop_path_rate=0.5)

  @jax.jit
  def run(params, x, rng):
    v = {'params': params}
    return (_tiny().apply(v, x), _tiny(gelu_approximate=False).apply(v, x), noisy.apply(v, x),
            noisy.apply(v, x, train=True, rngs={'dropout': rng}))

  tanh, erf, eval_noisy, train_noisy = run(params, x, jax.random.key(1, impl='unsafe_rbg'))
  assert not np.array_equal(tanh, erf)
  np.testing.assert_allclose(tanh, erf, atol=1e-2)
  np.testing.assert_array_equal(eval_noisy, tanh)
  assert not np.allclose(train_noisy, tanh)


def test_bfloat16_and_errors():
  model = _tiny(dtype=jnp.bfloat16)
  params = _abstract_params(model)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert jax.eval_shape(model.apply, {'params': params}, _images()).dtype == jnp.float32
  with pytest.raises(ValueError, match=r'18x18.*patch_size=4'):
    _abstract_params(_tiny(), 18)
