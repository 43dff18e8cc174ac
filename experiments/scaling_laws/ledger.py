"""The study ledger: one row per evaluated (final, cooled-down) checkpoint, as DIR/ledger.csv.

Each finished run stores its row as DIR/runs/NAME/ledger_row.json; the CSV is rebuilt from those files, so it can
always be regenerated and concurrent cluster jobs never write the same file.

Columns: for a star study (study.grid='star'), `star_dim`, the dimension the run's shape varies ('centre' for the
centre; empty for a full grid); the model shape and parameter count; `macs_per_image` and `train_flops`
(vit_jax.flops: analytic for plain ViTs, XLA's count otherwise, as `flops_method` says; 6 x forward MACs per
training image, times the examples seen over the whole length, trunk part included) and `run_flops` (what this run
itself trained: a branch only its cooldown); `examples_seen` = steps x batch; `wall_seconds` (this run's training
wall time over all its attempts, plus for a branch the trunk's wall time pro rata to the branch step) and
`device_hours` (each part's wall time x its own devices); the final train loss, eval loss and eval error; and
`fewshot_{k}shot_error` for each k in study.fewshot.shots (the row also stores the probe's settings, so a changed
study.fewshot recomputes the probe).
"""
from __future__ import annotations

import csv
import json
import os
import re
from typing import Any

import ml_collections
from absl import logging
from etils import epath

from vit_jax import checkpoint, flops, input_pipeline, train

from experiments.scaling_laws import fewshot, study as study_lib

ROW_FILENAME = 'ledger_row.json'
PROBE_KEY = 'fewshot_settings'
TIMING_FILENAME = 'sweep_timing.json'
LEDGER_FILENAME = 'ledger.csv'
SHAPE_FIELDS = ('patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim')
BASE_COLUMNS = (
    'run', 'trunk', 'branch_step', 'star_dim', *SHAPE_FIELDS, 'num_params', 'flops_method', 'image_size',
    'batch_size', 'steps', 'cooldown_steps', 'train_examples', 'examples_seen', 'macs_per_image', 'train_flops',
    'run_flops', 'wall_seconds', 'devices', 'device_hours', 'train_loss', 'eval_loss', 'eval_error')


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
  """The run's timing file; NaN wall time (logged) when the run was not trained by the sweep."""
  path = run_dir / TIMING_FILENAME
  if path.exists():
    return json.loads(path.read_text())
  logging.warning('%s is missing (the run was not trained by this sweep): its wall time and device-hours are NaN.',
                  path)
  return {'wall_seconds': float('nan'), 'devices': 0}


def cost(root: epath.Path, run: study_lib.Run) -> dict[str, Any]:
  """Wall time and device-hours of a run; a branch adds its trunk's share (at the trunk's own device count)."""
  timing = _timing(root / study_lib.RUNS_DIRNAME / run.name)
  wall, device_seconds = timing['wall_seconds'], timing['wall_seconds'] * timing['devices']
  if run.trunk:
    trunk_dir = root / study_lib.RUNS_DIRNAME / run.trunk
    trunk = _timing(trunk_dir)
    share = run.branch_step / json.loads((trunk_dir / checkpoint.CONFIG_FILENAME).read_text())['total_steps']
    wall += trunk['wall_seconds'] * share
    device_seconds += trunk['wall_seconds'] * share * trunk['devices']
  return {'wall_seconds': round(wall, 2), 'devices': timing['devices'], 'device_hours': device_seconds / 3600.0}


