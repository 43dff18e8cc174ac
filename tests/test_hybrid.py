"""Tests for the hybrid R+ViT models (vit_jax.models.resnet_stem + VisionTransformer(resnet=...)).

Full-size models only through jax.eval_shape; forward passes use a tiny stem (width 32, two one-unit stages).
"""
import functools

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from vit_jax import pretrained
from vit_jax.models import registry
from vit_jax.models import resnet_stem
from vit_jax.models import vit

# Stem width 32 (GroupNorm needs multiples of 32 channels), stride 8 -> a 4x4 map of 256 channels at 32 px.
TINY = dict(num_classes=10, patch_size=1, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64,
            resnet=(1, 1), resnet_width=0.5)
SIZE = 32


_count = model_utils.count
_abstract = model_utils.abstract_params


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


def _random_params(model, size=SIZE, seed=0):
  return model_utils.random_params(model, size, seed)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  return jax.jit(model.apply)


def _images(b=2, size=SIZE):
  return model_utils.images(b, size, seed=1)


@pytest.mark.parametrize('name,expected', [
    ('r_vit_ti16', 6_337_704), ('r26_vit_s32', 36_431_912), ('r50_vit_b16', 98_659_112),
    ('r26_vit_b32', 101_383_976), ('r50_vit_l32', 328_994_856)])
def test_official_counts(name, expected):
  spec = registry.get_model_spec(name)
  assert spec.num_params == expected and spec.family == 'vit' and spec.image_size == 224
  assert _count(_abstract(registry.create_model(name, num_classes=1000), 224)) == expected


def test_registry_metadata():
  assert registry.get_model_spec('r50_vit_b16').timm_name == 'vit_base_r50_s16_224.orig_in21k'
  assert registry.get_model_spec('r26_vit_s32').timm_name == 'vit_small_r26_s32_224.augreg_in21k_ft_in1k'
  assert registry.get_model_spec('r_vit_ti16').timm_name == 'vit_tiny_r_s16_p8_224.augreg_in21k_ft_in1k'
  assert registry.get_model_spec('r50_vit_l32').timm_name == 'vit_large_r50_s32_224.augreg_in21k_ft_in1k'
  kw = registry.get_model_spec('r_vit_ti16').kwargs
  assert kw['resnet'] == () and kw['patch_size'] == 8


def test_official_names_and_shapes_r50_b16():
  flat = {k: tuple(v.shape) for k, v in
          _flat(_abstract(registry.create_model('r50_vit_b16', num_classes=1000), 224)).items()}
  expected = {
      'conv_root/kernel': (7, 7, 3, 64), 'gn_root/scale': (64,), 'gn_root/bias': (64,),
      'block1/unit1/conv1/kernel': (1, 1, 64, 64), 'block1/unit1/gn1/scale': (64,),
      'block1/unit1/conv2/kernel': (3, 3, 64, 64), 'block1/unit1/gn2/bias': (64,),
      'block1/unit1/conv3/kernel': (1, 1, 64, 256), 'block1/unit1/gn3/scale': (256,),
      'block1/unit1/conv_proj/kernel': (1, 1, 64, 256), 'block1/unit1/gn_proj/scale': (256,),
      'block1/unit3/conv1/kernel': (1, 1, 256, 64),
      'block2/unit1/conv_proj/kernel': (1, 1, 256, 512), 'block2/unit4/conv3/kernel': (1, 1, 128, 512),
      'block3/unit1/conv2/kernel': (3, 3, 256, 256), 'block3/unit9/conv3/kernel': (1, 1, 256, 1024),
      'embedding/kernel': (1, 1, 1024, 768), 'embedding/bias': (768,), 'cls': (1, 1, 768),
      'Transformer/posembed_input/pos_embedding': (1, 197, 768), 'head/kernel': (768, 1000),
  }
  for k, shape in expected.items():
    assert flat.get(k) == shape, (k, flat.get(k))
  # Convs have no bias; projections only in the first unit of each stage; exactly 3 stages (3, 4, 9).
  assert not any('conv' in k and k.endswith('/bias') for k in flat)
  assert {k.split('/')[1] for k in flat if k.startswith('block3/')} == {f'unit{i}' for i in range(1, 10)}
  assert sorted(k for k in flat if 'conv_proj' in k) == [f'block{i}/unit1/conv_proj/kernel' for i in (1, 2, 3)]
  assert not any(k.startswith('block4') for k in flat)
  assert not any(k.startswith(('conv_root', 'gn_root', 'block')) for k in _flat(
      _abstract(registry.create_model('vit_ti16', num_classes=10), 32)))


