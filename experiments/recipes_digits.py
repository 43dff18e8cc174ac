"""Two small studies on the offline digits data, for issue 6 (fine-tuning and DeiT distillation).

1. Fine-tuning across resolution: the default job (ViT-pico, 16 px) is trained once; its checkpoint then
   initialises a run at 24 px with a freshly initialised head (position embeddings interpolated 4x4 -> 6x6), which
   is compared with the same model trained from scratch at 24 px for the same number of steps and seed.
2. Distillation: that 16 px ViT-pico (64 wide, 4 layers) is the teacher of a smaller distilled DeiT student
   (32 wide, 2 layers, distillation token), trained with hard and with soft distillation, and without a teacher
   (both heads on the labels), all for the same steps and seed.

    python experiments/recipes_digits.py --out /tmp/issue6_study [--steps 300] [--seeds 0,1] \
        [--pretrained WORKDIR_OF_DEFAULT_JOB] [--only finetune,distill]

Prints one JSON object per run and a summary; all workdirs are kept under --out.
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top
from vit_jax import train  # noqa: E402  pylint: disable=g-import-not-at-top

_OUT = flags.DEFINE_string('out', None, 'directory holding every run\'s workdir', required=True)
_STEPS = flags.DEFINE_integer('steps', 300, 'steps of every compared run', lower_bound=1)
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'comma-separated seeds of the compared runs')
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir of the digits dataset')
_PRETRAINED = flags.DEFINE_string('pretrained', None, 'workdir of a finished default job to reuse as checkpoint and '
                                  'teacher (default: train it under --out)')
_ONLY = flags.DEFINE_list('only', ['finetune', 'distill'], 'which studies to run')


def run(config, workdir: pathlib.Path, tag: str) -> dict:
  final = train.train_and_evaluate(config, str(workdir))
  row = {'run': tag, 'eval_accuracy': round(final['eval_accuracy'], 4), 'eval_loss': round(final['eval_loss'], 4),
         'steps': final['step'], 'seed': config.seed, 'train_seconds': final['train_seconds']}
  print(json.dumps(row), flush=True)
  return row


def short(config, steps: int, seed: int):
  config.total_steps = steps
  config.seed = seed
  config.optimizer.warmup_steps = min(config.optimizer.warmup_steps, steps // 5)
  config.eval_every = 0
  config.checkpoint_every = steps
  config.log_every = max(steps // 4, 1)
  return config


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  out = pathlib.Path(_OUT.value)
  rows = []

  base = default.get_config()  # ViT-pico (64 wide, 4 layers), patch 4 at 16 px, 800 steps.
  base.dataset.data_dir = _DATA_DIR.value
  if _PRETRAINED.value:  # Reused as it is (its config may predate fields added since).
    teacher_dir = pathlib.Path(_PRETRAINED.value)
    final = json.loads((teacher_dir / 'final_metrics.json').read_text())
    rows.append({'run': 'pretrain_16px', 'eval_accuracy': round(final['eval_accuracy'], 4), 'reused': str(teacher_dir)})
    print(json.dumps(rows[-1]), flush=True)
  else:
    teacher_dir = out / 'pretrain_16px'
    rows.append(run(base, teacher_dir, 'pretrain_16px'))
  studies = _ONLY.value

  for seed in map(int, _SEEDS.value):
    for tag, init in (('scratch_24px', None), ('finetune_24px_from_16px', str(teacher_dir))):
      if 'finetune' not in studies:
        break
      c = short(default.get_config(), _STEPS.value, seed)
      c.dataset.data_dir = _DATA_DIR.value
      c.dataset.image_size = 24
      c.dataset.crop_padding = 3
      if init:
        c.init_from = init
        c.init_reinit_head = True
      rows.append(run(c, out / f'{tag}_s{seed}', tag))

    for tag, kind in (('student_no_distill', 'none'), ('student_hard_distill', 'hard'),
                      ('student_soft_distill', 'soft')):
      if 'distill' not in studies:
        break
      c = short(default.get_config(), _STEPS.value, seed)
      c.dataset.data_dir = _DATA_DIR.value
      c.model.name = 'deit_ti16_distilled'
      c.model.update(patch_size=4, hidden_size=32, mlp_dim=64, num_layers=2, num_heads=2, drop_path_rate=0.0)
      c.distill.type = kind
      if kind != 'none':
        c.distill.init_from = str(teacher_dir)
        c.distill.model.name = 'vit_pico'
        c.distill.model.patch_size = 4
      rows.append(run(c, out / f'{tag}_s{seed}', tag))
  print('SUMMARY', json.dumps(rows))


if __name__ == '__main__':
  app.run(main)
