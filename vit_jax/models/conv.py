"""`Conv`: flax's nn.Conv with depthwise and 1x1 convolutions that are fast on CPU.

XLA:CPU runs a depthwise (grouped, one channel per group) convolution through its generic grouped-conv path at about
0.3-0.4 GMAC/s on this project's 2-core machine: a 7x7 depthwise conv on 64x64x48 took 21-28 ms, nearly half of a
mobile family's batch-1 latency. The same conv written as k*k shifted multiply-adds (`shifted_depthwise_conv`) is one
elementwise loop fusion and runs 8-50x faster there (`experiments/benchmarks/depthwise_conv.py` measures it).
On GPU and TPU the library convolution is the fast one, so the choice is made per platform inside the compiled
program (`jax.lax.platform_dependent`): only the branch of the platform being compiled for is kept. Exporters keep
the choice (`jax.export` for the platforms it is asked for); jax2onnx takes the library branch, i.e. ONNX `Conv`s.

A 1x1 convolution at stride 1 is a matrix product over the channel axis; XLA:CPU runs it through its convolution
library 1.5-2.5x slower than as a dot (`pointwise_conv`), so on CPU it becomes one.

`Conv` keeps nn.Conv's fields, parameter names, shapes and initialisers, so checkpoints and converters are
unaffected; only the computation of the depthwise case changes, and it is equal to the library conv up to float
rounding (the order of the sums). Every other convolution (dense k x k, grouped with several channels per group,
input-dilated) goes to `lax.conv_general_dilated` unchanged.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Padding = Union[str, Sequence[tuple[int, int]]]

# Larger kernels than this many taps are left to the library conv: the unrolled sum grows with the kernel volume.
MAX_SHIFTED_TAPS = 121

def _is_channels_last(dimension_numbers: Any, ndim: int) -> bool:
  """True for flax's layout: batch first, features last, spatial in order; kernel (*spatial, in, out)."""
  if dimension_numbers is None:
    return False
  dn = lax.conv_dimension_numbers((1,) * ndim, (1,) * ndim, dimension_numbers)
  spatial = tuple(range(1, ndim - 1))
  return (dn.lhs_spec == (0, ndim - 1) + spatial and dn.out_spec == dn.lhs_spec
          and dn.rhs_spec == (ndim - 1, ndim - 2) + tuple(range(ndim - 2)))


def shifted_depthwise_conv(x: Array, kernel: Array, strides: Sequence[int], padding: Sequence[tuple[int, int]],
                           rhs_dilation: Sequence[int], preferred_element_type: Optional[Any] = None) -> Array:
  """A channels-last depthwise conv, x (N, *spatial, C) with kernel (*k, 1, C * m) for a channel multiplier m, as a
  sum of shifted products.

  Each kernel tap is a strided slice of the padded input times that tap's per-channel weight; XLA fuses the whole
  sum into one loop. Sub-float32 inputs accumulate in float32, like the library conv.
  """
  spatial_in = x.shape[1:-1]
  taps = kernel.shape[:-2]
  out_dtype = preferred_element_type or jnp.result_type(x, kernel)
  acc_dtype = jnp.promote_types(out_dtype, jnp.float32)
  multiplier = kernel.shape[-1] // x.shape[-1]
  if multiplier > 1:  # each input channel feeds `multiplier` consecutive output channels, as in a grouped conv
    x = jnp.repeat(x, multiplier, axis=-1)
  x = jnp.pad(x, ((0, 0),) + tuple(padding) + ((0, 0),))
  out_shape = [(n + lo + hi - d * (k - 1) - 1) // s + 1
               for n, (lo, hi), k, s, d in zip(spatial_in, padding, taps, strides, rhs_dilation)]
  weights = kernel.reshape(taps + (kernel.shape[-1],)).astype(acc_dtype)
  total = None
  for offset in np.ndindex(*taps):
    start = (0,) + tuple(o * d for o, d in zip(offset, rhs_dilation)) + (0,)
    limit = ((x.shape[0],) + tuple(b + s * (n - 1) + 1 for b, s, n in zip(start[1:-1], strides, out_shape))
             + (x.shape[-1],))
    term = lax.slice(x, start, limit, (1,) + tuple(strides) + (1,)).astype(acc_dtype) * weights[offset]
    total = term if total is None else total + term
  return total.astype(out_dtype)


def pointwise_conv(x: Array, kernel: Array, precision: Any = None,
                   preferred_element_type: Optional[Any] = None) -> Array:
  """A channels-last 1x1 conv at stride 1 and no padding, x (N, *spatial, C_in) with kernel (1, ..., C_in, C_out), as
  one matrix product over the channel axis: XLA:CPU runs it 1.5-2.5x faster than the same 1x1 convolution."""
  w = kernel.reshape(kernel.shape[-2:])
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Padding,
                         lhs_dilation: Optional[Sequence[int]] = None, rhs_dilation: Optional[Sequence[int]] = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Optional[Any] = None) -> Array:
  """`lax.conv_general_dilated`; on CPU, channels-last depthwise convs go to `shifted_depthwise_conv` and 1x1 convs
  to `pointwise_conv` (see the module docstring). Every other case, and every other platform, is unchanged."""
  library = lambda a, b: lax.conv_general_dilated(
      a, b, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type)
  ndim, channels = lhs.ndim, lhs.shape[-1]
  spatial = ndim - 2
  taps = rhs.shape[:-2]
  strides = tuple(window_strides)
  dilation = tuple(rhs_dilation or (1,) * spatial)
  if (batch_group_count != 1 or not _is_channels_last(dimension_numbers, ndim)
      or any(d != 1 for d in (lhs_dilation or (1,) * spatial))):
    return library(lhs, rhs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:-1], [d * (k - 1) + 1 for k, d in zip(taps, dilation)], strides,
                                  padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if any(p < 0 for pair in pads for p in pair):  # a cropping pad: rare, left to the library
    return library(lhs, rhs)
  if feature_group_count == 1 and all(k == 1 for k in taps) and all(s == 1 for s in strides) and not any(
      p for pair in pads for p in pair):
    fast = lambda a, b: pointwise_conv(a, b, precision, preferred_element_type)
  elif (feature_group_count > 1 and feature_group_count == channels and rhs.shape[-2] == 1
        and rhs.shape[-1] % channels == 0 and int(np.prod(taps)) <= MAX_SHIFTED_TAPS):
    fast = lambda a, b: shifted_depthwise_conv(a, b, strides, pads, dilation, preferred_element_type)
  else:
    return library(lhs, rhs)
  return lax.platform_dependent(lhs, rhs, cpu=fast, default=library)


class Conv(nn.Conv):
  """nn.Conv (same fields, parameters and names) whose depthwise and 1x1 cases run fast on CPU; see the module
  docstring."""
  conv_general_dilated: Any = conv_general_dilated
