"""Tests for the video and audio transformers (ViViT, TimeSformer, AST): registry, options, Hugging Face parity and
starting from image checkpoints. Tiny widths; full sizes only via eval_shape (tests/test_vit.py checks every
registered count)."""
import json
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import convert
from vit_jax import pretrained
from vit_jax.models import ast
from vit_jax.models import facts
from vit_jax.models import registry
from vit_jax.models import timesformer
from vit_jax.models import vivit

from tests.model_utils import abstract_params, count, randomize

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'parity', 'fixtures')
TINY = dict(hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)
# transformers' VivitForVideoClassification / TimesformerForVideoClassification / ASTForAudioClassification with
# their default configs and num_labels=1000 (sum of parameter numels); ViViT models 2 and 3 from scenic's layout
# (derivation beside the registration in vivit.py).
COUNTS = {'vivit_b16x2_st': 89_415_400, 'vivit_b16x2_fe': 115_524_328, 'vivit_b16x2_fsa': 117_780_712,
          'timesformer_b16': 122_027_752, 'ast_b16': 86_957_800}


@pytest.mark.parametrize('name', sorted(COUNTS))
def test_registered_counts_and_inputs(name):
  spec = registry.get_model_spec(name)
  assert spec.num_params == COUNTS[name]
  model = registry.create_model(name, num_classes=1000)
  assert count(abstract_params(model, spec.image_size)) == COUNTS[name]
  expected = {'ast_b16': (1, 128, 1024, 1), 'timesformer_b16': (1, 8, 224, 224, 3)}.get(name, (1, 32, 224, 224, 3))
  assert registry.example_input(model, spec.image_size).shape == expected


def test_ast_full_size_grid():
  """128 mel x 1024 frames, 16x16 patches at stride 10: 12 x 101 = 1212 patches + class + distillation."""
  shapes = abstract_params(registry.create_model('ast_b16', num_classes=527), 128)
  assert shapes['Transformer']['posembed_input']['pos_embedding'].shape == (1, 1214, 768)
  assert shapes['embedding']['kernel'].shape == (16, 16, 1, 768)


@pytest.mark.parametrize('fixture', ['vivit', 'timesformer', 'ast'])
def test_converted_logits_match_transformers(fixture):
  """Hugging Face weights (random, tiny configs) through vit_jax.convert (layout 'hf') give the same logits."""
  with open(os.path.join(FIXTURES, fixture + '.json')) as f:
    meta = json.load(f)
  sd = convert.load_safetensors(os.path.join(FIXTURES, fixture + '.safetensors'))
  data = np.load(os.path.join(FIXTURES, fixture + '.npz'))
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
  params = convert.timm_to_params(meta['model'], sd, layout='hf', model_overrides=overrides,
                                  image_size=meta['image_size'])
  model = registry.create_model(meta['model'], num_classes=meta['num_classes'], **overrides)
  logits = np.asarray(model.apply({'params': params}, jnp.asarray(data['input'])))
  diff = np.abs(logits - data['logits']).max()
  assert diff <= 1e-5, (fixture, diff)


def _tiny(name, **kw):
  return registry.create_model(name, num_classes=3, **{**TINY, **kw})


@pytest.mark.slow  # ~30-70 s each on a loaded 2-core CPU (compiling remat'd training passes).
@pytest.mark.parametrize('name,kw', [('vivit_pico', dict(variant='st')), ('vivit_pico', dict(variant='fe')),
                                     ('vivit_pico', dict(variant='fsa')), ('timesformer_pico', {})])
def test_video_models_take_training_options(name, kw):
  """drop_path, remat and attention_impl are taken; training mode draws stochastic depth and stays finite; at
  inference the options change nothing."""
  small = dict(num_layers=1, num_frames=4, **kw)
  model = registry.create_model(name, num_classes=3, drop_path_rate=0.5, remat=True, attention_impl='xla', **small)
  x = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 3))
  params = randomize(abstract_params(model, 8))
  out = model.apply({'params': params}, x, train=True, rngs={'dropout': jax.random.key(1)})
  assert out.shape == (2, 3) and np.isfinite(np.asarray(out)).all()
  plain = registry.create_model(name, num_classes=3, **small)
  np.testing.assert_allclose(model.apply({'params': params}, x), plain.apply({'params': params}, x), atol=1e-5)


