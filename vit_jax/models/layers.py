"""Building blocks shared by the transformer families.

Parameter names and shapes follow the official flax ViT code, so published checkpoints load without renaming.
Every module takes `dtype`, the compute dtype; parameters always stay float32.

Sharding: parameters are created through `logical(init, names)`, which attaches logical axis names ('embed', 'mlp',
'heads', 'kv', 'classes', ...) inside `with logical_partitioning():` (the trainer's state creation), and activations
are constrained with `nn.with_logical_constraint` (a no-op without flax logical-axis rules and a mesh). Elsewhere
`model.init` returns plain arrays, so checkpoint and conversion code sees the usual parameter tree.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]
LogicalNames = Sequence[Optional[str]]

# Shorthands for the logical axes of activations (mapped to mesh axes by the trainer's rules).
BATCH_LENGTH_EMBED = ('batch', 'length', 'embed')


_BOX_NAMES = contextvars.ContextVar('vit_jax_logical_partitioning', default=False)


def per_stage(value: Any, n: int, name: str) -> tuple:
  """One value per stage: a scalar repeated `n` times, or a sequence of exactly `n` values (a ValueError naming
  the option otherwise)."""
  if isinstance(value, (int, float, np.integer, np.floating)):
    return (value.item() if isinstance(value, np.generic) else value,) * n
  value = tuple(value)
  if len(value) != n:
    raise ValueError(f'{name} needs one value per stage ({n}) or a single value, got {value}.')
  return value


@contextlib.contextmanager
def logical_partitioning() -> Iterator[None]:
  """Within this context `model.init` returns parameters boxed (nn.LogicallyPartitioned) with their logical axes."""
  token = _BOX_NAMES.set(True)
  try:
    yield
  finally:
    _BOX_NAMES.reset(token)


def logical(init: Initializer, names: LogicalNames) -> Initializer:
  """`init` whose parameter carries logical axis `names` inside `logical_partitioning()`, and is a plain array
  otherwise (so `model.init` keeps the official tree, and apply-time shape checks see plain shapes)."""
  boxed = nn.with_logical_partitioning(init, tuple(names))

  def wrapped(*args, **kwargs):
    return boxed(*args, **kwargs) if _BOX_NAMES.get() else init(*args, **kwargs)
  return wrapped


def constrain(x: Array, names: LogicalNames) -> Array:
  """Sharding constraint on an activation by logical axis names; a no-op without rules and a mesh."""
  return nn.with_logical_constraint(x, tuple(names))


_GELU_VIA_ERFC = contextvars.ContextVar('vit_jax_gelu_via_erfc', default=False)


@contextlib.contextmanager
def gelu_via_erfc() -> Iterator[None]:
  """Within the block, `gelu(approximate=False)` is traced through erfc (jax.nn.gelu's form) instead of erf.

  For consumers whose StableHLO is older than the serialised form of erf (a composite op): TensorFlow 2.21 cannot
  load a jax2tf SavedModel that contains one, so `vit_jax.export` writes SavedModels inside this block. It changes
  tracing only: a function compiled before keeps the form it was traced with.
  """
  token = _GELU_VIA_ERFC.set(True)
  try:
    yield
  finally:
    _GELU_VIA_ERFC.reset(token)


def gelu(x: Array, approximate: bool = True) -> Array:
  """nn.gelu; the exact form is computed as x (1 + erf(x / sqrt 2)) / 2, PyTorch's formula.

  jax.nn.gelu's exact form goes through erfc, which XLA:CPU expands into exponentials and a division: on a
  128x128x48 activation it took 1.2 ms against 0.54 ms for the erf form, and GELU sits after every conv of the
  convolutional families. Both are within 1.1e-6 of float64 PyTorch over |x| <= 12.
  """
  if approximate or _GELU_VIA_ERFC.get():
    return nn.gelu(x, approximate=approximate)
  return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(1 / np.sqrt(2), x.dtype)))


def layer_norm(name: str, *, epsilon: float, dtype: Dtype, axis_name: str = 'embed',
               scale_init: Initializer = nn.initializers.ones,
               bias_init: Initializer = nn.initializers.zeros) -> nn.LayerNorm:
  """nn.LayerNorm (statistics in float32) whose scale and bias carry the logical axis `axis_name`."""
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, scale_init=logical(scale_init, (axis_name,)),
                      bias_init=logical(bias_init, (axis_name,)), name=name)


REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'nothing_saveable',
                  'everything_saveable')


def remat(module_cls: Any, policy: Union[bool, str], static_argnums: tuple[int, ...] = ()) -> Any:
  """`module_cls` wrapped in nn.remat with a named jax.checkpoint policy.

  policy: False / 'none' (no remat), True / 'full' (save nothing but the block inputs), or a name from
  jax.checkpoint_policies such as 'dots_with_no_batch_dims_saveable' (keep the weight matmuls' outputs).
  """
  if policy is False or policy == 'none':
    return module_cls
  if policy is True or policy == 'full':
    return nn.remat(module_cls, static_argnums=static_argnums)
  if policy not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat policy {policy!r}; choose one of {REMAT_POLICIES} (or a bool).')
  return nn.remat(module_cls, static_argnums=static_argnums, policy=getattr(jax.checkpoint_policies, policy))


class MlpBlock(nn.Module):
  """Transformer feed-forward block: Dense_0 -> GELU -> dropout -> Dense_1 -> dropout.

  `gelu_approximate=True` is the tanh approximation used by the official JAX ViT; timm (PyTorch) weights need
  the exact erf GELU (`False`).
  """
  mlp_dim: int
  out_dim: Optional[int] = None  # Defaults to the input width.
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    out_dim = self.out_dim or x.shape[-1]
    dense = dict(dtype=self.dtype, param_dtype=jnp.float32)
    hidden = ('batch',) + ('length',) * (x.ndim - 2) + ('mlp',)
    x = nn.Dense(self.mlp_dim, name='Dense_0', kernel_init=logical(self.kernel_init, ('embed', 'mlp')),
                 bias_init=logical(self.bias_init, ('mlp',)), **dense)(x)
    x = constrain(gelu(x, approximate=self.gelu_approximate), hidden)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
    x = nn.Dense(out_dim, name='Dense_1', kernel_init=logical(self.kernel_init, ('mlp', 'embed')),
                 bias_init=logical(self.bias_init, ('embed',)), **dense)(x)
    return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class DropPath(nn.Module):
  """Stochastic depth: zeroes whole residual branches per example (rescaling survivors by 1/keep).

  Draws from the 'dropout' rng; the identity when `deterministic` or `rate == 0`. `rate` may be a traced scalar
  (one per layer under nn.scan).
  """
  rate: Any = 0.0

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    if deterministic:
      return x
    if isinstance(self.rate, (int, float)):
      if self.rate == 0.0:
        return x
      if not 0.0 <= self.rate < 1.0:
        raise ValueError(f'DropPath rate must be in [0, 1), got {self.rate}.')
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product attention with flax's `nn.MultiHeadDotProductAttention` parameter tree.

  Submodules `query`, `key`, `value` (kernel (D, heads, head_dim), bias (heads, head_dim)) and `out`
  (kernel (heads, head_dim, D), bias (D,)). Our own module so the attention kernel and sharding can be swapped
  without renaming parameters. Softmax runs in float32 whatever `dtype` is; attention-weight dropout is
  per element (as the official ViT's `broadcast_dropout=False`). `attention_impl` picks the kernel
  (`attention.IMPLEMENTATIONS`: 'einsum', 'xla', 'cudnn').
  """
  num_heads: int
  qkv_features: Optional[int] = None  # Defaults to the query input width.
  out_features: Optional[int] = None  # Defaults to the query input width.
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.xavier_uniform()
  bias_init: Initializer = nn.initializers.zeros
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None, *, mask: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """`inputs_q` (B, Lq, D), `inputs_kv` (B, Lk, Dkv) or None for self-attention; `mask` broadcasts to
    (B, heads, Lq, Lk), True = attend."""
    if inputs_kv is None:
      inputs_kv = inputs_q
    features = self.qkv_features or inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f'Attention width {features} is not divisible by num_heads={self.num_heads}.')
    head_dim = features // self.num_heads
    dense = dict(dtype=self.dtype, param_dtype=jnp.float32)
    proj = lambda name: nn.DenseGeneral((self.num_heads, head_dim), axis=-1, name=name,
                                        kernel_init=logical(self.kernel_init, ('embed', 'heads', 'kv')),
                                        bias_init=logical(self.bias_init, ('heads', 'kv')), **dense)
    heads = ('batch', 'length', 'heads', 'kv')
    q = constrain(proj('query')(inputs_q), heads)  # (B, Lq, H, Dh)
    k = constrain(proj('key')(inputs_kv), heads)
    v = constrain(proj('value')(inputs_kv), heads)

    dropout = None
    if self.dropout_rate > 0 and not deterministic:
      dropout = lambda w: nn.Dropout(rate=self.dropout_rate)(w, deterministic=False)
    x = constrain(attention.dot_product_attention(q, k, v, mask=mask, implementation=self.attention_impl,
                                                 dropout=dropout), heads)

    out_features = self.out_features or inputs_q.shape[-1]
    return nn.DenseGeneral(out_features, axis=(-2, -1), name='out',
                           kernel_init=logical(self.kernel_init, ('heads', 'kv', 'embed')),
                           bias_init=logical(self.bias_init, ('embed',)), **dense)(x)


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision): a learned probe token attends over the sequence.

  Returns (B, D): x + MLP(LN(x)) for the attended probe x. Names match big_vision checkpoints: `probe`,
  `MultiHeadDotProductAttention_0`, `LayerNorm_0`, `MlpBlock_0`.
  """
  num_heads: int
  mlp_dim: Optional[int] = None  # Defaults to 4x the width.
  gelu_approximate: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention_impl: str = 'einsum'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, _, d = x.shape
    probe = self.param('probe', logical(nn.initializers.xavier_uniform(), (None, None, 'embed')), (1, 1, d),
                       jnp.float32)
    probe = jnp.broadcast_to(probe.astype(self.dtype), (b, 1, d))
    x = MultiHeadAttention(num_heads=self.num_heads, dtype=self.dtype, attention_impl=self.attention_impl,
                           name='MultiHeadDotProductAttention_0')(probe, x)
    y = layer_norm('LayerNorm_0', epsilon=self.layer_norm_eps, dtype=self.dtype)(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim or 4 * d, gelu_approximate=self.gelu_approximate, dtype=self.dtype,
                     name='MlpBlock_0')(y)
    return x[:, 0]


class HierarchicalBackbone(nn.Module):
  """The forward API shared by the hierarchical families (Swin, PVTv2, MViTv2), defined once.

  A subclass's setup defines `patch_embed`, `head_drop`, `head` (when num_classes > 0) and, if it has one, the
  final `norm`; it implements `stage_modules()` and `check_input_size(height, width)` (a ValueError that names the
  fix for sizes the model cannot take). Features are NHWC; the head mean-pools over H and W.
  """

  def stage_modules(self) -> Sequence[nn.Module]:
    raise NotImplementedError

  def check_input_size(self, height: int, width: int) -> None:
    raise NotImplementedError

  def final_norm(self, x: Array) -> Array:
    """The norm after the last stage (identity for families without one, e.g. PVTv2)."""
    return self.norm(x)

  def _stages(self, images: Array, train: bool) -> list[Array]:
    if images.ndim != 4:
      raise ValueError(f'Expected NHWC images, got shape {images.shape}.')
    self.check_input_size(images.shape[1], images.shape[2])
    x = self.patch_embed(images)
    outs = []
    for stage in self.stage_modules():
      x = stage(x, train)
      outs.append(x)
    return outs

  def forward_intermediates(self, images: Array, *, train: bool = False, norm: bool = False) -> list[Array]:
    """Per-stage NHWC outputs (strides 4, 8, 16, 32 for the registered models); norm=True applies the final norm
    to the last one (timm's `norm`)."""
    outs = self._stages(images, train)
    if norm:
      outs[-1] = self.final_norm(outs[-1])
    return outs

  def forward_features(self, images: Array, *, train: bool = False) -> Array:
    """The final-normed NHWC feature map (timm's forward_features, NHWC)."""
    return self.final_norm(self._stages(images, train)[-1])

  def forward_head(self, features: Array, *, pre_logits: bool = False, train: bool = False) -> Array:
    """Mean over H and W, then (unless pre_logits) dropout and the classifier."""
    x = jnp.mean(features, axis=(1, 2))
    if pre_logits:
      return x
    x = self.head_drop(x, deterministic=not train)
    return self.head(x) if self.num_classes > 0 else x

  def __call__(self, images: Array, *, train: bool = False) -> Array:
    return self.forward_head(self.forward_features(images, train=train), train=train)


def torch_batch_norm(name: str, *, train: bool, dtype: Dtype, epsilon: float = 1e-5) -> nn.BatchNorm:
  """nn.BatchNorm with torch BatchNorm2d numerics (eps 1e-5, momentum 0.1 = flax's 0.9 decay) over the last axis.

  The running statistics live in the `batch_stats` collection: train=True normalises with the batch's statistics
  (computed over the whole, possibly sharded, batch: no pmap axis name) and updates them when applied with
  mutable=['batch_stats']; train=False uses them.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=epsilon, dtype=dtype, axis_name=None,
                      name=name)


# Multiply-add counting for the families' analytic FLOPs (FamilyFacts.forward_macs).

def conv_side(size: int, kernel: int, stride: int = 1, pad: Optional[int] = None) -> int:
  """Output side of a conv on `size` pixels with symmetric padding `pad` (default kernel // 2)."""
  pad = kernel // 2 if pad is None else pad
  return (size + 2 * pad - kernel) // stride + 1


def conv_macs(side: int, in_ch: int, out_ch: int, kernel: int = 1, groups: int = 1) -> int:
  """Multiply-adds of a (grouped) conv with a side x side output: side^2 k^2 (C_in / groups) C_out (a 1x1 conv is a
  Linear on side^2 tokens; a depthwise conv has groups = C_in = C_out)."""
  return side * side * kernel * kernel * (in_ch // groups) * out_ch
