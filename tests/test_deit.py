"""Tests for vit_jax.models.deit (tiny widths; full sizes only via eval_shape)."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from vit_jax.models import deit  # Registers deit_* (until vit_jax.models imports it).
from vit_jax.models import registry
from vit_jax.models import vit

TINY = dict(num_classes=10, patch_size=4, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64,
            gelu_approximate=False)


def _tiny(**kw) -> deit.DistilledVisionTransformer:
  return deit.DistilledVisionTransformer(**{**TINY, **kw})


_images = model_utils.images
_abstract_params = model_utils.abstract_params
_random_params = model_utils.random_params
_count = model_utils.count


@pytest.mark.parametrize('name', ['deit_ti16_distilled', 'deit_b16_384', 'deit_b16_384_distilled'])
def test_counts(name):
  """Also asserted by test_vit's registry-wide test once vit_jax.models imports deit."""
  spec = registry.get_model_spec(name)
  model = registry.create_model(name, num_classes=1000)
  assert _count(_abstract_params(model, spec.image_size)) == spec.num_params


def test_registry_entries():
  names = registry.list_models('deit*')
  assert names == sorted(['deit_ti16', 'deit_s16', 'deit_b16', 'deit_b16_384', 'deit_ti16_distilled',
                          'deit_s16_distilled', 'deit_b16_distilled', 'deit_b16_384_distilled'])
  for name in names:
    spec = registry.get_model_spec(name)
    assert spec.family == 'deit' and spec.kwargs['gelu_approximate'] is False
    assert spec.kwargs['layer_norm_eps'] == 1e-6 and spec.timm_name.endswith('.fb_in1k')
    assert spec.builder is (deit.DistilledVisionTransformer if 'distilled' in name else vit.VisionTransformer)
    assert spec.image_size == (384 if '384' in name else 224)
  assert registry.get_model_spec('deit_s16_distilled').timm_name == 'deit_small_distilled_patch16_224.fb_in1k'


def test_param_names_b16_distilled():
  model = registry.create_model('deit_b16_distilled', num_classes=1000)
  flat = {k: v.shape for k, v in traverse_util.flatten_dict(_abstract_params(model, 224), sep='/').items()}
  assert flat['cls'] == flat['dist'] == (1, 1, 768)
  assert flat['Transformer/posembed_input/pos_embedding'] == (1, 198, 768)
  assert flat['head/kernel'] == flat['head_dist/kernel'] == (768, 1000)
  assert flat['head_dist/bias'] == (1000,)
  plain = traverse_util.flatten_dict(
      _abstract_params(registry.create_model('deit_b16', num_classes=1000), 224), sep='/')
  assert set(flat) - set(plain) == {'dist', 'head_dist/kernel', 'head_dist/bias'}


def test_train_tuple_and_inference_average():
  model = _tiny()
  params = _random_params(model)
  assert model.num_features == 32

  @jax.jit
  def run(params, x):
    v = {'params': params}
    feats = model.apply(v, x, method=model.forward_features)
    return (model.apply(v, x, train=True), model.apply(v, x), feats,
            model.apply(v, feats, pre_logits=True, method=model.forward_head),
            _tiny(distilled_training=False).apply(v, x, train=True))

  (cls_logits, dist_logits), logits, feats, pre, plain_train = run(params, _images())
  assert cls_logits.shape == dist_logits.shape == logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert not np.allclose(cls_logits, dist_logits)
  np.testing.assert_allclose(logits, (cls_logits + dist_logits) / 2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(plain_train, logits, rtol=1e-5, atol=1e-6)
  assert feats.shape == (2, 2 + 16, 32)
  np.testing.assert_allclose(pre, (feats[:, 0] + feats[:, 1]) / 2, rtol=1e-6)
  # Each head reads its own token.
  head = lambda name, t: t @ params[name]['kernel'] + params[name]['bias']
  np.testing.assert_allclose(cls_logits, head('head', feats[:, 0]), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dist_logits, head('head_dist', feats[:, 1]), rtol=1e-4, atol=1e-5)


def test_token_layout():
  """With no blocks the encoder is posemb + final norm, exposing the [cls, dist, patches] order."""
  model = _tiny(num_layers=0, num_classes=0)
  params = _random_params(model)
  x = _images(1)
  feats = jax.jit(lambda p, x: model.apply({'params': p}, x, method=model.forward_features))(params, x)
  pe = params['Transformer']['posembed_input']['pos_embedding'][0]
  norm = params['Transformer']['encoder_norm']

  def ln(t):
    t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, keepdims=True) + 1e-6)
    return t * norm['scale'] + norm['bias']

  emb = params['embedding']
  patches = np.asarray(x[0]).reshape(4, 4, 4, 4, 3).transpose(0, 2, 1, 3, 4).reshape(16, -1)
  tokens = patches @ np.asarray(emb['kernel']).reshape(-1, 32) + emb['bias']
  expected = np.concatenate([params['cls'][0], params['dist'][0], tokens], axis=0) + pe
  np.testing.assert_allclose(feats[0], ln(expected), rtol=1e-4, atol=1e-4)
  # No head: __call__ returns the averaged cls/dist features.
  out = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, x)
  np.testing.assert_allclose(out, (feats[:, 0] + feats[:, 1]) / 2, rtol=1e-6)


def test_every_param_gets_gradient():
  model = _tiny()
  params = _random_params(model)
  x, labels = _images(), jnp.arange(2)

  def loss(params):
    ce = lambda logits: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))
    cls_logits, dist_logits = model.apply({'params': params}, x, train=True)
    return 0.5 * ce(cls_logits) + 0.5 * ce(dist_logits)

  grads = traverse_util.flatten_dict(jax.jit(jax.grad(loss))(params), sep='/')
  zero = [k for k, g in grads.items() if not np.any(np.asarray(g))]
  assert not zero, zero


@pytest.mark.parametrize('kw,match', [(dict(classifier='gap'), 'classifier'),
                                      (dict(posemb='sincos2d'), 'posemb'),
                                      (dict(representation_size=16), 'representation')])
def test_unsupported_options(kw, match):
  with pytest.raises(ValueError, match=match):
    _abstract_params(_tiny(**kw))


def test_create_model_overrides():
  model = registry.create_model('deit_ti16_distilled', num_classes=5, distilled_training=False, drop_path_rate=0.1)
  assert isinstance(model, deit.DistilledVisionTransformer) and not model.distilled_training
  assert model.drop_path_rate == 0.1 and model.hidden_size == 192
