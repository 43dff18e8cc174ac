"""Attention maps, rollout and Grad-CAM: the maths on known inputs, and reading the weights out of real models."""
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models, visualize


def test_rollout_of_identity_attention_is_identity():
  eye = jnp.broadcast_to(jnp.eye(5), (3, 5, 5))
  np.testing.assert_allclose(visualize.attention_rollout([eye] * 4), np.eye(5), atol=1e-6)
  np.testing.assert_allclose(visualize.attention_rollout([eye] * 4, residual=False), np.eye(5), atol=1e-6)


def test_rollout_of_uniform_attention_is_uniform():
  uniform = jnp.full((2, 6, 6), 1 / 6)
  # Without the residual term one block already mixes everything evenly.
  np.testing.assert_allclose(visualize.attention_rollout([uniform] * 3, residual=False), np.full((6, 6), 1 / 6),
                             atol=1e-6)
  # With it, each block is 0.5 I + 0.5 U, whose powers approach U: (0.5)^L of the identity remains.
  out = np.asarray(visualize.attention_rollout([uniform] * 3))
  expected = 0.5 ** 3 * np.eye(6) + (1 - 0.5 ** 3) / 6
  np.testing.assert_allclose(out, expected, atol=1e-6)
  np.testing.assert_allclose(visualize.rollout_map(jnp.full((5, 5), 0.2), 1, (2, 2)), np.full((2, 2), 0.25))


def test_rollout_averages_heads_and_multiplies_blocks_in_order():
  rng = np.random.default_rng(0)
  blocks = [jax.nn.softmax(jnp.asarray(rng.normal(size=(2, 4, 4))), axis=-1) for _ in range(2)]
  a = [0.5 * np.mean(np.asarray(b), 0) + 0.5 * np.eye(4) for b in blocks]
  np.testing.assert_allclose(visualize.attention_rollout(blocks), a[1] @ a[0], rtol=1e-5)


def test_per_head_class_token_maps_sum_to_one():
  rng = np.random.default_rng(1)
  attention = jax.nn.softmax(jnp.asarray(rng.normal(size=(3, 1 + 16, 1 + 16))), axis=-1)
  maps = visualize.class_token_maps(attention, 1, (4, 4))
  assert maps.shape == (3, 4, 4)
  np.testing.assert_allclose(np.sum(maps, axis=(1, 2)), np.ones(3), rtol=1e-6)
  # Each map is the class token's row over the patches, in raster order.
  np.testing.assert_allclose(maps[2].ravel() * np.sum(attention[2, 0, 1:]), attention[2, 0, 1:], rtol=1e-6)


def test_grad_cam_highlights_the_region_the_logit_depends_on():
  # A two-channel "backbone": channel 0 fires on the object (one bright region of the image), channel 1 on the
  # background; a GAP + linear head whose class logit reads channel 0 only. Grad-CAM must light the object alone.
  rng = np.random.default_rng(2)
  image = rng.uniform(0.0, 0.2, size=(6, 6))
  region = np.zeros((6, 6), bool)
  region[1:3, 3:5] = True
  image[region] = 1.0
  acts = jnp.stack([jax.nn.relu(image - 0.5), jax.nn.relu(0.5 - image)], axis=-1)
  logit = lambda a: jnp.mean(a, axis=(0, 1)) @ jnp.asarray([2.0, 0.0])
  cam = np.asarray(visualize.grad_cam_of(logit, acts))
  assert cam.max() == 1.0
  assert cam[region].min() > 0 and np.all(cam[~region] == 0)
  # A head reading the background instead lights everything but the object.
  cam = np.asarray(visualize.grad_cam_of(lambda a: jnp.mean(a, axis=(0, 1)) @ jnp.asarray([0.0, 1.0]), acts))
  assert np.all(cam[region] == 0) and cam[~region].min() > 0


def test_grad_cam_of_an_unrelated_class_is_zero():
  acts = jnp.ones((3, 3, 2))
  np.testing.assert_array_equal(visualize.grad_cam(acts, -jnp.ones((3, 3, 2))), np.zeros((3, 3)))


def _tiny_vit(**kwargs):
  model = models.create_model('vit_pico', num_classes=3, patch_size=4, hidden_size=16, mlp_dim=32, num_layers=2,
                              num_heads=2, **kwargs)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))


def test_captured_attention_is_the_models_and_independent_of_the_kernel():
  model, variables = _tiny_vit()
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  logits, attentions = visualize.capture_attention(model, variables, images)
  np.testing.assert_allclose(logits, model.apply(variables, images), rtol=1e-6)  # Interception changes nothing.
  assert len(attentions) == 2 and attentions[0].shape == (2, 2, 17, 17)
  np.testing.assert_allclose(np.sum(attentions[1], -1), 1.0, rtol=1e-5)
  assert visualize.token_grid(model, 16, 17) == (1, (4, 4))
  xla_model = models.create_model('vit_pico', num_classes=3, patch_size=4, hidden_size=16, mlp_dim=32,
                                  num_layers=2, num_heads=2, attention_impl='xla')
  _, xla_attentions = visualize.capture_attention(xla_model, variables, images)
  np.testing.assert_allclose(xla_attentions[1], attentions[1], rtol=1e-5)


def test_grad_cam_of_a_hierarchical_model_has_the_last_stage_grid():
  model = models.create_model('swin_t', num_classes=3, embed_dim=8, depths=(1, 1), num_heads=(1, 2),
                              window_size=2)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert visualize.is_hierarchical(model) and not visualize.is_hierarchical(_tiny_vit()[0])
  image = jax.random.uniform(jax.random.key(1), (16, 16, 3), minval=-1, maxval=1)
  cam, label = visualize.model_grad_cam(model, variables, image)
  assert cam.shape == (2, 2) and 0 <= label < 3
  assert label == int(jnp.argmax(model.apply(variables, image[None])[0]))
