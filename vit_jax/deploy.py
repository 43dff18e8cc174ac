"""Deploy-time folding: a trained model rewritten for inference with the same logits and fewer operations.

Latency-oriented families (LeViT, EfficientFormer, EfficientViT-M, FastViT, MobileOne-style blocks) train with
BatchNorm after every linear/conv and with parallel branches that collapse into one conv at inference. Each family
says how in its `FamilyFacts.fold` (vit_jax/models/facts.py); this module dispatches to it and supplies the
arithmetic the families share, so the maths of folding lives in one place:

- `fold_batchnorm`: y = BN(x @ W + b) becomes x @ W' + b' (dense or conv kernel, output channels last);
- `pad_kernel_to`: a 1x1 (or smaller) conv kernel placed at the centre of a kxk one, to sum branches;
- `identity_kernel`: the conv kernel that maps x to x (the skip branch of a re-parameterisable block);
- `fold_batchnorm_before`: y = BN(x) @ W + b (a BatchNorm-then-linear classifier) becomes x @ W' + b';
- `fold_batchnorm_pairs`: every (layer, BatchNorm) sibling pair of a params tree folded by `fold_batchnorm`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from vit_jax.models import registry
from vit_jax.models.facts import get_family

Array = Any


def fold_batchnorm(kernel: Array, bias: Optional[Array], *, scale: Optional[Array], offset: Optional[Array],
                   mean: Array, var: Array, epsilon: float) -> tuple[Array, Array]:
  """Folds an inference BatchNorm into the preceding dense/conv: returns (kernel', bias').

  BN(z) = (z - mean) / sqrt(var + eps) * scale + offset with z = x @ kernel + bias, so
  kernel' = kernel * s and bias' = (bias - mean) * s + offset with s = scale / sqrt(var + eps), broadcast over the
  kernel's last (output-channel) axis. This holds for flax Dense (in, out), Conv (kh, kw, in/groups, out) and
  depthwise kernels alike. `scale`/`offset` None means BatchNorm without affine parameters.
  """
  mean = jnp.asarray(mean)
  s = 1.0 / jnp.sqrt(jnp.asarray(var) + epsilon)
  if scale is not None:
    s = s * jnp.asarray(scale)
  if kernel.shape[-1] != s.shape[-1]:
    raise ValueError(f'BatchNorm over {s.shape[-1]} channels cannot fold into a kernel with {kernel.shape[-1]} '
                     f'output channels (kernel shape {tuple(kernel.shape)}).')
  b = jnp.zeros_like(mean) if bias is None else jnp.asarray(bias)
  new_bias = (b - mean) * s + (0.0 if offset is None else jnp.asarray(offset))
  return jnp.asarray(kernel) * s, new_bias


def fold_batchnorm_before(kernel: Array, bias: Optional[Array], *, scale: Optional[Array],
                          offset: Optional[Array], mean: Array, var: Array, epsilon: float) -> tuple[Array, Array]:
  """Folds an inference BatchNorm that comes before a dense layer: returns (kernel', bias').

  With BN(x) = x * s + t, s = scale / sqrt(var + eps), t = offset - mean * s: BN(x) @ W + b = x @ (s[:, None] W)
  + (t @ W + b). `kernel` is a flax Dense kernel (in, out).
  """
  kernel = jnp.asarray(kernel)
  s = 1.0 / jnp.sqrt(jnp.asarray(var) + epsilon)
  if scale is not None:
    s = s * jnp.asarray(scale)
  if kernel.ndim != 2 or kernel.shape[0] != s.shape[-1]:
    raise ValueError(f'BatchNorm over {s.shape[-1]} channels cannot fold into a dense kernel of shape '
                     f'{tuple(kernel.shape)} (its input width must match).')
  t = (0.0 if offset is None else jnp.asarray(offset)) - jnp.asarray(mean) * s
  b = jnp.zeros(kernel.shape[1], kernel.dtype) if bias is None else jnp.asarray(bias)
  return kernel * s[:, None], t @ kernel + b


def fold_batchnorm_pairs(params: Mapping[str, Any], stats: Mapping[str, Any], *, layer: str, norm: str,
                          epsilon: float) -> dict:
  """`params` with every module holding a `layer` child (Dense/Conv kernel, optional bias) followed by a `norm`
  child (BatchNorm scale/bias; running mean/var at the same path in `stats`) rewritten as `layer` alone, with the
  BatchNorm folded in (`fold_batchnorm`). Other entries are kept as they are."""
  out = {}
  for key, value in params.items():
    if not isinstance(value, Mapping):
      out[key] = value
      continue
    sub_stats = stats.get(key, {}) if isinstance(stats, Mapping) else {}
    if layer in value and norm in value and 'kernel' in value[layer]:
      if norm not in sub_stats:
        raise ValueError(f'BatchNorm {key}/{norm} has no running statistics to fold; pass the batch_stats.')
      kernel, bias = fold_batchnorm(value[layer]['kernel'], value[layer].get('bias'), scale=value[norm].get('scale'),
                                    offset=value[norm].get('bias'), mean=sub_stats[norm]['mean'],
                                    var=sub_stats[norm]['var'], epsilon=epsilon)
      rest = {k: v for k, v in value.items() if k not in (layer, norm)}
      rest_stats = {k: v for k, v in sub_stats.items() if k != norm}
      out[key] = {**fold_batchnorm_pairs(rest, rest_stats, layer=layer, norm=norm, epsilon=epsilon),
                  layer: {'kernel': kernel, 'bias': bias}}
    else:
      out[key] = fold_batchnorm_pairs(value, sub_stats, layer=layer, norm=norm, epsilon=epsilon)
  return out


def pad_kernel_to(kernel: Array, size: tuple[int, int]) -> Array:
  """Zero-pads a (kh, kw, cin, cout) conv kernel to `size`, centred: a 1x1 branch added to a kxk one."""
  kh, kw = kernel.shape[:2]
  th, tw = size
  if (th - kh) % 2 or (tw - kw) % 2 or th < kh or tw < kw:
    raise ValueError(f'Cannot centre a {kh}x{kw} kernel in {th}x{tw}: the sizes must differ by an even amount.')
  ph, pw = (th - kh) // 2, (tw - kw) // 2
  return jnp.pad(kernel, ((ph, ph), (pw, pw), (0, 0), (0, 0)))


def identity_kernel(channels: int, size: tuple[int, int], *, groups: int = 1, dtype: Any = jnp.float32) -> Array:
  """The (kh, kw, channels/groups, channels) conv kernel that maps x to x (stride 1, 'SAME' padding)."""
  if channels % groups:
    raise ValueError(f'{channels} channels do not split into {groups} groups.')
  per_group = channels // groups
  kernel = np.zeros((size[0], size[1], per_group, channels), dtype=np.float32)
  for c in range(channels):
    kernel[size[0] // 2, size[1] // 2, c % per_group, c] = 1.0
  return jnp.asarray(kernel, dtype=dtype)


def fold_for_inference(model_name: str, variables: Mapping[str, Any], *, num_classes: int,
                       **options: Any) -> tuple[nn.Module, dict]:
  """Registered model `model_name` (built with `options`) and its trained `variables`, in deploy form.

  Returns (model, variables) whose `model.apply(variables, x, train=False)` gives the same logits as the original.
  A family without a `fold` rule is returned unchanged (nothing to fold).
  """
  spec = registry.get_model_spec(model_name)
  facts = get_family(spec.family)
  if facts.fold is None:
    return registry.create_model(model_name, num_classes=num_classes, **options), dict(variables)
  folded_options, folded_variables = facts.fold({**options}, variables)
  return registry.create_model(model_name, num_classes=num_classes, **folded_options), dict(folded_variables)