def test_video_input_errors():
  model = _tiny('vivit_pico')
  params = abstract_params(model, 16)
  with pytest.raises(ValueError, match='NTHWC'):
    jax.eval_shape(model.apply, {'params': params}, jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match='num_frames=8'):
    jax.eval_shape(model.apply, {'params': params}, jnp.zeros((1, 6, 16, 16, 3)))
  with pytest.raises(ValueError, match='Unknown ViViT variant'):
    _tiny('vivit_pico', variant='joint').init(jax.random.key(0), jnp.zeros((1, 8, 16, 16, 3)))
  ast_model = _tiny('ast_pico')
  with pytest.raises(ValueError, match='time_frames=64'):
    jax.eval_shape(ast_model.init, jax.random.key(0), jnp.zeros((1, 32, 48)))


def test_sharding_names():
  """Every parameter carries logical axis names (the trainer's sharding rules apply)."""
  from vit_jax.models import layers  # pylint: disable=g-import-not-at-top
  for name in ('vivit_pico', 'timesformer_pico', 'ast_pico'):
    model = _tiny(name)
    x = registry.example_input(model, registry.get_model_spec(name).image_size)
    with layers.logical_partitioning():
      boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x.shape))['params']
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: hasattr(v, 'names'))
    assert leaves and all(hasattr(v, 'names') for v in leaves), name


# -- starting from image checkpoints ---------------------------------------------------------------------------

def _image_vit(size=16, **kw):
  vit_model = registry.create_model('vit_pico', num_classes=3, **{**TINY, 'patch_size': 4, **kw})
  params = randomize(abstract_params(vit_model, size), seed=1)
  return vit_model, params


def _still_clip(frames=8):
  image = jax.random.normal(jax.random.key(2), (2, 16, 16, 3))
  return image, jnp.broadcast_to(image[:, None], (2, frames, 16, 16, 3))


@pytest.mark.parametrize('name,kw', [('vivit_pico', dict(variant='st', image_init='central_frame', num_frames=2)),
                                     ('vivit_pico', dict(variant='st', image_init='average', num_frames=2)),
                                     ('timesformer_pico', dict(num_frames=4, gelu_approximate=True))])
def test_image_initialised_video_model_gives_image_logits_on_still_clip(name, kw):
  """ViViT model 1 with one tubelet slice (T' = 1) and TimeSformer at any length compute the image ViT on a still
  clip. (Model 1 with T' > 1 slices only approximately: the T' copies of each patch key outweigh the single class
  key in every softmax; see test_vivit_still_clip_drift.)"""
  vit_model, vit_params = _image_vit()
  model = _tiny(name, patch_size=4, **kw)
  init = randomize(abstract_params(model, 16), seed=3)  # Non-zero temporal parts: the loader must zero them.
  params = pretrained.load_pretrained(vit_params, init, model=model)
  image, clip = _still_clip(model.num_frames)
  want = vit_model.apply({'params': vit_params}, image)
  np.testing.assert_allclose(model.apply({'params': params}, clip), want, atol=2e-5, rtol=1e-5)


