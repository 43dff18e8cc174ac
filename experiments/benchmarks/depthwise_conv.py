"""XLA:CPU's library convolution against `vit_jax.models.conv`'s CPU formulations, at the families' own shapes.

  python experiments/benchmarks/depthwise_conv.py [--rounds 5 --iters 20] [--grad]

Three kinds of op, each timed both ways in alternating rounds (medians, batch 1, float32):
- depthwise k x k convs (FastViT's 7x7 ConvFFN and patch-embedding convs, MobileViT / EfficientFormer / EfficientViT's
  3x3 and 5x5 ones, ConvNeXt's 7x7): `lax.conv_general_dilated(feature_group_count=C)` against
  `conv.shifted_depthwise_conv`, the k*k shifted multiply-adds;
- 1x1 convs: the library conv against `conv.pointwise_conv`, a dot over the channel axis;
- exact GELU: `jax.nn.gelu(approximate=False)` (erfc) against `layers.gelu` (erf).
`--grad` also times the gradient of a scalar loss through each conv (training on CPU).

Each row prints milliseconds, GMAC/s and the ratio library / ours (> 1: ours is faster), with the load average
before and after; measure on an idle machine.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable

from absl import app, flags
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import conv, layers

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 5, 'Alternating rounds.')
flags.DEFINE_integer('iters', 20, 'Timed calls per variant per round.')
flags.DEFINE_bool('grad', False, 'Also time the gradient through each conv.')

# (label, spatial side, channels in, channels out, kernel, stride); groups = channels in for depthwise rows.
DEPTHWISE = [
    ('fastvit_t8 ConvFFN 7x7', 64, 48, 48, 7, 1),
    ('fastvit_t8 patch embed 7x7/2 (x2 channels)', 64, 48, 96, 7, 2),
    ('convnext_t 7x7', 56, 96, 96, 7, 1),
    ('mobilevit_xxs 3x3', 64, 64, 64, 3, 1),
    ('mobilevit_xxs 3x3/2', 128, 32, 32, 3, 2),
    ('efficientvit_b0 5x5 (aggregation)', 28, 96, 96, 5, 1),
    ('efficientformerv2_s0 3x3', 14, 176, 176, 3, 1),
]
POINTWISE = [
    ('fastvit_t8 ConvFFN fc1', 64, 48, 144),
    ('fastvit_t8 ConvFFN fc2', 64, 144, 48),
    ('mobilevit_xxs expand', 64, 64, 128),
    ('efficientformerv2_s0 mlp', 14, 176, 704),
]


def _time(fn: Callable[..., Any], args: tuple) -> Callable[[], float]:
  compiled = jax.jit(fn)
  jax.block_until_ready(compiled(*args))

  def once() -> float:
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t
  return once


def _race(a: Callable[[], float], b: Callable[[], float]) -> tuple[float, float]:
  times: tuple[list[float], list[float]] = ([], [])
  for _ in range(FLAGS.rounds):
    for fn, out in ((a, times[0]), (b, times[1])):
      out.extend(fn() for _ in range(FLAGS.iters))
  return statistics.median(times[0]), statistics.median(times[1])


def _with_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
  return jax.grad(lambda x, w: jnp.sum(jnp.square(fn(x, w))), argnums=(0, 1))


def _row(label: str, macs: float, library: Callable[..., Any], ours: Callable[..., Any], args: tuple) -> None:
  variants = [('forward', library, ours)]
  if FLAGS.grad:
    variants.append(('gradient', _with_grad(library), _with_grad(ours)))
  for mode, lib_fn, our_fn in variants:
    t_lib, t_ours = _race(_time(lib_fn, args), _time(our_fn, args))
    gmacs = lambda t: f'{macs / t / 1e9:6.2f}' if macs else '     -'
    print(f'{label:45s} {mode:8s} | {t_lib * 1e3:8.3f} | {gmacs(t_lib)} | {t_ours * 1e3:8.3f} | {gmacs(t_ours)} | '
          f'{t_lib / t_ours:6.1f}x', flush=True)


def main(argv: list[str]) -> None:
  del argv
  rng = np.random.default_rng(0)
  load_before = os.getloadavg()
  print(f'jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs; batch 1, float32; '
        f'{FLAGS.rounds} rounds x {FLAGS.iters} calls, medians')
  print(f'{"op":45s} {"mode":8s} | lib ms   | GMAC/s | ours ms  | GMAC/s | lib/ours')
  for label, side, cin, cout, k, s in DEPTHWISE:
    x = jnp.asarray(rng.standard_normal((1, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, 1, cout)), jnp.float32)
    pad = ((k // 2, k // 2),) * 2
    library = lambda x, w, s=s, pad=pad, c=cin: lax.conv_general_dilated(
        x, w, (s, s), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c)
    ours = lambda x, w, s=s, pad=pad: conv.shifted_depthwise_conv(x, w, (s, s), pad, (1, 1))
    out_side = (side + 2 * (k // 2) - k) // s + 1
    _row(label, out_side ** 2 * cout * k * k, library, ours, (x, w))
  for label, side, cin, cout in POINTWISE:
    x = jnp.asarray(rng.standard_normal((1, side, side, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1, 1, cin, cout)), jnp.float32)
    library = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    _row(label, side * side * cin * cout, library, conv.pointwise_conv, (x, w))
  x = jnp.asarray(rng.standard_normal((1, 128, 128, 48)) * 3, jnp.float32)
  t_lib, t_ours = _race(_time(lambda x: jax.nn.gelu(x, approximate=False), (x,)),
                        _time(lambda x: layers.gelu(x, approximate=False), (x,)))
  print(f'{"exact GELU 128x128x48 (erfc | erf)":45s} {"forward":8s} | {t_lib * 1e3:8.3f} |      - | '
        f'{t_ours * 1e3:8.3f} |      - | {t_lib / t_ours:6.1f}x')
  print(f'load average (1, 5, 15 min): before {" ".join(f"{v:.1f}" for v in load_before)}, '
        f'after {" ".join(f"{v:.1f}" for v in os.getloadavg())}')


if __name__ == '__main__':
  app.run(main)
