"""Export round trips: each format, loaded back by its own runtime, gives the model's logits (ViT and Swin)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import export, models

SIZE = 16


def _randomised(model):
  """Variables with every leaf random (a zero-initialised head would make every logit 0 and hide mistakes)."""
  variables = model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.1 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)])


@pytest.fixture(scope='module', params=['vit', 'swin'])
def tiny(request):
  if request.param == 'vit':
    model = models.create_model('vit_pico', num_classes=5, patch_size=4, hidden_size=16, mlp_dim=32, num_layers=1,
                                num_heads=2)
  else:
    model = models.create_model('swin_t', num_classes=5, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                                window_size=2)
  return model, _randomised(model)


def _images(n, uint8=False):
  rng = np.random.default_rng(n)
  if uint8:
    return rng.integers(0, 256, (n, SIZE, SIZE, 3)).astype(np.uint8)
  return rng.uniform(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


def _reference(model, variables, images, uint8=False):
  return np.asarray(model.apply(variables, export.normalize(jnp.asarray(images), uint8=uint8)))


def test_normalize_matches_the_eval_pipeline():
  pixels = np.array([0, 51, 255], np.uint8)
  expected = pixels / 127.5 - 1  # input_pipeline._normalize on [0, 255].
  np.testing.assert_allclose(export.normalize(jnp.asarray(pixels), uint8=True), expected, rtol=1e-6)
  np.testing.assert_allclose(export.normalize(jnp.asarray(pixels / 255.0)), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_stablehlo_round_trip_with_a_symbolic_batch(tiny, tmp_path):
  model, variables = tiny
  path = str(tmp_path / 'model.stablehlo')
  export.export(model, variables, SIZE, path, 'stablehlo', class_names=list('abcde'))
  call = export.load_stablehlo(path)
  for n in (1, 3):  # One export serves any batch size.
    images = _images(n)
    np.testing.assert_allclose(call(images), _reference(model, variables, images), rtol=1e-5, atol=1e-5)
  info = json.loads((tmp_path / export.INFO_FILENAME).read_text())
  assert info['image_size'] == SIZE and info['class_names'] == list('abcde')


@pytest.mark.slow
def test_savedmodel_round_trip_uint8(tiny, tmp_path):
  model, variables = tiny
  path = str(tmp_path / 'saved')
  export.export(model, variables, SIZE, path, 'savedmodel', uint8=True)
  call = export.load_savedmodel(path)
  images = _images(2, uint8=True)
  np.testing.assert_allclose(call(images), _reference(model, variables, images, uint8=True), rtol=1e-4, atol=1e-4)
  assert os.path.exists(os.path.join(path, export.INFO_FILENAME))


@pytest.mark.slow
def test_onnx_round_trip(tiny, tmp_path):
  pytest.importorskip('jax2onnx', reason='optional: pip install jax2onnx onnxruntime')
  model, variables = tiny
  path = str(tmp_path / 'model.onnx')
  export.export(model, variables, SIZE, path, 'onnx')
  call = export.load_onnx(path)
  for n in (1, 3):
    images = _images(n)
    np.testing.assert_allclose(call(images), _reference(model, variables, images), rtol=1e-4, atol=1e-4)


def test_unknown_format_and_missing_library_are_clear_errors(monkeypatch, tmp_path):
  model = models.create_model('vit_pico', num_classes=2, patch_size=4, hidden_size=8, mlp_dim=8, num_layers=1,
                              num_heads=1)
  with pytest.raises(ValueError, match='Unknown export format'):
    export.export(model, {}, SIZE, str(tmp_path / 'x'), 'tflite')
  import sys  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)  # As if it were not installed.
  with pytest.raises(export.ExportError, match='onnx: needs the optional package jax2onnx'):
    export.export(model, {}, SIZE, str(tmp_path / 'x.onnx'), 'onnx')