def test_vivit_still_clip_drift():
  """With T' = 4 slices, every patch token still sees the image ViT's keys 4 times, so only the class token's
  share of attention moves: logits stay close to the image ViT's but not equal."""
  vit_model, vit_params = _image_vit()
  model = _tiny('vivit_pico', patch_size=4, num_frames=8)
  params = pretrained.load_pretrained(vit_params, randomize(abstract_params(model, 16), seed=3), model=model)
  image, clip = _still_clip(8)
  want = np.asarray(vit_model.apply({'params': vit_params}, image))
  got = np.asarray(model.apply({'params': params}, clip))
  assert 0 < np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_vivit_inflation_and_factorised_variants():
  _, vit_params = _image_vit()
  flat_vit = traverse_util.flatten_dict(vit_params, sep='/')
  kernel = np.asarray(flat_vit['embedding/kernel'])
  central = vivit.inflate_kernel(kernel, 2, 'central_frame')
  np.testing.assert_array_equal(central[1], kernel)
  assert not central[0].any()
  np.testing.assert_allclose(vivit.inflate_kernel(kernel, 2, 'average').sum(0), kernel, rtol=1e-6)
  # Model 2: the spatial encoder is the image ViT's, the temporal transformer keeps its initialisation.
  fe = _tiny('vivit_pico', variant='fe', patch_size=4)
  init = randomize(abstract_params(fe, 16), seed=3)
  flat = traverse_util.flatten_dict(pretrained.load_pretrained(vit_params, init, model=fe), sep='/')
  flat_init = traverse_util.flatten_dict(init, sep='/')
  for key in flat:
    if key.startswith('TemporalTransformer/') or key == 'temporal_cls' or key.startswith('head'):
      assert flat[key] is flat_init[key] or key.startswith('head'), key
    elif key != 'embedding/kernel':
      np.testing.assert_array_equal(flat[key], flat_vit[key], err_msg=key)
  # Model 3: the temporal attention starts as the spatial one with a zero output; posemb tiled over 4 slices.
  fsa = _tiny('vivit_pico', variant='fsa', patch_size=4)
  flat = traverse_util.flatten_dict(pretrained.load_pretrained(
      vit_params, randomize(abstract_params(fsa, 16)), model=fsa), sep='/')
  np.testing.assert_array_equal(flat['encoderblock_0/TemporalAttention/query/kernel'],
                                flat_vit['Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel'])
  assert not flat['encoderblock_0/TemporalAttention/out/kernel'].any()
  patches = flat_vit['Transformer/posembed_input/pos_embedding'][0, 1:]
  np.testing.assert_array_equal(flat['pos_embedding'][0].reshape(4, 16, -1), np.stack([patches] * 4))


def test_deit_initialises_timesformer_and_resizes_posemb():
  """A DeiT (class + distillation rows, another grid) starts a TimeSformer: dist dropped, grid resized."""
  deit = registry.create_model('deit_ti16_distilled', num_classes=3, patch_size=4, **TINY)
  deit_params = randomize(abstract_params(deit, 32))  # 8x8 grid; the video's frames give 4x4.
  model = _tiny('timesformer_pico', patch_size=4)
  params = pretrained.load_pretrained(deit_params, randomize(abstract_params(model, 16)), model=model)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 16)
  assert not np.asarray(params['Transformer']['time_embedding']).any()
  assert not np.asarray(params['Transformer']['encoderblock_1']['temporal_fc']['kernel']).any()


def test_ast_from_image_checkpoint():
  """AST's first patch embedding equals the image ViT's conv on the spectrogram repeated over three channels; the
  position grid is cut (frequency) and interpolated (time) as the AST code does."""
  _, vit_params = _image_vit(size=64, patch_size=8)  # An 8x8 grid.
  model = _tiny('ast_pico')  # 32 mel x 64 frames, 8x8 patches stride 8: 4 x 8 grid.
  params = pretrained.load_pretrained(vit_params, randomize(abstract_params(model, 32)), model=model)
  spec = jax.random.normal(jax.random.key(4), (1, 32, 64))
  rgb = jnp.repeat(spec[..., None], 3, axis=-1)[:, :8, :8]
  k, b = vit_params['embedding']['kernel'], vit_params['embedding']['bias']
  want = jnp.einsum('bhwc,hwcd->bd', rgb, k) + b
  got = jnp.einsum('bhw,hwd->bd', spec[:, :8, :8], params['embedding']['kernel'][..., 0, :]) + \
      params['embedding']['bias']
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  pe = np.asarray(vit_params['Transformer']['posembed_input']['pos_embedding'])
  grid = pe[0, 1:].reshape(8, 8, -1)
  new = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
  assert new.shape == (1, 2 + 32, 16)
  np.testing.assert_array_equal(new[0, 2:].reshape(4, 8, -1), grid[2:6])  # Rows cut around the middle.
  np.testing.assert_array_equal(params['dist'], vit_params['cls'])
  # Interpolation along time (a 4-column grid to 8): torch bilinear, align_corners=False.
  m = ast.torch_bilinear_matrix(4, 8)
  np.testing.assert_allclose(m @ np.arange(4.0), [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3])
  # The whole model runs on spectrograms.
  assert model.apply({'params': params}, spec).shape == (1, 3)


def test_families_registered_with_layouts():
  for family in ('vivit', 'timesformer', 'ast'):
    fam = facts.get_family(family)
    assert 'hf' in fam.layouts and fam.adapt_checkpoint is not None and fam.grouping is not None
  assert timesformer.FACTS.name == 'timesformer' and vivit.FACTS.name == 'vivit'
