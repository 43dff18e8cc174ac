"""Our model against timm's model of the same size, side by side in one process on the same machine.

  python experiments/benchmarks/compare.py --model vit_s16 --batch_size 8 --image_size 224 --rounds 5

Train step (AdamW update, cross-entropy) and inference are timed for both frameworks in alternating rounds
(ours, timm, ours, timm, ...), so background load on a shared machine hits both alike; each prints the median step
time over all rounds, images/s and the ratio ours/timm (> 1: we are faster). timm runs in eager PyTorch, float32,
on the CPU with torch's default thread count. Without torch/timm only our numbers are printed. The last line is one
JSON object. timm needs torchvision; `--preimport MODULE` imports a module first (e.g. a torchvision stub).
"""
from __future__ import annotations

import importlib
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import app, flags

from vit_jax import benchmark, models


def _timm_steps(timm_name: str, *, batch_size: int, image_size: int, num_classes: int,
                preimport: list[str]) -> Optional[dict[str, Callable[[], Any]]]:
  """{'train': step, 'infer': step} for timm's model in eager PyTorch, or None when torch/timm are missing."""
  try:
    for module in preimport:
      importlib.import_module(module)
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'timm comparison skipped: {e}', flush=True)
    return None
  torch.manual_seed(0)
  model = timm.create_model(timm_name.split('.')[0], pretrained=False, num_classes=num_classes,
                            img_size=image_size)
  images = torch.randn(batch_size, 3, image_size, image_size)
  labels = torch.arange(batch_size) % num_classes
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

  def train():
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    opt.step()
    return loss.item()

  def infer():
    model.eval()
    with torch.inference_mode():
      return model(images).sum().item()
  print(f'timm {timm.__version__} / torch {torch.__version__}, {torch.get_num_threads()} threads', flush=True)
  return {'train': train, 'infer': infer}


def _time(step: Callable[[], Any], n: int) -> list[float]:
  times = []
  for _ in range(n):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return times


def compare(*, model_name: str, batch_size: int, image_size: int, rounds: int, steps_per_round: int,
            num_classes: int = 1000, preimport: tuple[str, ...] = ()) -> dict[str, Any]:
  """Alternating timing rounds of ours and timm's train and inference steps; medians and ratios per mode."""
  spec = models.get_model_spec(model_name)
  ours = {mode: benchmark.build_step(model_name=model_name, batch_size=batch_size, image_size=image_size,
                                     mode=mode, num_classes=num_classes)[0] for mode in ('train', 'infer')}
  theirs = None
  if spec.timm_name:
    theirs = _timm_steps(spec.timm_name, batch_size=batch_size, image_size=image_size, num_classes=num_classes,
                         preimport=list(preimport))
  else:
    print(f'{model_name} has no timm counterpart in the registry; timing ours only.', flush=True)
  load_before = os.getloadavg()
  times: dict[str, dict[str, list[float]]] = {'ours': {'train': [], 'infer': []}, 'timm': {'train': [], 'infer': []}}
  for mode in ('train', 'infer'):  # Warm-up: compilation and first-call allocations, untimed.
    _time(ours[mode], 2)
    if theirs:
      _time(theirs[mode], 2)
  for r in range(rounds):
    for mode in ('train', 'infer'):
      times['ours'][mode] += _time(ours[mode], steps_per_round)
      if theirs:
        times['timm'][mode] += _time(theirs[mode], steps_per_round)
    print(f'round {r + 1}/{rounds} done, load average {os.getloadavg()[0]:.2f}', flush=True)
  result: dict[str, Any] = dict(model=model_name, timm_model=spec.timm_name if theirs else None,
                                batch_size=batch_size, image_size=image_size, dtype='float32',
                                cpu_count=os.cpu_count(), jax_devices=jax.device_count(),
                                load_average_before=[round(x, 2) for x in load_before],
                                load_average_after=[round(x, 2) for x in os.getloadavg()],
                                steps_timed_per_mode=rounds * steps_per_round)
  for mode in ('train', 'infer'):
    ours_ms = 1e3 * float(np.median(times['ours'][mode]))
    result[f'{mode}_ms_ours'] = round(ours_ms, 2)
    result[f'{mode}_img_per_s_ours'] = round(batch_size / ours_ms * 1e3, 2)
    if theirs:
      timm_ms = 1e3 * float(np.median(times['timm'][mode]))
      result[f'{mode}_ms_timm'] = round(timm_ms, 2)
      result[f'{mode}_img_per_s_timm'] = round(batch_size / timm_ms * 1e3, 2)
      result[f'{mode}_ratio'] = round(timm_ms / ours_ms, 3)  # Throughput ours / timm.
  return result


_MODEL = flags.DEFINE_string('model', 'vit_s16', 'registered model name (with a timm_name)')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 8, 'images per step', lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer('image_size', 224, 'input resolution', lower_bound=1)
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'alternating rounds (ours then timm, per mode)', lower_bound=1)
_STEPS_PER_ROUND = flags.DEFINE_integer('steps_per_round', 2, 'timed steps per round', lower_bound=1)
_NUM_CLASSES = flags.DEFINE_integer('num_classes', 1000, 'classifier outputs', lower_bound=0)
_PREIMPORT = flags.DEFINE_multi_string('preimport', [], 'module imported before timm (repeatable), e.g. a '
                                       'torchvision stub on sys.path')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  result = compare(model_name=_MODEL.value, batch_size=_BATCH_SIZE.value, image_size=_IMAGE_SIZE.value,
                   rounds=_ROUNDS.value, steps_per_round=_STEPS_PER_ROUND.value, num_classes=_NUM_CLASSES.value,
                   preimport=tuple(_PREIMPORT.value))
  for mode in ('train', 'infer'):
    line = f'{mode}: ours {result[f"{mode}_img_per_s_ours"]} img/s ({result[f"{mode}_ms_ours"]} ms/step)'
    if f'{mode}_ratio' in result:
      line += (f', timm {result[f"{mode}_img_per_s_timm"]} img/s ({result[f"{mode}_ms_timm"]} ms/step), '
               f'ratio ours/timm {result[f"{mode}_ratio"]}x')
    print(line, flush=True)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  app.run(main)
