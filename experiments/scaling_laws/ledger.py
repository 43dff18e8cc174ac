"""The study ledger: one row per evaluated (final, cooled-down) checkpoint, as DIR/ledger.csv.

Each finished run stores its row as DIR/runs/NAME/ledger_row.json; the CSV is rebuilt from those files, so it can
always be regenerated and concurrent cluster jobs never write the same file.

Columns: the model shape and parameter count; `macs_per_image` and `train_flops` (analytic, vit_jax.flops: 6 x
forward MACs per training image, times the examples seen over the whole length, trunk part included) and
`run_flops` (what this run itself trained: a branch only its cooldown); `examples_seen` = steps x batch;
`wall_seconds` (this run's training wall time over all its attempts, plus for a branch the trunk's wall time pro
rata to the branch step) and `device_hours` (wall time x devices); the final train loss, eval loss and eval error;
and `fewshot_{k}shot_error` for each k in study.fewshot.shots.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Any

import ml_collections
from etils import epath

from vit_jax import flops, input_pipeline, train

from experiments.scaling_laws import fewshot, study as study_lib

ROW_FILENAME = 'ledger_row.json'
TIMING_FILENAME = 'sweep_timing.json'
LEDGER_FILENAME = 'ledger.csv'
SHAPE_FIELDS = ('patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim')
BASE_COLUMNS = (
    'run', 'trunk', 'branch_step', *SHAPE_FIELDS, 'num_params', 'image_size', 'batch_size', 'steps',
    'cooldown_steps', 'train_examples', 'examples_seen', 'macs_per_image', 'train_flops', 'run_flops',
    'wall_seconds', 'devices', 'device_hours', 'train_loss', 'eval_loss', 'eval_error')


def fewshot_column(shots: int) -> str:
  return f'fewshot_{shots}shot_error'


def columns(study: ml_collections.ConfigDict) -> list[str]:
  return list(BASE_COLUMNS) + [fewshot_column(k) for k in study.fewshot.shots]


def record_wall_time(run_dir: epath.Path, seconds: float, devices: int) -> None:
  """Adds one training attempt's wall time to the run's timing file."""
  path = run_dir / TIMING_FILENAME
  timing = json.loads(path.read_text()) if path.exists() else {'wall_seconds': 0.0, 'attempts': 0}
  timing['wall_seconds'] += seconds
  timing['attempts'] += 1
  timing['devices'] = devices
  path.write_text(json.dumps(timing, indent=2))


def _timing(run_dir: epath.Path) -> dict[str, Any]:
  path = run_dir / TIMING_FILENAME
  return json.loads(path.read_text()) if path.exists() else {'wall_seconds': float('nan'), 'devices': 1}


def vit_shape(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
  """The run's ViT shape (registry defaults with the config's overrides) and MACs per image."""
  model = train.build_model(config, num_classes)
  missing = [f for f in SHAPE_FIELDS if not hasattr(model, f)]
  if missing or getattr(model, 'resnet', None) is not None:
    raise ValueError(f'Scaling studies need a plain ViT (model {config.model.name!r} lacks {missing} or has a '
                     'ResNet stem), because the analytic FLOPs come from vit_jax.flops.vit_forward_macs.')
  shape = {f: int(getattr(model, f)) for f in SHAPE_FIELDS}
  macs = flops.vit_forward_macs(image_size=config.dataset.image_size, patch_size=shape['patch_size'],
                                hidden_size=shape['hidden_size'], num_layers=shape['num_layers'],
                                mlp_dim=shape['mlp_dim'], num_classes=num_classes,
                                has_cls=getattr(model, 'classifier', 'token') == 'token')
  return {**shape, 'macs_per_image': macs}


def make_row(run: study_lib.Run, study: ml_collections.ConfigDict, root: epath.Path,
             final: dict[str, Any]) -> dict[str, Any]:
  """The ledger row of a finished run (runs the few-shot probe on its final checkpoint)."""
  config = run.config
  run_dir = root / study_lib.RUNS_DIRNAME / run.name
  info = input_pipeline.get_dataset_info(config.dataset)
  shape = vit_shape(config, info.num_classes)
  per_image = flops.train_flops(shape['macs_per_image'])
  timing = _timing(run_dir)
  wall = timing['wall_seconds']
  if run.trunk:
    trunk = _timing(root / study_lib.RUNS_DIRNAME / run.trunk)
    trunk_steps = json.loads((root / study_lib.RUNS_DIRNAME / run.trunk / 'config.json').read_text())['total_steps']
    wall += trunk['wall_seconds'] * run.branch_step / trunk_steps
  examples_seen = run.steps * config.batch_size
  errors = fewshot.probe_run(config, str(run_dir), train_split=study.base.dataset.train_split,
                             shots=study.fewshot.shots, l2_reg=study.fewshot.l2_reg, seeds=study.fewshot.seeds)
  row = {
      'run': run.name, 'trunk': run.trunk or '', 'branch_step': run.branch_step, **shape,
      'num_params': int(final['num_params']), 'image_size': config.dataset.image_size,
      'batch_size': config.batch_size, 'steps': run.steps, 'cooldown_steps': config.optimizer.cooldown_steps,
      'train_examples': info.num_train_examples, 'examples_seen': examples_seen,
      'train_flops': per_image * examples_seen,
      'run_flops': per_image * (run.steps - run.branch_step) * config.batch_size,
      'wall_seconds': round(wall, 2), 'devices': timing['devices'],
      'device_hours': wall * timing['devices'] / 3600.0,
      'train_loss': final['train_loss'], 'eval_loss': final['eval_loss'], 'eval_error': 1.0 - final['eval_accuracy'],
  }
  row.update({fewshot_column(k): v for k, v in errors.items()})
  return row


def write_row(run_dir: epath.Path, row: dict[str, Any]) -> None:
  (run_dir / ROW_FILENAME).write_text(json.dumps(row, indent=2))


def read_row(run_dir: epath.Path) -> dict[str, Any] | None:
  path = run_dir / ROW_FILENAME
  return json.loads(path.read_text()) if path.exists() else None


def write_ledger(root: epath.Path, runs: list[study_lib.Run], study: ml_collections.ConfigDict) -> tuple[str, int]:
  """Rebuilds DIR/ledger.csv from the rows of the finished runs of `runs` (atomically); returns (path, rows)."""
  rows = [r for r in (read_row(root / study_lib.RUNS_DIRNAME / run.name) for run in runs) if r is not None]
  path = root / LEDGER_FILENAME
  tmp = root / f'.{LEDGER_FILENAME}.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns(study), extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)
  return str(path), len(rows)
