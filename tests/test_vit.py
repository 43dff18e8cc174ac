"""Tests for vit_jax.models.vit and vit_jax.models.layers (tiny widths; full sizes only via eval_shape)."""
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import vit

from tests.model_utils import abstract_params as _abstract_params
from tests.model_utils import count as _count
from tests.model_utils import images as _images
from tests.model_utils import random_params as _random_params
from tests.model_utils import randomize as _randomize

TINY = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)


def _tiny(**kw) -> vit.VisionTransformer:
  return vit.VisionTransformer(**{'num_classes': 10, **TINY, **kw})


@pytest.mark.parametrize('name', registry.list_models())
def test_registered_param_counts(name):
  spec = registry.get_model_spec(name)
  model = registry.create_model(name, num_classes=1000)
  count = _count(_abstract_params(model, spec.image_size))
  if spec.num_params is not None:
    assert count == spec.num_params, (name, count, spec.num_params)
  else:
    assert count > 0


@pytest.mark.parametrize('name,expected', [
    ('vit_s16', 22_049_896), ('vit_b16', 86_566_120), ('vit_b32', 88_222_696)])
def test_gap_no_rep_counts(name, expected):
  model = registry.create_model(name, num_classes=1000, classifier='gap', representation_size=None)
  assert _count(_abstract_params(model, 224)) == expected


def test_registry_metadata():
  spec = registry.get_model_spec('vit_b16')
  assert spec.family == 'vit' and spec.timm_name == 'vit_base_patch16_224.augreg_in21k_ft_in1k'
  assert registry.get_model_spec('vit_pico').image_size == 8


def test_parse_variant():
  assert vit.parse_variant('B/16') == dict(hidden_size=768, num_layers=12, mlp_dim=3072, num_heads=12,
                                           patch_size=16)
  assert vit.parse_variant('Ti') == dict(hidden_size=192, num_layers=12, mlp_dim=768, num_heads=3)
  assert vit.parse_variant('g/14')['hidden_size'] == 1408
  with pytest.raises(ValueError, match='Unknown ViT variant'):
    vit.parse_variant('X/16')


def test_official_names_and_shapes_b16():
  model = registry.create_model('vit_b16', num_classes=1000)
  flat = {k: v.shape for k, v in traverse_util.flatten_dict(_abstract_params(model, 224), sep='/').items()}
  expected = {
      'cls': (1, 1, 768),
      'embedding/kernel': (16, 16, 3, 768),
      'embedding/bias': (768,),
      'Transformer/posembed_input/pos_embedding': (1, 197, 768),
      'Transformer/encoder_norm/scale': (768,),
      'Transformer/encoder_norm/bias': (768,),
      'head/kernel': (768, 1000),
      'head/bias': (1000,),
  }
  for i in range(12):
    b = f'Transformer/encoderblock_{i}/'
    for ln in ('LayerNorm_0', 'LayerNorm_1'):
      expected[b + ln + '/scale'] = expected[b + ln + '/bias'] = (768,)
    for qkv in ('query', 'key', 'value'):
      expected[b + f'MultiHeadDotProductAttention_0/{qkv}/kernel'] = (768, 12, 64)
      expected[b + f'MultiHeadDotProductAttention_0/{qkv}/bias'] = (12, 64)
    expected[b + 'MultiHeadDotProductAttention_0/out/kernel'] = (12, 64, 768)
    expected[b + 'MultiHeadDotProductAttention_0/out/bias'] = (768,)
    expected[b + 'MlpBlock_0/Dense_0/kernel'] = (768, 3072)
    expected[b + 'MlpBlock_0/Dense_0/bias'] = (3072,)
    expected[b + 'MlpBlock_0/Dense_1/kernel'] = (3072, 768)
    expected[b + 'MlpBlock_0/Dense_1/bias'] = (768,)
  assert flat == expected


