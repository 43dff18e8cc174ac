"""Command line and maths: what a trained model looks at.

  python -m vit_jax.visualize --workdir DIR IMAGE [...] --out OUTDIR     (or --model NAME --weights FILE ...)

Writes PNGs per image into OUTDIR:
- token models with a patch grid (ViT, DeiT, MAE encoders, DINO): `NAME_heads.png`, the class token's attention
  per head in the last block over the patches (the DINO figure), and `NAME_rollout.png`, attention rollout over all
  blocks (Abnar and Zuidema 2020: per block, heads averaged, plus the identity for the residual, rows renormalised;
  the product over blocks; the class token's row). The weights are recomputed from each self-attention's own query
  and key projections, so this works whatever `attention_impl` the model runs with.
- hierarchical models (`layers.HierarchicalBackbone`: Swin, PVTv2, MViTv2, ConvNeXt): `NAME_gradcam.png`,
  Grad-CAM (Selvaraju et al. 2017) of the predicted class on the last stage's feature map.

The maths are small functions (`attention_rollout`, `class_token_maps`, `grad_cam`) tested on their own.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

from absl import app, flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

FLAGS = flags.FLAGS
Array = jax.Array


# ---------------------------------------------------------------------------------------------------------------------
# The maths.


def attention_rollout(attentions: Sequence[Array], *, residual: bool = True) -> Array:
  """Attention rollout over blocks: `attentions` is one (heads, N, N) row-stochastic matrix per block (first block
  first). Per block the heads are averaged and, with `residual`, 0.5 * (A + I) models the skip connection; rows
  are renormalised; the result A_L ... A_1 is (N, N) and row-stochastic."""
  n = attentions[0].shape[-1]
  rollout = jnp.eye(n, dtype=jnp.float32)
  for weights in attentions:
    a = jnp.mean(jnp.asarray(weights, jnp.float32), axis=0)
    if residual:
      a = 0.5 * a + 0.5 * jnp.eye(n, dtype=jnp.float32)
    a = a / jnp.sum(a, axis=-1, keepdims=True)
    rollout = a @ rollout
  return rollout


def patch_map(row: Array, num_prefix: int, grid: tuple[int, int]) -> Array:
  """The patch-token part of one attention row (N,) as a (gh, gw) map that sums to one."""
  patches = jnp.asarray(row[num_prefix:], jnp.float32).reshape(grid)
  return patches / jnp.sum(patches)


def class_token_maps(attention: Array, num_prefix: int, grid: tuple[int, int]) -> Array:
  """Per head, the class token's attention over the patches of one block's (heads, N, N) weights: (heads, gh, gw),
  each map renormalised to sum to one (the prefix tokens' share dropped)."""
  return jax.vmap(lambda w: patch_map(w[0], num_prefix, grid))(attention)


def rollout_map(rollout: Array, num_prefix: int, grid: tuple[int, int]) -> Array:
  """The (gh, gw) map of a rollout matrix: the class token's row, or, for models without prefix tokens (global
  average pooling), the mean of all rows."""
  row = rollout[0] if num_prefix else jnp.mean(rollout, axis=0)
  return patch_map(row, num_prefix, grid)


def grad_cam(activations: Array, gradients: Array) -> Array:
  """Grad-CAM of one (h, w, C) feature map and the gradient of a class score with respect to it: ReLU of the
  channel sum weighted by the spatially averaged gradients, scaled to max 1 (all zeros when nothing is positive)."""
  weights = jnp.mean(gradients, axis=(0, 1))
  cam = jax.nn.relu(jnp.einsum('hwc,c->hw', activations, weights))
  peak = jnp.max(cam)
  return jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), cam)


def grad_cam_of(score_fn: Callable[[Array], Array], activations: Array) -> Array:
  """Grad-CAM of the scalar `score_fn(activations)` (e.g. one logit computed from a (h, w, C) feature map)."""
  return grad_cam(activations, jax.grad(score_fn)(activations))


# ---------------------------------------------------------------------------------------------------------------------
# Reading a model.


def capture_attention(model: nn.Module, variables: Any, images: Array) -> tuple[Array, list[Array]]:
  """(logits, [per self-attention block (B, heads, N, N) weights in call order]) of `images`.

  Intercepts every `layers.MultiHeadAttention` self-attention call (no mask) and recomputes its softmax weights
  from the module's own query/key parameters in float32, so it reads the same weights whichever attention kernel
  the model uses. Cross-attention (e.g. a MAP head) is left out.
  """
  from vit_jax.models import layers  # pylint: disable=g-import-not-at-top
  captured: list[Array] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (isinstance(module, layers.MultiHeadAttention) and context.method_name == '__call__'
        and (len(args) < 2 or args[1] is None) and kwargs.get('inputs_kv') is None and kwargs.get('mask') is None):
      params = module.variables['params']
      x = jnp.asarray(args[0], jnp.float32)
      project = lambda p: jnp.einsum('bld,dhk->blhk', x, p['kernel']) + p['bias']
      q, k = project(params['query']), project(params['key'])
      logits = jnp.einsum('bqhk,bvhk->bhqv', q, k) / jnp.sqrt(jnp.float32(q.shape[-1]))
      captured.append(jax.nn.softmax(logits, axis=-1))
    return out

  with nn.intercept_methods(interceptor):
    logits = model.apply(variables, images, train=False)
  return logits, captured


