"""Batch-1 CPU latency of our FastViT / MobileViT against timm's, measured side by side in one process.

    PYTHONPATH=. python experiments/benchmarks/latency_fastvit_mobilevit.py [--rounds 7] [--iters 10] \
        [--compile] [our_model_name ...]   (default: mobilevit_xs fastvit_t8)

For each model: ours in deploy form (vit_jax.deploy.fold_for_inference: FastViT re-parameterised into single
convs; MobileViT has nothing timm folds, so it runs as trained), float32, jax.jit-compiled, at the registry's input
size (256 px) and batch 1; timm's model (found through ModelSpec.timm_name) in eval mode, float32, eager PyTorch,
re-parameterised where timm can (timm.models.reparameterize_model), and with --compile also torch.compile'd.
Weights are random (latency does not depend on them). Rounds alternate between the implementations (each round
times `iters` calls after the warm-up); the per-call median over rounds is reported, with the load average before
and after, since a loaded machine skews both sides.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np


def _time(fn, iters: int) -> float:
  """Seconds per call of `fn` averaged over `iters` calls."""
  t0 = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - t0) / iters


def _ours(name: str):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax import deploy  # pylint: disable=g-import-not-at-top
  from vit_jax.models import create_model, get_model_spec  # pylint: disable=g-import-not-at-top
  size = get_model_spec(name).image_size
  model = create_model(name, num_classes=1000)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, size, size, 3)), jnp.float32)
  # Random variables of the model's shapes (no compiled init: slow on a small CPU); positive BatchNorm variances.
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, s: jnp.asarray(np.abs(rng.normal(size=s.shape)) + 0.5 if 'var' in jax.tree_util.keystr(path)
                                  else 0.05 * rng.normal(size=s.shape), s.dtype), shapes)
  folded_model, folded = deploy.fold_for_inference(name, variables, num_classes=1000)
  apply = jax.jit(lambda v, x: folded_model.apply(v, x, train=False))
  apply(folded, x).block_until_ready()
  return lambda: apply(folded, x).block_until_ready(), size


def _timm(name: str, size: int, compile_: bool):
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from vit_jax.models import get_model_spec  # pylint: disable=g-import-not-at-top
  model = timm.create_model(get_model_spec(name).timm_name.split('.')[0], pretrained=False).eval()
  model = timm.models.reparameterize_model(model)
  if compile_:
    model = torch.compile(model)
  x = torch.randn(1, 3, size, size)

  def run():
    with torch.inference_mode():
      model(x)
  run()
  run()
  return run


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('models', nargs='*', default=['mobilevit_xs', 'fastvit_t8'])
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--iters', type=int, default=10)
  parser.add_argument('--compile', action='store_true', help='also time timm under torch.compile')
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  print(f'load average before: {os.getloadavg()}, cpus {os.cpu_count()}, torch threads {torch.get_num_threads()}')
  for name in args.models:
    ours, size = _ours(name)
    sides = {'ours (jit, folded)': ours, 'timm eager': _timm(name, size, False)}
    if args.compile:
      sides['timm torch.compile'] = _timm(name, size, True)
    times = {k: [] for k in sides}
    for _ in range(args.rounds):
      for label, fn in sides.items():  # Alternating rounds.
        times[label].append(_time(fn, args.iters))
    med = {k: statistics.median(v) for k, v in times.items()}
    line = ', '.join(f'{k} {1e3 * v:.2f} ms' for k, v in med.items())
    print(f'{name} batch 1, {size} px, float32: {line}; timm eager / ours = '
          f'{med["timm eager"] / med["ours (jit, folded)"]:.2f}x', flush=True)
  print(f'load average after: {os.getloadavg()}')


if __name__ == '__main__':
  main()
