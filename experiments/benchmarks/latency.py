"""Batch-1 inference latency on the CPU: our folded, JIT-compiled model against timm's, in one run.

  python experiments/benchmarks/latency.py --models levit_128s,efficientvit_m0 [--rounds 5 --iters 10]

For every registry name: our model in deploy form (`vit_jax.deploy.fold_for_inference`: BatchNorm folded, branches
merged; random weights, float32) under `jax.jit`, against timm's model of the same registry spec (`ModelSpec.timm_name`,
random weights, eval mode, float32) in eager PyTorch - the fused / re-parameterised version
(`timm.models.reparameterize_model`) where timm has one, i.e. where it changes the model - and the same timm model
under `torch.compile` (`--compile`). One image at the registry's image size (224 px; 256 for MobileViT).

Rounds alternate (ours, timm eager, timm compiled, ours, ...) so that background load on a shared machine hits all
alike; each round times `--iters` calls; the table gives each one's median over all calls, the ratios timm / ours
(> 1: we are faster), parameters and GMACs of the folded model, and the load average before and after. The last line
is one JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable, Optional

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import compile_options, deploy, flops, models

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['levit_128s', 'efficientvit_m0'], 'Registry model names (comma-separated).')
flags.DEFINE_integer('rounds', 5, 'Alternating rounds.')
flags.DEFINE_integer('iters', 10, 'Timed calls per variant per round.')
flags.DEFINE_bool('compile', True, 'Also time timm under torch.compile.')
flags.DEFINE_integer('torch_threads', 0, 'torch.set_num_threads (0: torch\'s default). On a loaded machine 1 avoids '
                     'OpenMP threads spinning against the load.')

Step = Callable[[], Any]


def our_step(name: str) -> tuple[Step, dict[str, Any]]:
  """A batch-1 call of our folded, jitted model `name`, and its facts (image size, params, GMACs)."""
  spec = models.get_model_spec(name)
  size = spec.image_size
  model = models.create_model(name, num_classes=1000)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, size, size, 3)), jnp.float32)
  # Random weights from the abstract shapes (compiling model.init at full size costs minutes on a loaded CPU):
  # params N(0, 0.02^2), running means 0 and variances 1.
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  rng = np.random.default_rng(0)
  def fill(path, s):
    leaf = getattr(path[-1], 'key', None)
    if path[0].key == 'batch_stats':
      return jnp.full(s.shape, 1.0 if leaf == 'var' else 0.0, s.dtype)
    return jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype)
  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  folded_model, folded = deploy.fold_for_inference(name, variables, num_classes=1000)
  forward = compile_options.jit_inference(lambda v, x: folded_model.apply(v, x, train=False))
  forward(folded, x).block_until_ready()  # Compile outside the timed calls.
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(folded['params']))
  fl, how = flops.model_forward_flops(folded_model, size, family=spec.family)
  info = dict(image_size=size, params=count, gmacs=fl / 2e9, gmacs_method=how, timm_name=spec.timm_name)
  return lambda: forward(folded, x).block_until_ready(), info


def timm_steps(timm_name: Optional[str], size: int, compile_too: bool) -> tuple[dict[str, Step], dict[str, Any]]:
  """{'timm': eager call, 'timm_compile': torch.compile'd call} for timm's model (fused where timm can fuse it)."""
  if not timm_name:
    return {}, dict(timm='no timm_name in the registry spec')
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = timm.create_model(timm_name.split('.')[0], pretrained=False, num_classes=1000).eval()
  count = lambda m: sum(p.numel() for p in m.parameters())
  fused = timm.models.reparameterize_model(model)
  info = dict(timm_params=count(model), timm_fused_params=count(fused))
  fused_differs = info['timm_fused_params'] != info['timm_params'] or repr(fused) != repr(model)
  model = fused if fused_differs else model
  info['timm_variant'] = 'fused' if fused_differs else 'as built (nothing to fuse)'
  x = torch.randn(1, 3, size, size)

  def call(m):
    def step():
      with torch.inference_mode():
        return m(x)
    return step
  steps = {'timm': call(model)}
  if compile_too:
    try:
      compiled = torch.compile(model)
      for _ in range(3):  # Compile (and re-compile for inference mode) outside the timed calls.
        call(compiled)()
      steps['timm_compile'] = call(compiled)
    except Exception as e:  # pylint: disable=broad-except
      info['timm_compile'] = f'failed: {type(e).__name__}: {str(e)[:200]}'
  return steps, info


def run_rounds(steps: dict[str, Step], rounds: int, iters: int) -> dict[str, float]:
  """Median seconds per call of each step, over `rounds` alternating rounds of `iters` calls."""
  times: dict[str, list[float]] = {k: [] for k in steps}
  for step in steps.values():
    step()  # Warm caches once.
  for _ in range(rounds):
    for key, step in steps.items():
      for _ in range(iters):
        t = time.perf_counter()
        step()
        times[key].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


def _ms(seconds: Optional[float]) -> str:
  return '-' if seconds is None else f'{1e3 * seconds:.2f}'


def _ratio(a: Optional[float], b: Optional[float]) -> str:
  return '-' if a is None or b is None else f'{a / b:.2f}x'


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.torch_threads:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(FLAGS.torch_threads)
  load_before = os.getloadavg()
  rows = []
  for name in FLAGS.models:
    ours, info = our_step(name)
    theirs, tinfo = timm_steps(info['timm_name'], info['image_size'], FLAGS.compile)
    med = run_rounds({'ours': ours, **theirs}, FLAGS.rounds, FLAGS.iters)
    rows.append(dict(model=name, **info, **tinfo, **{f'{k}_s': v for k, v in med.items()}))
    print(f'{name}: ' + ', '.join(f'{k} {_ms(v)} ms' for k, v in med.items()), flush=True)
  load_after = os.getloadavg()
  import torch  # pylint: disable=g-import-not-at-top
  print(f'\njax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), {os.cpu_count()} CPUs; batch 1, float32; {FLAGS.rounds} rounds x '
        f'{FLAGS.iters} calls, medians')
  print(f'load average (1, 5, 15 min): before {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, '
        f'after {load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f}')
  header = ('model', 'px', 'params', 'GMACs', 'ours ms', 'timm ms', 'timm variant', 'compiled ms', 'timm/ours',
            'compiled/ours')
  table = [header]
  for r in rows:
    table.append((r['model'], str(r['image_size']), f"{r['params'] / 1e6:.2f}M", f"{r['gmacs']:.3f}",
                  _ms(r.get('ours_s')), _ms(r.get('timm_s')), r.get('timm_variant', '-'), _ms(r.get('timm_compile_s')),
                  _ratio(r.get('timm_s'), r.get('ours_s')), _ratio(r.get('timm_compile_s'), r.get('ours_s'))))
  widths = [max(len(row[i]) for row in table) for i in range(len(header))]
  for row in table:
    print(' | '.join(c.ljust(w) for c, w in zip(row, widths)))
  result = dict(rows=rows, load_before=load_before, load_after=load_after, rounds=FLAGS.rounds, iters=FLAGS.iters)
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
