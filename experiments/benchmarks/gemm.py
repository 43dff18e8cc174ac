"""The matrix products of a ViT-S/16 train step, timed alone: XLA:CPU (with and without YNNPACK) against PyTorch.

  python experiments/benchmarks/gemm.py [--rounds 5 --iters 5] [--batch_size 8]

A ViT-S/16 train step on CPU spends about three quarters of its time in dots (`profile_cpu --mode train`). This
script asks whether the gap to timm in training is the model code or the matrix library: it times each linear
layer's three products (forward x W, input gradient dY W^T, weight gradient X^T dY) at the step's shapes
(batch x 197 tokens), as one jitted `jnp.dot` per product:
- `xla`: XLA:CPU's default (YNNPACK dots);
- `xla_no_ynn`: the same program compiled with YNNPACK fusions off (`compile_options.inference()`'s option: XLA's
  own dot emitter / Eigen);
- `torch`: `torch.mm` on the same arrays (oneDNN / MKL), with as many threads as cores, when torch is installed.
Variants alternate within each round (medians). Prints ms, GFLOP/s and each variant's time over torch's, with the
load average before and after; measure on an idle machine.
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Optional

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import compile_options

FLAGS = flags.FLAGS
flags.DEFINE_integer('rounds', 5, 'Alternating rounds.')
flags.DEFINE_integer('iters', 5, 'Timed calls per variant per round.')
flags.DEFINE_integer('batch_size', 8, 'Images per step; the products have batch_size * 197 rows.')

# (layer, input width, output width) of one ViT-S/16 block; q, k and v are three products of the same shape.
LAYERS = [('mlp fc1', 384, 1536), ('mlp fc2', 1536, 384), ('attn q/k/v (each)', 384, 384),
          ('attn out', 384, 384)]
TOKENS = 197


def products(rows: int, d_in: int, d_out: int) -> list[tuple[str, tuple[int, int], tuple[int, int], bool]]:
  """(name, lhs shape, rhs shape, lhs transposed) for forward, input gradient and weight gradient."""
  return [('forward  X W', (rows, d_in), (d_in, d_out), False),
          ('dgrad  dY W^T', (rows, d_out), (d_out, d_in), False),
          ('wgrad  X^T dY', (rows, d_in), (rows, d_out), True)]


def _xla(lhs: np.ndarray, rhs: np.ndarray, transposed: bool, options: Optional[dict]) -> Callable[[], float]:
  fn = (lambda a, b: jnp.dot(a.T, b)) if transposed else jnp.dot
  compiled = jax.jit(fn, compiler_options=options)
  a, b = jnp.asarray(lhs), jnp.asarray(rhs)
  jax.block_until_ready(compiled(a, b))

  def once() -> float:
    t = time.perf_counter()
    jax.block_until_ready(compiled(a, b))
    return time.perf_counter() - t
  return once


def _torch(lhs: np.ndarray, rhs: np.ndarray, transposed: bool) -> Optional[Callable[[], float]]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  a, b = torch.from_numpy(lhs), torch.from_numpy(rhs)
  a = a.t() if transposed else a
  torch.mm(a, b)

  def once() -> float:
    t = time.perf_counter()
    torch.mm(a, b)
    return time.perf_counter() - t
  return once


def main(argv: list[str]) -> None:
  del argv
  rng = np.random.default_rng(0)
  rows = FLAGS.batch_size * TOKENS
  load_before = os.getloadavg()
  no_ynn = {compile_options.YNN_FUSION_FLAG: ''}
  print(f'jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs; float32, {rows} rows '
        f'(batch {FLAGS.batch_size} x {TOKENS} tokens); {FLAGS.rounds} rounds x {FLAGS.iters} calls, medians')
  header = f'{"layer":20} {"product":15} {"xla ms":>8} {"no-ynn ms":>9} {"torch ms":>8} {"xla GF/s":>8} ' \
           f'{"no-ynn GF/s":>11} {"torch GF/s":>10} {"xla/torch":>9} {"no-ynn/torch":>12}'
  print(header)
  totals = {'xla': 0.0, 'xla_no_ynn': 0.0, 'torch': 0.0}
  for layer, d_in, d_out in LAYERS:
    for name, lhs_shape, rhs_shape, transposed in products(rows, d_in, d_out):
      lhs = rng.standard_normal(lhs_shape, dtype=np.float32)
      rhs = rng.standard_normal(rhs_shape, dtype=np.float32)
      variants = {'xla': _xla(lhs, rhs, transposed, None), 'xla_no_ynn': _xla(lhs, rhs, transposed, no_ynn)}
      theirs = _torch(lhs, rhs, transposed)
      if theirs is not None:
        variants['torch'] = theirs
      times: dict[str, list[float]] = {k: [] for k in variants}
      for _ in range(FLAGS.rounds):
        for key, once in variants.items():
          times[key].extend(once() for _ in range(FLAGS.iters))
      med = {k: statistics.median(v) for k, v in times.items()}
      for k, v in med.items():
        totals[k] += v
      flop = 2.0 * rows * d_in * d_out
      gfs = {k: flop / v / 1e9 for k, v in med.items()}
      torch_s = med.get('torch')
      ratio = lambda k: f'{med[k] / torch_s:.2f}x' if torch_s else '-'
      print(f'{layer:20} {name:15} {med["xla"] * 1e3:8.2f} {med["xla_no_ynn"] * 1e3:9.2f} '
            f'{(torch_s or float("nan")) * 1e3:8.2f} {gfs["xla"]:8.1f} {gfs["xla_no_ynn"]:11.1f} '
            f'{gfs.get("torch", float("nan")):10.1f} {ratio("xla"):>9} {ratio("xla_no_ynn"):>12}')
  if totals['torch']:
    print(f'one block\'s products (q/k/v counted once): xla {totals["xla"] * 1e3:.1f} ms, no-ynn '
          f'{totals["xla_no_ynn"] * 1e3:.1f} ms, torch {totals["torch"] * 1e3:.1f} ms; xla / torch '
          f'{totals["xla"] / totals["torch"]:.2f}x, no-ynn / torch {totals["xla_no_ynn"] / totals["torch"]:.2f}x')
  print('load average (1, 5, 15 min): before {:.1f} {:.1f} {:.1f}, after {:.1f} {:.1f} {:.1f}'.format(
      *load_before, *os.getloadavg()))


if __name__ == '__main__':
  app.run(main)