def test_init_values():
  """Official initialisers: zero head and cls, posemb normal(0.02), tiny MLP biases."""
  model = _tiny(classifier='token', representation_size=24, num_layers=1)
  # unsafe_rbg only because threefry init compiles slowly on CPU.
  params = jax.jit(model.init)(jax.random.key(0, impl='unsafe_rbg'), _images())['params']
  assert not np.any(params['head']['kernel']) and not np.any(params['head']['bias'])
  assert not np.any(params['cls'])
  pe = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
  assert pe.shape == (1, 17, 32) and 0.01 < pe.std() < 0.03
  mlp = params['Transformer']['encoderblock_0']['MlpBlock_0']
  assert 0 < np.abs(mlp['Dense_0']['bias']).max() < 1e-4
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize('kw,tokens,features', [
    (dict(classifier='token'), 17, 32),
    (dict(classifier='gap'), 16, 32),
    (dict(classifier='map'), 16, 32),
    (dict(classifier='token', representation_size=24), 17, 24),
])
def test_output_shapes(kw, tokens, features):
  model = _tiny(**kw)
  params = _random_params(model)
  assert ('cls' in params) == (kw['classifier'] == 'token')
  assert ('MAPHead_0' in params) == (kw['classifier'] == 'map')
  assert ('pre_logits' in params) == ('representation_size' in kw)
  if kw['classifier'] == 'map':
    assert params['MAPHead_0']['probe'].shape == (1, 1, 32)
  assert model.num_features == features

  @jax.jit
  def run(params, x):
    v = {'params': params}
    feats = model.apply(v, x, method=model.forward_features)
    return (model.apply(v, x), feats, model.apply(v, feats, pre_logits=True, method=model.forward_head),
            model.apply(v, feats, method=model.forward_head))

  logits, feats, pre, head = run(params, _images())
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert feats.shape == (2, tokens, 32)
  assert pre.shape == (2, features)
  np.testing.assert_allclose(head, logits, rtol=1e-6)


def test_no_head_returns_features():
  model = _tiny(num_classes=0, classifier='gap')
  params = _random_params(model)
  assert 'head' not in params
  assert jax.jit(model.apply)({'params': params}, _images()).shape == (2, 32)


def test_patch_size_error():
  with pytest.raises(ValueError, match=r'18x18.*patch_size=4'):
    _abstract_params(_tiny(), 18)


def test_posemb_grid_error():
  model = _tiny()
  params = _random_params(model)
  with pytest.raises(ValueError, match=r'\(1, 37, 32\).*\(1, 17, 32\).*resize_posemb'):
    jax.eval_shape(model.apply, {'params': params}, _images(size=24))


def test_bad_classifier():
  with pytest.raises(ValueError, match='classifier'):
    _abstract_params(_tiny(classifier='mean'), 16)


def test_sincos_posemb_has_no_param_and_any_size():
  model = _tiny(posemb='sincos2d', classifier='gap')
  params = _random_params(model)
  assert 'posembed_input' not in params['Transformer']
  assert jax.eval_shape(model.apply, {'params': params}, _images(size=24)).shape == (2, 10)
  pe = vit.posemb_sincos_2d(4, 4, 32)
  assert pe.shape == (1, 16, 32) and len(np.unique(pe.round(5), axis=1)[0]) == 16
  # The class token gets no position signal (big_vision adds posemb before concatenating it).
  assert 'posembed_input' not in _abstract_params(_tiny(posemb='sincos2d'), 16)['Transformer']