def vit_shape(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
  """The run's ViT shape (registry defaults with the config's overrides) and MACs per image, from
  vit_jax.flops.model_forward_flops: analytic for plain ViTs, XLA's count for MAP heads, pre-logits or hybrids."""
  model = train.build_model(config, num_classes)
  missing = [f for f in SHAPE_FIELDS if not hasattr(model, f)]
  if missing:
    raise ValueError(f'Scaling studies vary ViT shapes, but model {config.model.name!r} has no {missing}; use a '
                     'ViT model.')
  forward, method = flops.model_forward_flops(model, config.dataset.image_size)
  return {**{f: int(getattr(model, f)) for f in SHAPE_FIELDS}, 'macs_per_image': forward / 2,
          'flops_method': method}


def make_row(run: study_lib.Run, study: ml_collections.ConfigDict, root: epath.Path,
             final: dict[str, Any]) -> dict[str, Any]:
  """The ledger row of a finished run (runs the few-shot probe on its final checkpoint)."""
  config = run.config
  run_dir = root / study_lib.RUNS_DIRNAME / run.name
  info = input_pipeline.get_dataset_info(config.dataset)
  shape = vit_shape(config, info.num_classes)
  per_image = flops.train_flops(shape['macs_per_image'])
  examples_seen = run.steps * config.batch_size
  return {
      'run': run.name, 'trunk': run.trunk or '', 'branch_step': run.branch_step,
      'star_dim': study_lib.star_dimension(study, run.shape), **shape,
      'num_params': int(final['num_params']), 'image_size': config.dataset.image_size,
      'batch_size': config.batch_size, 'steps': run.steps, 'cooldown_steps': config.optimizer.cooldown_steps,
      'train_examples': info.num_train_examples, 'examples_seen': examples_seen,
      'train_flops': per_image * examples_seen,
      'run_flops': per_image * (run.steps - run.branch_step) * config.batch_size,
      **cost(root, run),
      'train_loss': final['train_loss'], 'eval_loss': final['eval_loss'], 'eval_error': 1.0 - final['eval_accuracy'],
      **probe(run, study, run_dir),
  }


def probe_settings(study: ml_collections.ConfigDict) -> dict[str, Any]:
  """The few-shot settings a row's probe columns depend on (stored in the row, so changed settings are noticed)."""
  return {'train_split': study.base.dataset.train_split, 'shots': [int(k) for k in study.fewshot.shots],
          'l2_reg': float(study.fewshot.l2_reg), 'seeds': int(study.fewshot.seeds)}


def probe_is_current(row: dict[str, Any], study: ml_collections.ConfigDict) -> bool:
  return row.get(PROBE_KEY) == probe_settings(study)


def probe(run: study_lib.Run, study: ml_collections.ConfigDict, run_dir: epath.Path) -> dict[str, Any]:
  """The few-shot probe's row fields (its settings and one error column per shot count) on the final checkpoint."""
  settings = probe_settings(study)
  errors = fewshot.probe_run(run.config, str(run_dir), train_split=settings['train_split'], shots=settings['shots'],
                             l2_reg=settings['l2_reg'], seeds=settings['seeds'])
  return {PROBE_KEY: settings, **{fewshot_column(k): v for k, v in errors.items()}}


def reprobe(row: dict[str, Any], run: study_lib.Run, study: ml_collections.ConfigDict,
            run_dir: epath.Path) -> dict[str, Any]:
  """`row` with its probe fields recomputed under the study's current few-shot settings (training is kept)."""
  kept = {k: v for k, v in row.items() if k != PROBE_KEY and not re.fullmatch(r'fewshot_\d+shot_error', k)}
  return {**kept, **probe(run, study, run_dir)}


def write_row(run_dir: epath.Path, row: dict[str, Any]) -> None:
  (run_dir / ROW_FILENAME).write_text(json.dumps(row, indent=2))


def read_row(run_dir: epath.Path) -> dict[str, Any] | None:
  path = run_dir / ROW_FILENAME
  return json.loads(path.read_text()) if path.exists() else None


def check_identity(run_dir: epath.Path, run: study_lib.Run, *, required: bool = False) -> None:
  """Refuses (before anything is written) a run workdir that holds a different config, or none when `required`."""
  config_file = run_dir / checkpoint.CONFIG_FILENAME
  if not config_file.exists():
    if required:
      raise checkpoint.WorkdirConflictError(f'Run {run.name}: {config_file} is missing, so {run_dir} cannot be '
                                            'identified. Nothing was changed. Use a new --workdir.')
    return
  diffs = checkpoint.config_differences(json.loads(config_file.read_text()),
                                        json.loads(run.config.to_json_best_effort()))
  if diffs:
    raise checkpoint.WorkdirConflictError(
        f'Run {run.name}: {run_dir} holds a run with a different config:\n  ' + '\n  '.join(diffs) +
        '\nNothing was changed. Use a new --workdir for a changed study, or restore the original study config.')


def write_ledger(root: epath.Path, runs: list[study_lib.Run], study: ml_collections.ConfigDict) -> tuple[str, int]:
  """Rebuilds DIR/ledger.csv from the rows of the finished runs of `runs` (atomically); returns (path, rows).

  Refuses rows of a run with another config; leaves out (with a warning) rows whose probe used other settings.
  """
  rows = []
  for run in runs:
    run_dir = root / study_lib.RUNS_DIRNAME / run.name
    row = read_row(run_dir)
    if row is None:
      continue
    check_identity(run_dir, run, required=True)
    if probe_is_current(row, study):
      rows.append(row)
    else:
      logging.warning('Run %s: its few-shot probe used settings %s, not the study\'s %s; left out of the ledger. '
                      'Rerun the sweep (or its --only job) to recompute the probe.', run.name, row.get(PROBE_KEY),
                      probe_settings(study))
  path = root / LEDGER_FILENAME
  tmp = root / f'.{LEDGER_FILENAME}.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns(study), extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)
  return str(path), len(rows)