def token_grid(model: nn.Module, image_size: int, num_tokens: int) -> tuple[int, tuple[int, int]]:
  """(prefix tokens, patch grid) of a token model's sequence of `num_tokens` at `image_size`, from its patch
  size."""
  patch = getattr(model, 'patch_size', None)
  if not patch:
    raise ValueError(f'{type(model).__name__} has no patch_size, so its tokens cannot be laid out on the image.')
  g = image_size // int(patch)
  return num_tokens - g * g, (g, g)


def is_hierarchical(model: nn.Module) -> bool:
  from vit_jax.models import layers  # pylint: disable=g-import-not-at-top
  return isinstance(model, layers.HierarchicalBackbone)


def model_grad_cam(model: nn.Module, variables: Any, image: Array, label: Optional[int] = None) -> tuple[Array, int]:
  """(Grad-CAM map (h, w) on the last stage, class) of a hierarchical model for one (H, W, 3) image; the class is
  the predicted one unless `label` is given."""
  acts = model.apply(variables, image[None], method=lambda m, x: m.forward_intermediates(x, train=False)[-1])[0]
  head = lambda a: model.apply(variables, a[None], method=lambda m, f: m.forward_head(m.final_norm(f)))[0]
  if label is None:
    label = int(jnp.argmax(head(acts)))
  return grad_cam_of(lambda a: head(a)[label], acts), label


# ---------------------------------------------------------------------------------------------------------------------
# Figures.


def _overlay(ax: Any, image: np.ndarray, heat: np.ndarray, title: str) -> None:
  """Draws `image` ([0, 1]) with `heat` upsampled (bilinear) to its size on top."""
  h, w = image.shape[:2]
  big = np.asarray(jax.image.resize(jnp.asarray(heat, jnp.float32), (h, w), 'bilinear'))
  ax.imshow(image, interpolation='nearest')
  ax.imshow(big, cmap='inferno', alpha=0.55, interpolation='nearest')
  ax.set_title(title, fontsize=8)
  ax.axis('off')


def save_figure(path: str, image: np.ndarray, maps: Sequence[np.ndarray], titles: Sequence[str],
                suptitle: str) -> str:
  """One PNG: the image, then each map over it."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(maps) + 1
  fig, axes = plt.subplots(1, n, figsize=(1.6 * n, 1.9), dpi=100)
  axes[0].imshow(image, interpolation='nearest')
  axes[0].set_title('input', fontsize=8)
  axes[0].axis('off')
  for ax, heat, title in zip(axes[1:], maps, titles):
    _overlay(ax, image, heat, title)
  fig.suptitle(suptitle, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def visualize_image(loaded: Any, path: str, out_dir: str) -> list[str]:
  """Writes the figures of one image file for `loaded` (a predict.LoadedModel); returns their paths."""
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(predict.load_image(path, loaded.dataset_config))
  shown = np.clip((np.asarray(x) + 1) / 2, 0, 1)  # eval_preprocess maps [0, 255] to [-1, 1].
  stem = os.path.splitext(os.path.basename(path))[0]
  os.makedirs(out_dir, exist_ok=True)
  name = lambda c: loaded.class_names[c] if loaded.class_names and c < len(loaded.class_names) else str(c)
  if is_hierarchical(loaded.model):
    cam, label = model_grad_cam(loaded.model, loaded.variables, x)
    return [save_figure(os.path.join(out_dir, f'{stem}_gradcam.png'), shown, [np.asarray(cam)], ['Grad-CAM'],
                        f'predicted {name(label)}')]
  logits, attentions = capture_attention(loaded.model, loaded.variables, x[None])
  if not attentions:
    raise ValueError(f'{type(loaded.model).__name__} has no self-attention blocks to read and is not a '
                     'hierarchical backbone: visualize supports ViT-style token models and hierarchical models.')
  label = int(jnp.argmax(logits[0]))
  prefix, grid = token_grid(loaded.model, x.shape[0], attentions[-1].shape[-1])
  suptitle = f'predicted {name(label)}'
  out = []
  if prefix:
    heads = class_token_maps(attentions[-1][0], prefix, grid)
    out.append(save_figure(os.path.join(out_dir, f'{stem}_heads.png'), shown, list(np.asarray(heads)),
                           [f'head {i}' for i in range(len(heads))], suptitle + ': last block, class token'))
  rollout = rollout_map(attention_rollout([a[0] for a in attentions]), prefix, grid)
  out.append(save_figure(os.path.join(out_dir, f'{stem}_rollout.png'), shown, [np.asarray(rollout)],
                         ['rollout'], suptitle))
  return out


def define_flags() -> None:
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  predict.define_flags()
  flags.DEFINE_string('out', None, 'Folder for the PNGs.')


def main(argv: Sequence[str]) -> None:
  from vit_jax import console, predict  # pylint: disable=g-import-not-at-top
  console.configure_logging(FLAGS.verbosity)
  if not FLAGS.out:
    raise app.UsageError('Give --out OUTDIR.')
  files = predict.list_images(argv[1:])
  if not files:
    raise app.UsageError('Give one or more image files or folders.')
  loaded = predict.load_from_flags()
  for path in files:
    for written in visualize_image(loaded, path, FLAGS.out):
      print(written, flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