def test_remat_same_outputs():
  params = _random_params(_tiny(num_layers=1))
  x = _images()

  def loss(params, remat):
    return jnp.sum(_tiny(remat=remat, num_layers=1).apply({'params': params}, x) ** 2)

  grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  l0, g0 = grad_fn(params, False)
  l1, g1 = grad_fn(params, True)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_dropout_and_drop_path_only_in_training():
  params = _random_params(_tiny())
  x = _images()
  noisy = _tiny(dropout_rate=0.2, attention_dropout_rate=0.2, drop_path_rate=0.5)

  @jax.jit
  def run(params, x, rng1, rng2):
    v = {'params': params}
    return (_tiny().apply(v, x), noisy.apply(v, x, train=False), _tiny().apply(v, x, train=True),
            noisy.apply(v, x, train=True, rngs={'dropout': rng1}),
            noisy.apply(v, x, train=True, rngs={'dropout': rng2}))

  keys = [jax.random.key(i, impl='unsafe_rbg') for i in (1, 2)]
  plain, eval_noisy, train_plain, t1, t2 = run(params, x, *keys)
  np.testing.assert_array_equal(eval_noisy, plain)
  np.testing.assert_allclose(train_plain, plain, rtol=1e-6)  # All rates zero: no rng needed, no change.
  assert not np.allclose(t1, plain) and not np.allclose(t1, t2)


def test_drop_path_per_example():
  x = jnp.ones((64, 3, 5))
  dp = layers.DropPath(rate=0.5)
  np.testing.assert_array_equal(dp.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(layers.DropPath(0.0).apply({}, x, deterministic=False), x)
  y = np.asarray(dp.apply({}, x, deterministic=False, rngs={'dropout': jax.random.key(0)}))
  per_example = y.reshape(64, -1)
  assert set(np.unique(per_example)) <= {0.0, 2.0}
  assert np.all(per_example.min(1) == per_example.max(1))  # Whole example kept or dropped.
  assert 10 < np.sum(per_example[:, 0] == 0) < 54


@pytest.mark.parametrize('kw', [dict(classifier='token', representation_size=24), dict(classifier='map')])
def test_every_param_gets_gradient(kw):
  model = _tiny(num_layers=1, **kw)
  params = _random_params(model)
  x, labels = _images(), jnp.arange(2)

  def loss(params):
    logits = model.apply({'params': params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

  grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params), sep='/')
  zero = [k for k, g in grads.items() if not np.any(np.asarray(g))]
  assert not zero, zero


def test_bfloat16_compute_keeps_float32_params():
  model = _tiny(dtype=jnp.bfloat16, classifier='map')
  params = _abstract_params(model, 16)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  feats = jax.eval_shape(lambda p, x: model.apply(p, x, method=model.forward_features), {'params': params},
                         _images())
  assert feats.dtype == jnp.bfloat16
  assert jax.eval_shape(model.apply, {'params': params}, _images()).dtype == jnp.float32


def test_attention_matches_flax():
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  ours = layers.MultiHeadAttention(num_heads=4)
  ref = nn.MultiHeadDotProductAttention(num_heads=4)
  abstract = jax.eval_shape(ours.init, jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, jax.eval_shape(ref.init, jax.random.key(1), x, x))
  variables = _randomize(abstract)
  q, mask = x[:, :1], jnp.tril(jnp.ones((5, 5), bool))

  @jax.jit
  def run(v, x):  # Self-attention, cross-attention (as in the MAP head) and masking.
    return ((ours.apply(v, x), ref.apply(v, x, x)), (ours.apply(v, q, x), ref.apply(v, q, x)),
            (ours.apply(v, x, mask=mask), ref.apply(v, x, x, mask=mask)))

  for a, b in run(variables, x):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_mlp_gelu_variants():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  mlp = layers.MlpBlock(mlp_dim=16)
  abstract = jax.eval_shape(mlp.init, jax.random.key(1), x)
  shapes = jax.tree.map(jnp.shape, abstract['params'])
  assert shapes == {'Dense_0': {'kernel': (8, 16), 'bias': (16,)}, 'Dense_1': {'kernel': (16, 8), 'bias': (8,)}}
  variables = _randomize(abstract)
  erf_mlp = layers.MlpBlock(mlp_dim=16, gelu_approximate=False)
  tanh, erf = jax.jit(lambda v, x: (mlp.apply(v, x), erf_mlp.apply(v, x)))(variables, x)
  np.testing.assert_allclose(tanh, erf, atol=1e-2)
  assert not np.array_equal(tanh, erf)
