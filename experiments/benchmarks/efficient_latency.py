"""Batch-1 latency of our folded, JIT-compiled models against timm's in eager PyTorch, on this machine's CPU.

    PYTHONPATH=. python experiments/benchmarks/efficient_latency.py [our_model_name ...] [--rounds 15] [--iters 10]

Defaults: efficientformer_l1 and efficientvit_b0. For each model: timm's model (by the registry's timm_name, random
weights, eval mode, torch.no_grad) and ours (same random weights converted through vit_jax.convert, then folded by
vit_jax.deploy.fold_for_inference, jax.jit), both float32 at batch 1 and the registry's image size. Rounds
alternate ours / timm so that load drifts hit both alike; each round times `iters` calls (after warm-up) and the
median over rounds is reported with the load average before and after. The last line is one JSON object.
timm has no fused (re-parameterised) form of these two families, so its eager model is the only reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'parity'))


def _timed(fn, iters: int) -> float:
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def measure(name: str, rounds: int, iters: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import make_fixtures  # pylint: disable=g-import-not-at-top
  make_fixtures._import_timm()  # pylint: disable=protected-access
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from vit_jax import convert, deploy  # pylint: disable=g-import-not-at-top
  from vit_jax.models import get_model_spec  # pylint: disable=g-import-not-at-top

  spec = get_model_spec(name)
  size = spec.image_size
  tm = timm.create_model(spec.timm_name.split('.')[0], pretrained=False, num_classes=1000).eval()
  with torch.no_grad():
    make_fixtures.randomize_running_stats(tm, torch.Generator().manual_seed(0))
  variables = convert.timm_to_params(name, {k: v.numpy() for k, v in tm.state_dict().items()})
  variables = variables if 'params' in variables else {'params': variables}
  model, folded = deploy.fold_for_inference(name, variables, num_classes=1000)
  x = np.random.default_rng(0).standard_normal((1, size, size, 3)).astype(np.float32)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  apply = jax.jit(model.apply)
  folded = jax.device_put(folded)
  xj = jax.device_put(x)
  ours = lambda: apply(folded, xj).block_until_ready()

  def theirs():
    with torch.no_grad():
      tm(xt)
  with torch.no_grad():
    diff = float(np.abs(np.asarray(apply(folded, xj)) - tm(xt).numpy()).max())
  for _ in range(3):
    ours()
    theirs()
  load_before = os.getloadavg()
  t_ours, t_timm = [], []
  for _ in range(rounds):
    t_ours.append(_timed(ours, iters))
    t_timm.append(_timed(theirs, iters))
  load_after = os.getloadavg()
  ms_ours, ms_timm = 1e3 * float(np.median(t_ours)), 1e3 * float(np.median(t_timm))
  return dict(model=name, timm=spec.timm_name, image_size=size, ours_folded_jit_ms=round(ms_ours, 2),
              timm_eager_ms=round(ms_timm, 2), speedup=round(ms_timm / ms_ours, 2),
              max_logit_diff=diff, torch_threads=torch.get_num_threads(),
              load_before=[round(v, 1) for v in load_before], load_after=[round(v, 1) for v in load_after])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('models', nargs='*', default=['efficientformer_l1', 'efficientvit_b0'])
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--iters', type=int, default=10)
  args = parser.parse_args()
  results = []
  for name in args.models:
    r = measure(name, args.rounds, args.iters)
    print(f"{r['model']} ({r['timm']}, {r['image_size']} px, batch 1, float32): ours folded+jit "
          f"{r['ours_folded_jit_ms']:.2f} ms, timm eager {r['timm_eager_ms']:.2f} ms -> {r['speedup']:.2f}x; "
          f"max |logit diff| {r['max_logit_diff']:.1e}; load {r['load_before']} -> {r['load_after']}", flush=True)
    results.append(r)
  print(json.dumps(results))


if __name__ == '__main__':
  main()