def test_weight_standardisation():
  rng = np.random.default_rng(0)
  w = rng.normal(0.3, 2.0, (3, 3, 4, 5)).astype(np.float32)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 4)).astype(np.float32))
  ws = np.asarray(resnet_stem.weight_standardize(jnp.asarray(w)))
  ref = (w - w.mean(axis=(0, 1, 2))) / (w.std(axis=(0, 1, 2)) + 1e-5)
  np.testing.assert_allclose(ws, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ws.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(ws.std(axis=(0, 1, 2)), 1, atol=1e-4)

  conv = dict(features=5, kernel_size=(3, 3), strides=(2, 2), use_bias=False)
  params = {'params': {'kernel': jnp.asarray(w)}}
  got = resnet_stem.StdConv(**conv).apply(params, x)
  want = nn.Conv(**conv).apply({'params': {'kernel': jnp.asarray(ref)}}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The stored parameter stays raw: a plain conv with the raw kernel differs.
  assert not np.allclose(nn.Conv(**conv).apply(params, x), got, atol=1e-3)


def test_forward_shapes_init_and_every_param_gets_gradient():
  model = vit.VisionTransformer(**TINY)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  flat = _flat(variables['params'])
  # gn3 scales start at zero (each unit starts as its shortcut); other GroupNorm scales at one.
  assert all(np.all(np.asarray(v) == 0) for k, v in flat.items() if k.endswith('gn3/scale'))
  assert all(np.all(np.asarray(v) == 1) for k, v in flat.items() if k.endswith(('gn1/scale', 'gn_root/scale')))
  assert flat['embedding/kernel'].shape == (1, 1, 256, 32)
  assert flat['Transformer/posembed_input/pos_embedding'].shape == (1, 17, 32)

  params = _random_params(model)

  @jax.jit
  def run(params, x):
    v = {'params': params}
    grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2))(params)
    return model.apply(v, x), model.apply(v, x, method=model.forward_features), grads

  logits, feats, grads = run(params, _images())
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert feats.shape == (2, 1 + 4 * 4, 32)
  assert np.all(np.isfinite(np.asarray(logits)))
  dead = [k for k, g in _flat(grads).items() if not np.any(np.asarray(g))]
  assert not dead, f'parameters without gradient: {dead}'  # Random params: gn3 scales are non-zero here.


def test_root_only_stem_shapes():
  # R+ViT-Ti/16 layout: root only (stride 4), then 8x8 patches -> 224 / 32 = 7x7 tokens.
  abstract = _flat(_abstract(registry.create_model('r_vit_ti16', num_classes=1000), 224))
  assert abstract['embedding/kernel'].shape == (8, 8, 64, 192)
  assert abstract['Transformer/posembed_input/pos_embedding'].shape == (1, 50, 192)
  assert not any(k.startswith('block') for k in abstract)
  stem = resnet_stem.ResNetStem(num_layers=(), width_factor=0.5)
  out = jax.eval_shape(lambda x: stem.init_with_output(jax.random.key(0), x)[0], jnp.zeros((2, 32, 32, 3)))
  assert out.shape == (2, 8, 8, 32) and stem.stride == 4


def test_image_size_error():
  model = vit.VisionTransformer(**TINY)
  with pytest.raises(ValueError, match='stride 8'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 36, 36, 3)))


def test_round_trip_raw_official_format(tmp_path):
  model = vit.VisionTransformer(**TINY)
  params = _random_params(model)
  path = str(tmp_path / 'hybrid.npz')
  pretrained.save_npz_official(params, path)
  with np.load(path, allow_pickle=False) as raw:
    shapes = {k: raw[k].shape for k in raw.files}
  # Released layout: stem at the top level, GroupNorm params as (1, 1, 1, C), old block numbering.
  assert shapes['conv_root/kernel'] == (7, 7, 3, 32)
  assert shapes['gn_root/scale'] == (1, 1, 1, 32) and shapes['gn_root/bias'] == (1, 1, 1, 32)
  assert shapes['block1/unit1/gn3/bias'] == (1, 1, 1, 128)
  assert shapes['block2/unit1/gn_proj/scale'] == (1, 1, 1, 256)
  assert shapes['block2/unit1/conv_proj/kernel'] == (1, 1, 128, 256)
  assert 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' in shapes

  loaded = pretrained.load_pretrained(path, _random_params(model, seed=1))
  fa, fb = _flat(loaded), _flat(params)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
    assert fa[k].shape == fb[k].shape, k
  x = _images()
  np.testing.assert_array_equal(np.asarray(_jitted_apply(model)({'params': loaded}, x)),
                                np.asarray(_jitted_apply(model)({'params': params}, x)))

  # Files that already store GroupNorm params as (C,) (newer exports) load the same.
  flat_c = {k: np.asarray(v) for k, v in _flat(params).items()}
  flat_c = {pretrained._rename_block_parts(k, pretrained._NEW_TO_OLD): v for k, v in flat_c.items()}
  path_c = str(tmp_path / 'hybrid_c.npz')
  np.savez(path_c, **flat_c)
  loaded_c = _flat(pretrained.load_pretrained(path_c, _random_params(model, seed=1)))
  for k in fa:
    np.testing.assert_array_equal(np.asarray(loaded_c[k]), np.asarray(fa[k]), err_msg=k)


def test_missing_stem_is_rejected(tmp_path):
  # A plain ViT file does not load into a hybrid (and vice versa): all-or-nothing.
  model = vit.VisionTransformer(**TINY)
  params = _flat(_random_params(model))
  path = str(tmp_path / 'no_stem.npz')
  np.savez(path, **{pretrained._rename_block_parts(k, pretrained._NEW_TO_OLD): np.asarray(v)
                    for k, v in params.items() if not k.startswith(('conv_root', 'gn_root', 'block'))})
  with pytest.raises(ValueError, match='conv_root'):
    pretrained.load_pretrained(path, _random_params(model, seed=1))
