"""The attention-rollout image of TensorBoard: the overlay on tiny models, and a hierarchical run without it (the
ViT run's image is checked by tests/test_train.py's short run)."""
import functools
import glob
import logging as std_logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import attention_image, models, train
from tests.test_train import tiny_config

IMAGE = np.asarray(jax.random.uniform(jax.random.key(1), (16, 16, 3), minval=-1, maxval=1))


def _tiny_vit(**kwargs):
  model = models.create_model('vit_pico', num_classes=3, patch_size=4, hidden_size=16, mlp_dim=32, num_layers=2,
                              num_heads=2, **kwargs)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def _scaled_queries(variables, factor):
  """`variables` with every block's query kernel scaled: the same model but sharper or flatter attention."""
  def scale(path, x):
    return x * factor if any(getattr(k, 'key', None) == 'query' for k in path) else x
  return jax.tree_util.tree_map_with_path(scale, variables)


@pytest.fixture(scope='module')
def vit_overlay():
  """(model, variables, its overlay of IMAGE): the reference the tests below compare with."""
  model, variables = _tiny_vit()
  return model, variables, attention_image.rollout_overlay(model, variables, IMAGE)


def test_overlay_of_a_tiny_vit_is_an_rgb_image_that_follows_the_attention(vit_overlay):
  model, variables, out = vit_overlay
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  heat_fn = jax.jit(functools.partial(attention_image.rollout_heat, model))
  heat = np.asarray(heat_fn(variables, IMAGE))
  assert heat.shape == (16, 16) and heat.min() == 0.0 and heat.max() == 1.0
  np.testing.assert_array_equal(out, attention_image.overlay(IMAGE, heat))
  # Other attention (sharper queries), same image and values: another map, another overlay.
  sharper = attention_image.overlay(IMAGE, np.asarray(heat_fn(_scaled_queries(variables, 8.0), IMAGE)))
  assert np.abs(sharper.astype(int) - out.astype(int)).max() > 10


@pytest.mark.parametrize('options', [dict(attention_impl='xla'), dict(attention_impl='cudnn'), dict(remat='full')])
def test_overlay_is_the_same_whatever_the_kernel_and_remat(vit_overlay, options):
  # The weights are read on the einsum path without remat: even 'cudnn', which has no CPU kernel, gives the image.
  model, variables, out = vit_overlay
  np.testing.assert_array_equal(attention_image.rollout_overlay(model.clone(**options), variables, IMAGE), out)


def test_overlay_blends_the_ramp_over_the_stretched_image():
  image = np.zeros((2, 2, 3), np.float32)
  image[0, 0] = 1.0  # Stretched to black (0) and white (1).
  heat = np.array([[0.0, 1.0], [0.0, 1.0]])
  out = attention_image.overlay(image, heat, alpha=0.5).astype(int)
  ramp = attention_image.heat_colors(np.array([0.0, 1.0]))
  np.testing.assert_allclose(out[0, 0], np.round(255 * (0.5 + 0.5 * ramp[0])), atol=1)
  np.testing.assert_allclose(out[1, 1], np.round(255 * 0.5 * ramp[1]), atol=1)
  assert ramp[1].sum() > ramp[0].sum() + 2  # Bright where the attention is.


@pytest.mark.slow
@pytest.mark.parametrize('name, init_method, options', [
    ('mae_vit_b16', 'forward_features', dict(decoder_hidden_size=8, decoder_num_layers=1, decoder_num_heads=2,
                                             decoder_mlp_dim=16)),
    ('dino_vit_s16', 'project', dict(out_dim=32, head_hidden_dim=24, head_bottleneck_dim=8))])
def test_pretraining_models_show_their_encoders_rollout(name, init_method, options):
  # MAE: the encoder on every patch (no masking, no decoder); DINO: the backbone without its projection head.
  model = models.create_model(name, num_classes=0, patch_size=4, hidden_size=16, num_layers=2, num_heads=2,
                              mlp_dim=32, **options)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), method=init_method)
  out = attention_image.rollout_overlay(model, variables, IMAGE)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_models_without_a_patch_token_sequence_have_no_image():
  swin = models.create_model('swin_t', num_classes=3, embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=2)
  variables = jax.eval_shape(swin.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))  # Never computed on.
  assert attention_image.rollout_overlay(swin, variables, IMAGE) is None
  assert 'hierarchical' in attention_image.unsupported_reason(swin, IMAGE.shape)
  vit, _ = _tiny_vit()
  assert 'scan_layers' in attention_image.unsupported_reason(_tiny_vit(scan_layers=True)[0], IMAGE.shape)
  assert 'square RGB' in attention_image.unsupported_reason(vit, (4, 16, 16, 3))  # A video clip.
  assert attention_image.unsupported_reason(vit, IMAGE.shape) is None


def test_a_failure_is_logged_once_and_turns_the_image_off(caplog):
  model, variables = _tiny_vit()
  rollout = attention_image.RolloutImage(model, IMAGE)
  assert rollout.enabled and rollout(variables).shape == (16, 16, 3)
  broken = {'params': {k: v for k, v in variables['params'].items() if k != 'Transformer'}}
  with caplog.at_level(std_logging.WARNING):
    assert rollout(broken) is None  # No exception reaches the loop ...
    assert rollout(variables) is None  # ... and it does not try again.
  assert not rollout.enabled
  assert sum('Attention-rollout image off' in r.getMessage() for r in caplog.records) == 1


def event_summaries(workdir) -> dict:
  """{tag: [(step, summary value)]} of every summary in a run's TensorBoard event files."""
  from tensorflow.python.summary import summary_iterator  # pylint: disable=g-import-not-at-top
  tags = {}
  for path in glob.glob(f'{workdir}/events.out.tfevents.*'):
    for event in summary_iterator.summary_iterator(path):
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append((event.step, value))
  return tags


@pytest.mark.slow
def test_a_hierarchical_run_trains_without_the_image(digits_data_dir, tmp_path):
  config = tiny_config(digits_data_dir, total_steps=10, eval_every=5, checkpoint_every=10)
  config.model = ml_collections.ConfigDict(dict(name='swin_t', embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                                                window_size=2))
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == 10 and np.isfinite(final['eval_loss'])
  tags = event_summaries(tmp_path)
  assert 'attention_rollout' not in tags and 'eval_accuracy' in tags
