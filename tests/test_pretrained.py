"""Tests for vit_jax.pretrained: official and big_vision .npz layouts, head/pre_logits policy, posemb resizing."""
import functools
import logging

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import pretrained
from vit_jax.models import vit

TINY = dict(patch_size=4, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64)
POSEMB = 'Transformer/posembed_input/pos_embedding'


def _model(**kw) -> vit.VisionTransformer:
  return vit.VisionTransformer(**{'num_classes': 10, **TINY, **kw})


def _params(model, size=16, seed=0):
  """Random non-zero params of the model's shapes (no `init` compile; every leaf differs from zero)."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
  rng = np.random.default_rng(seed)
  flat = {k: jnp.asarray(rng.normal(0.0, 0.05, v.shape).astype(np.float32) + (k.endswith('scale')))
          for k, v in traverse_util.flatten_dict(abstract, sep='/').items()}
  return traverse_util.unflatten_dict(flat, sep='/')


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
  return jax.jit(model.apply)


def _logits(model, params, size=16):
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  return np.asarray(_jitted_apply(model)({'params': params}, x))


def _flat(params):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()}


def _assert_trees_equal(a, b):
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _save_raw(path, arrays):
  np.savez(path, **arrays)
  return str(path)


def _official_file(tmp_path, params, name='official.npz'):
  path = str(tmp_path / name)
  pretrained.save_npz_official(params, path)
  return path


def test_round_trip_raw_official_format(tmp_path):
  model = _model()
  params = _params(model)
  path = _official_file(tmp_path, params)
  with np.load(path, allow_pickle=False) as raw:
    keys = set(raw.files)
  block = 'Transformer/encoderblock_1/'
  assert {block + 'MultiHeadDotProductAttention_1/query/kernel', block + 'LayerNorm_0/scale',
          block + 'LayerNorm_2/scale', block + 'MlpBlock_3/Dense_1/kernel', POSEMB, 'cls', 'head/kernel'} <= keys
  assert not any('MultiHeadDotProductAttention_0' in k or 'MlpBlock_0' in k or 'LayerNorm_1' in k for k in keys)

  loaded = pretrained.load_pretrained(path, _params(model, seed=1))
  _assert_trees_equal(loaded, params)
  np.testing.assert_array_equal(_logits(model, loaded), _logits(model, params))
  # A {'params': ...}-wrapped tree comes back wrapped.
  wrapped = pretrained.load_pretrained(path, {'params': _params(model, seed=1)})
  _assert_trees_equal(wrapped['params'], params)


@pytest.mark.parametrize('classifier', ['gap', 'map'])
def test_round_trip_other_classifiers(tmp_path, classifier):
  model = _model(classifier=classifier)
  params = _params(model)
  loaded = pretrained.load_pretrained(_official_file(tmp_path, params), _params(model, seed=1))
  _assert_trees_equal(loaded, params)


def _big_vision_arrays(params, *, stacked: bool, prefix: str = 'params/'):
  """The big_vision layout of `params`: new numbering, posemb without cls slot (folded into cls)."""
  flat = _flat(params)
  pe = flat.pop(POSEMB)
  flat['pos_embedding'] = pe[:, 1:]
  flat['cls'] = flat['cls'] + pe[:, :1]  # Same function: big_vision's cls token gets no position embedding.
  if stacked:
    blocks = sorted({k.split('/')[1] for k in flat if k.startswith('Transformer/encoderblock_')},
                    key=lambda b: int(b.split('_')[1]))
    leaf_names = {k.split('/', 2)[2] for k in flat if k.startswith(f'Transformer/{blocks[0]}/')}
    for leaf in leaf_names:
      flat[f'Transformer/encoderblock/{leaf}'] = np.stack([flat.pop(f'Transformer/{b}/{leaf}') for b in blocks])
  return {prefix + k: v for k, v in flat.items()}


@pytest.mark.parametrize('stacked', [False, True])
def test_big_vision_layout_gives_same_logits(tmp_path, stacked):
  model = _model()
  params = _params(model)
  path = _save_raw(tmp_path / 'bv.npz', _big_vision_arrays(params, stacked=stacked))
  loaded = pretrained.load_pretrained(path, _params(model, seed=1))
  assert not np.any(np.asarray(loaded['Transformer']['posembed_input']['pos_embedding'][:, 0]))
  np.testing.assert_allclose(_logits(model, loaded), _logits(model, params), rtol=1e-5, atol=1e-6)


def test_opt_target_prefix_and_inlined_map_probe(tmp_path):
  model = _model(classifier='map')
  params = _params(model)
  flat = _flat(params)
  for k in [k for k in flat if k.startswith('MAPHead_0/')]:  # big_vision ViT-g development layout.
    flat[k[len('MAPHead_0/'):]] = flat.pop(k)
  flat = {'opt/target/' + k: v for k, v in flat.items()}
  flat['opt/state/step'] = np.zeros(())  # Optimizer state outside the prefix is ignored.
  loaded = pretrained.load_pretrained(_save_raw(tmp_path / 'g.npz', flat), _params(model, seed=1))
  _assert_trees_equal(loaded, params)


def test_head_reinitialised_when_class_count_differs(tmp_path, caplog):
  path = _official_file(tmp_path, _params(_model(num_classes=10)))
  init = _params(_model(num_classes=7), seed=1)
  with caplog.at_level(logging.INFO):
    loaded = pretrained.load_pretrained(path, init)
  assert 'head' in caplog.text
  _assert_trees_equal(loaded['head'], init['head'])
  np.testing.assert_array_equal(loaded['Transformer']['encoder_norm']['scale'],
                                _params(_model(num_classes=10))['Transformer']['encoder_norm']['scale'])
  # A model without a head (num_classes=0) drops the checkpoint head.
  assert 'head' not in pretrained.load_pretrained(path, _params(_model(num_classes=0)))


def test_pre_logits_dropped_or_kept(tmp_path):
  rep = _model(representation_size=24)
  file_params = _params(rep)
  path = _official_file(tmp_path, file_params)
  # Dropped when the model has no representation layer.
  loaded = pretrained.load_pretrained(path, _params(_model(), seed=1))
  assert 'pre_logits' not in loaded
  # Loaded by default when the model has a representation layer too (as the official loader), and when required.
  init = _params(rep, seed=1)
  _assert_trees_equal(pretrained.load_pretrained(path, init), file_params)
  _assert_trees_equal(pretrained.load_pretrained(path, init, keep_pre_logits=True), file_params)
  # keep_pre_logits=False: the model keeps its own freshly initialised layer.
  fresh = pretrained.load_pretrained(path, init, keep_pre_logits=False)
  _assert_trees_equal(fresh['pre_logits'], init['pre_logits'])
  _assert_trees_equal(fresh['Transformer'], file_params['Transformer'])
  # Absent from the file: kept fresh by default, an error when required (never a silent partial load).
  no_rep_path = _official_file(tmp_path, _params(_model()), 'norep.npz')
  _assert_trees_equal(pretrained.load_pretrained(no_rep_path, init)['pre_logits'], init['pre_logits'])
  with pytest.raises(ValueError, match='pre_logits/kernel'):
    pretrained.load_pretrained(no_rep_path, init, keep_pre_logits=True)


@pytest.mark.parametrize('method', ['linear', 'bilinear', 'bicubic'])
def test_posemb_interpolated_on_load(tmp_path, method):
  model = _model()
  params = _params(model, size=16)  # 4x4 grid + cls.
  path = _official_file(tmp_path, params)
  loaded = pretrained.load_pretrained(path, _params(model, size=24, seed=1), posemb_interpolation=method)
  pe = np.asarray(loaded['Transformer']['posembed_input']['pos_embedding'])
  assert pe.shape == (1, 37, 32)
  np.testing.assert_array_equal(pe[:, 0], np.asarray(params['Transformer']['posembed_input']['pos_embedding'])[:, 0])
  assert jax.eval_shape(model.apply, {'params': loaded}, jnp.zeros((1, 24, 24, 3))).shape == (1, 10)


def test_resize_posemb():
  rng = np.random.default_rng(0)
  pe = rng.normal(size=(1, 17, 8)).astype(np.float32)
  np.testing.assert_array_equal(pretrained.resize_posemb(pe, 17, has_cls=True), pe)
  out = pretrained.resize_posemb(pe, 50, has_cls=True)
  assert out.shape == (1, 50, 8) and out.dtype == np.float32
  np.testing.assert_array_equal(out[:, 0], pe[:, 0])
  assert pretrained.resize_posemb(pe[:, 1:], 9, has_cls=False, method='bicubic').shape == (1, 9, 8)

  # A linear ramp over the grid stays a linear ramp.
  i, j = np.mgrid[:4, :4]
  ramp = np.stack([i, j, 2.0 * i - 3.0 * j], axis=-1).reshape(1, 16, 3).astype(np.float32)
  for method, interior in (('linear', slice(None)), ('bilinear', slice(2, -2))):
    grid = pretrained.resize_posemb(ramp, 49, has_cls=False, method=method).reshape(7, 7, 3)[interior, interior]
    np.testing.assert_allclose(np.diff(grid, 2, axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(np.diff(grid, 2, axis=1), 0, atol=1e-5)
  grid = pretrained.resize_posemb(ramp, 49, has_cls=False).reshape(7, 7, 3)
  np.testing.assert_allclose(grid[[0, -1]][:, [0, -1], 0], [[0, 0], [3, 3]], atol=1e-5)  # Corners stay.

  with pytest.raises(ValueError, match='square'):
    pretrained.resize_posemb(pe, 20, has_cls=True)
  with pytest.raises(ValueError, match='interpolation'):
    pretrained.resize_posemb(pe, 50, has_cls=True, method='lanczos')


def test_shape_mismatch_raises(tmp_path):
  model = _model()
  path = _official_file(tmp_path, _params(model))
  with np.load(path) as data:
    raw = dict(data)
  raw['Transformer/encoder_norm/scale'] = np.ones(48, np.float32)
  bad = _save_raw(tmp_path / 'bad.npz', raw)
  with pytest.raises(ValueError, match=r'Transformer/encoder_norm/scale: checkpoint \(48,\) vs model \(32,\)'):
    pretrained.load_pretrained(bad, _params(model, seed=1))


def test_missing_and_unexpected_keys_raise(tmp_path):
  model = _model()
  path = _official_file(tmp_path, _params(model))
  with np.load(path) as data:
    raw = dict(data)
  missing = dict(raw)
  del missing['Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias']
  with pytest.raises(ValueError, match=r"Missing from the checkpoint: \['Transformer/encoderblock_1/MlpBlock_0/"
                                       r"Dense_0/bias'\]"):
    pretrained.load_pretrained(_save_raw(tmp_path / 'missing.npz', missing), _params(model))
  extra = dict(raw, **{'Transformer/encoderblock_2/LayerNorm_0/scale': np.ones(32, np.float32)})
  with pytest.raises(ValueError, match=r"Not in the model: \['Transformer/encoderblock_2/LayerNorm_0/scale'\]"):
    pretrained.load_pretrained(_save_raw(tmp_path / 'extra.npz', extra), _params(model))
  # A token-classifier checkpoint does not silently load into a gap model.
  with pytest.raises(ValueError, match="'cls'"):
    pretrained.load_pretrained(path, _params(_model(classifier='gap')))
