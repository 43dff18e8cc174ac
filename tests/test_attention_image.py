"""The attention-rollout image of TensorBoard: the overlay on tiny models, and a short run's event file."""
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


def test_overlay_of_a_tiny_vit_is_an_rgb_image_that_follows_the_attention():
  model, variables = _tiny_vit()
  out = attention_image.rollout_overlay(model, variables, IMAGE)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  # Not the image alone: where the rollout is high the heat map's bright end shows.
  heat = np.asarray(attention_image.rollout_heat(model, variables, jnp.asarray(IMAGE)))
  assert heat.shape == (16, 16) and heat.min() == 0.0 and heat.max() == 1.0
  np.testing.assert_array_equal(out, attention_image.overlay(IMAGE, heat))
  # Other attention (sharper queries), same image and values: another overlay.
  sharper = attention_image.rollout_overlay(model, _scaled_queries(variables, 8.0), IMAGE)
  assert np.abs(sharper.astype(int) - out.astype(int)).max() > 10


@pytest.mark.parametrize('options', [dict(attention_impl='xla'), dict(attention_impl='cudnn'), dict(remat='full')])
def test_overlay_is_the_same_whatever_the_kernel_and_remat(options):
  # The weights are read on the einsum path without remat: even 'cudnn', which has no CPU kernel, gives the image.
  model, variables = _tiny_vit()
  other = model.clone(**options)
  np.testing.assert_array_equal(attention_image.rollout_overlay(other, variables, IMAGE),
                                attention_image.rollout_overlay(model, variables, IMAGE))


def test_overlay_blends_the_ramp_over_the_stretched_image():
  image = np.zeros((2, 2, 3), np.float32)
  image[0, 0] = 1.0  # Stretched to black (0) and white (1).
  heat = np.array([[0.0, 1.0], [0.0, 1.0]])
  out = attention_image.overlay(image, heat, alpha=0.5).astype(int)
  ramp = attention_image.heat_colors(np.array([0.0, 1.0]))
  np.testing.assert_allclose(out[0, 0], np.round(255 * (0.5 + 0.5 * ramp[0])), atol=1)
  np.testing.assert_allclose(out[1, 1], np.round(255 * 0.5 * ramp[1]), atol=1)
  assert ramp[1].sum() > ramp[0].sum() + 2  # Bright where the attention is.


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


def _event_tags(workdir):
  """{tag: [steps]} of every summary in the run's TensorBoard event files."""
  from tensorflow.python.summary import summary_iterator  # pylint: disable=g-import-not-at-top
  tags = {}
  for path in glob.glob(f'{workdir}/events.out.tfevents.*'):
    for event in summary_iterator.summary_iterator(path):
      for value in event.summary.value:
        tags.setdefault(value.tag, []).append(event.step)
  return tags


def test_a_vit_run_writes_the_rollout_image_at_each_eval(digits_data_dir, tmp_path):
  train.train_and_evaluate(tiny_config(digits_data_dir), str(tmp_path))
  tags = _event_tags(tmp_path)
  assert sorted(tags['attention_rollout']) == [10, 20]  # eval_every=10 of 20 steps.
  from tensorflow.python.summary import summary_iterator  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path = glob.glob(f'{tmp_path}/events.out.tfevents.*')[0]
  images = [v for e in summary_iterator.summary_iterator(path) for v in e.summary.value if v.tag == 'attention_rollout']
  png = tf.make_ndarray(images[0].tensor)[2]  # (width, height, PNG) as tf.summary.image stores it.
  assert tf.io.decode_png(png).shape == (16, 16, 3)


@pytest.mark.slow
def test_a_hierarchical_run_trains_without_the_image(digits_data_dir, tmp_path):
  config = tiny_config(digits_data_dir, total_steps=10, eval_every=5, checkpoint_every=10)
  config.model = ml_collections.ConfigDict(dict(name='swin_t', embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                                                window_size=2))
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == 10 and np.isfinite(final['eval_loss'])
  tags = _event_tags(tmp_path)
  assert 'attention_rollout' not in tags and 'eval_accuracy' in tags
