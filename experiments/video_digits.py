"""Does the moving-digits data need time? ViViT (model 1) against a frame-averaged image ViT of the same size.

Both models are 64 wide with 4 blocks of 4 heads (MLP 128) and 4x4 patches on 8 frames of 16 px (every 2nd frame of
the 16-frame clips); `vivit_pico` embeds 2-frame tubelets and attends over all 64 space-time tokens,
`vit_frames_pico` classifies each frame alone and averages the logits, so it cannot see the order of the frames:
on moving_digits (label = direction of motion) it should stay near 50% (it can tell horizontal from vertical, not
left from right), the video model well above. Same config (configs/vivit_digits.py), steps, batch and seeds for
both; trained by the one train loop (`vit_jax.train.train_and_evaluate`).

    python experiments/video_digits.py --out /tmp/video_digits [--steps 300] [--batch 32] [--seeds 0,1,2] \
        [--models vivit_pico,vit_frames_pico] [--data_dir DIR]

Prints one JSON object per run and, per model, the mean and standard deviation of the final eval accuracy.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import vivit_digits  # noqa: E402  pylint: disable=g-import-not-at-top
from vit_jax import train  # noqa: E402  pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string('out', None, 'directory holding every run\'s workdir', required=True)
_STEPS = flags.DEFINE_integer('steps', 300, 'training steps of every run', lower_bound=1)
_BATCH = flags.DEFINE_integer('batch', 32, 'global batch size of every run', lower_bound=1)
_SEEDS = flags.DEFINE_list('seeds', ['0', '1', '2'], 'comma-separated seeds')
_MODELS = flags.DEFINE_list('models', ['vivit_pico', 'vit_frames_pico'], 'registry models to compare')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir for moving_digits (prepared on first use)')


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  out = pathlib.Path(_OUT.value)
  results: dict[str, list[float]] = {m: [] for m in _MODELS.value}
  for seed in map(int, _SEEDS.value):
    for name in _MODELS.value:
      config = vivit_digits.get_config(name)
      config.seed = seed
      config.batch_size = _BATCH.value
      config.total_steps = _STEPS.value
      config.optimizer.warmup_steps = max(_STEPS.value // 10, 1)
      config.eval_every = 0
      config.checkpoint_every = _STEPS.value
      config.log_every = max(_STEPS.value // 3, 1)
      if _DATA_DIR.value:
        config.dataset.data_dir = _DATA_DIR.value
      start = time.time()
      final = train.train_and_evaluate(config, str(out / f'{name}_seed{seed}'))
      results[name].append(final['eval_accuracy'])
      print(json.dumps({'model': name, 'seed': seed, 'eval_accuracy': round(final['eval_accuracy'], 4),
                        'eval_loss': round(final['eval_loss'], 4), 'num_params': final['num_params'],
                        'steps': final['step'], 'wall_seconds': round(time.time() - start, 1)}), flush=True)
  for name, accs in results.items():
    print(json.dumps({'model': name, 'seeds': len(accs), 'mean_eval_accuracy': round(float(np.mean(accs)), 4),
                      'std_eval_accuracy': round(float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0, 4),
                      'accuracies': [round(a, 4) for a in accs]}), flush=True)


if __name__ == '__main__':
  app.run(main)
