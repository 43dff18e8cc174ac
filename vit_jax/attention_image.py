"""The attention-rollout image TensorBoard shows at each eval: a heat map over one fixed eval example.

Attention rollout (Abnar and Zuidema 2020; the maths and the weight capture are `vit_jax.visualize`'s) of the
first eval image, upsampled to the image and blended over it in numpy (no matplotlib), as an (H, W, 3) uint8
array. Only token models with a patch grid have one (ViT, DeiT, MAE encoders, DINO backbones); for the others
(hierarchical, convolutional, MLP-Mixer, video/audio inputs, scanned layers) `rollout_overlay` returns None.

The trainer uses `RolloutImage`: the example is taken once, the map is compiled once, and any failure is logged
once and switches the image off instead of stopping the run.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import compile_options, sharding, visualize

# Anchors of a dark-to-bright colour ramp (the `inferno` map at 0, 1/4, 1/2, 3/4, 1), as RGB in [0, 255].
_RAMP = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], np.float32) / 255.0
HEAT_ALPHA = 0.55  # Opacity of the heat map over the image.


def _features_method(model: nn.Module) -> Any:
  """The backbone without its head when the model has one (`forward_features`: no classifier, no MAE masking or
  decoder, no DINO projection), else the model's own call."""
  if hasattr(model, 'forward_features'):
    return lambda m, x, train=False: m.forward_features(x, train=train)
  return None


def unsupported_reason(model: nn.Module, image_shape: tuple[int, ...]) -> Optional[str]:
  """Why `model` has no rollout image for one example of `image_shape`, or None when it has one. Traces the
  model on shapes only (nothing is compiled)."""
  if len(image_shape) != 3 or image_shape[-1] != 3 or image_shape[0] != image_shape[1]:
    return f'the eval examples are not square RGB images (shape {tuple(image_shape)})'
  if visualize.is_hierarchical(model):
    return f'{type(model).__name__} is hierarchical (windowed attention; `vit_jax.visualize` shows its Grad-CAM)'
  example = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  try:
    readable = visualize.readable_model(model)  # The einsum kernel: initialising traces no GPU-only one.
    variables = jax.eval_shape(lambda x: readable.init(jax.random.key(0), x, train=False,
                                                       method=_features_method(model)), example)
    _, attentions = jax.eval_shape(
        lambda v, x: visualize.capture_attention(model, v, x, method=_features_method(model)), variables, example)
    prefix, _ = visualize.token_grid(model, image_shape[0], attentions[-1].shape[-1] if attentions else 0)
  except ValueError as e:  # The model's own account (no patch grid, scanned layers, ...).
    return str(e)
  if not attentions:
    return f'{type(model).__name__} has no self-attention blocks'
  if len({a.shape[-1] for a in attentions}) > 1 or prefix < 0:
    return f'the attention of {type(model).__name__} is not over one sequence of patch tokens'
  return None


def rollout_heat(model: nn.Module, variables: Any, image: jax.Array) -> jax.Array:
  """The rollout map of one (H, W, 3) image, upsampled (bilinear) to (H, W) and scaled to [0, 1] (all zeros
  when the map is flat). Traceable: jit it once per run."""
  _, attentions = visualize.capture_attention(model, variables, image[None], method=_features_method(model))
  prefix, grid = visualize.token_grid(model, image.shape[0], attentions[-1].shape[-1])
  heat = visualize.rollout_map(visualize.attention_rollout([a[0] for a in attentions]), prefix, grid)
  heat = jax.image.resize(heat, image.shape[:2], 'bilinear')
  low, span = jnp.min(heat), jnp.max(heat) - jnp.min(heat)
  return jnp.where(span > 0, (heat - low) / jnp.where(span > 0, span, 1.0), 0.0)


def heat_colors(heat: np.ndarray) -> np.ndarray:
  """Colours in [0, 1], (..., 3), of values in [0, 1]: linear between the ramp's anchors."""
  heat = np.clip(np.asarray(heat, np.float32), 0.0, 1.0)
  anchors = np.linspace(0.0, 1.0, len(_RAMP))
  return np.stack([np.interp(heat, anchors, _RAMP[:, c]) for c in range(3)], axis=-1)


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
  """(H, W, 3) uint8: `image` (any range; stretched to [0, 1]) with the coloured (H, W) `heat` in [0, 1] blended
  over it at opacity `alpha`."""
  image = np.asarray(image, np.float32)
  low, span = image.min(), image.max() - image.min()
  shown = (image - low) / span if span > 0 else np.zeros_like(image)
  blended = (1.0 - alpha) * shown + alpha * heat_colors(heat)
  return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


def rollout_overlay(model: nn.Module, variables: Any, image: np.ndarray) -> Optional[np.ndarray]:
  """The (H, W, 3) uint8 attention-rollout overlay of one preprocessed (H, W, 3) image, or None for a model
  without one (see `unsupported_reason`)."""
  image = np.asarray(image, np.float32)
  if unsupported_reason(model, image.shape) is not None:
    return None
  heat = compile_options.jit_inference(functools.partial(rollout_heat, model))(variables, image)
  return overlay(image, np.asarray(heat))


def _attempt(fn: Callable[[], Any]) -> tuple[bool, Any]:
  """(True, fn()), or (False, None) with a warning when fn raises: an image must never stop training."""
  try:
    return True, fn()
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('Attention-rollout image off for the rest of the run: %s: %s', type(e).__name__, e)
    return False, None


class RolloutImage:
  """One run's rollout image: a fixed example, its map compiled once, a failure logged once (then it is off).

  Call it with the variables to show (e.g. the task's eval variables): an (H, W, 3) uint8 array, or None when
  the model has no rollout image or an earlier step failed. `mesh`: the run's mesh (the map comes back replicated,
  so every process can read it).
  """

  def __init__(self, model: nn.Module, image: Optional[np.ndarray], mesh: Optional[jax.sharding.Mesh] = None):
    self._image, self._heat = None, None
    if image is None:
      return
    image = np.asarray(image, np.float32)
    ok, reason = _attempt(lambda: unsupported_reason(model, image.shape))
    if not ok:
      return
    if reason is not None:  # Not a failure: this model has no rollout image.
      logging.debug('No attention-rollout image in TensorBoard: %s.', reason)  # Shown with --verbosity=1.
      return
    out = {} if mesh is None else {'out_shardings': sharding.replicated(mesh)}
    self._image, self._heat = image, compile_options.jit_inference(functools.partial(rollout_heat, model), **out)

  @classmethod
  def of_first_example(cls, model: nn.Module, batches: Iterable[dict[str, np.ndarray]],
                       mesh: Optional[jax.sharding.Mesh] = None) -> RolloutImage:
    """From the first image of the eval batches (`image[0]` of the first batch; process 0's on several hosts, so
    every process shows the same one). Reads one batch."""
    def first() -> Optional[np.ndarray]:
      images = next(iter(batches)).get('image')
      if images is None:
        return None
      image = np.asarray(images[0], np.float32)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        image = np.asarray(multihost_utils.broadcast_one_to_all(image))
      return image
    return cls(model, _attempt(first)[1], mesh)

  @property
  def enabled(self) -> bool:
    return self._heat is not None

  def __call__(self, variables: Any) -> Optional[np.ndarray]:
    if self._heat is None:
      return None
    ok, heat = _attempt(lambda: np.asarray(self._heat(variables, self._image)))
    if not ok:
      self._heat = None
      return None
    return overlay(self._image, heat)
