"""A scaling study's config (its schema and validation) and its expansion into a grid of training runs.

A study is one base training config and three axes: model shapes x training lengths x training-set sizes. Every
grid point is one run of `vit_jax.train.train_and_evaluate` in its own workdir, DIR/runs/NAME.

The shapes are either listed (`study.grid = 'full'`, `study.shapes`) or a SoViT star (`study.grid = 'star'`,
Alabdulmohsin et al. 2023): a centre shape `study.star.centre` plus, for each dimension in `study.star.vary`
(e.g. hidden_size, num_layers, mlp_dim), the centre with only that dimension changed to each listed value. Each
dimension's runs then trace that dimension's own law f_k(x_k, t) (shape_laws.py) with the others held fixed.

Several training lengths from one run (Zhai et al. 2021, big_vision): the base config uses the 'constant' or 'rsqrt'
schedule, whose lr before the cooldown does not depend on the run's length. For each (shape, train size) the longest
length T_max is trained in full (the *trunk*, with its own cooldown); every shorter length T with cooldown c(T) =
round(cooldown_fraction * T) is a *branch*: it starts from the trunk's checkpoint at step T - c(T), which lies in the
trunk's constant/rsqrt phase, and trains only its c(T) cooldown steps. The trunk saves exactly those checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Optional

import ml_collections
from absl import logging

from vit_jax import config_schema

RUNS_DIRNAME = 'runs'
# Shape keys in the order and with the abbreviations used in run names.
_SHAPE_ABBREVIATIONS = {'hidden_size': 'w', 'num_layers': 'd', 'mlp_dim': 'm', 'num_heads': 'h', 'patch_size': 'p'}
MAX_TRUNK_CHECKPOINTS = 64
# Spare trunk checkpoint slots: each preemption adds one off-cadence save, which must not evict a branch start.
PREEMPTION_SLOTS = 16


def base_study() -> ml_collections.ConfigDict:
  """Every study field with its default; study configs (experiments/scaling_laws/configs/) start from this."""
  s = ml_collections.ConfigDict()
  s.base = config_schema.base_config()  # The training config every run starts from.
  s.base.optimizer.schedule = 'rsqrt'
  # Model shapes: each a dict of model.* overrides, e.g. dict(hidden_size=64, num_layers=4, mlp_dim=128,
  # num_heads=4, patch_size=4). () trains only the base model.
  s.shapes = ()
  s.grid = 'full'                # 'full': train study.shapes; 'star': the star below (SoViT's star sweep).
  s.star = ml_collections.ConfigDict()
  s.star.centre = {}             # The star's centre shape: model.* overrides, as an entry of study.shapes.
  s.star.vary = {}               # Per varied dimension, its values, e.g. dict(num_layers=(1, 2, 3, 4)).
  s.steps = (1000,)              # Training lengths (optimizer steps).
  s.train_examples = (0,)        # Training-set sizes: the first N examples of base.dataset.train_split; 0: all.
  s.cooldown_fraction = 0.2      # Each run's linear cooldown, as a fraction of its length.
  s.branch_cooldowns = True      # Shorter lengths branch off the longest run (see module docstring); False: separate.
  s.fewshot = ml_collections.ConfigDict()
  s.fewshot.shots = (5, 10)      # Examples per class drawn from base.dataset.train_split for the linear probe.
  s.fewshot.l2_reg = 2.0 ** 10   # Ridge penalty on standardised features (big_vision's default).
  s.fewshot.seeds = 3            # The probe's error is the mean over this many draws of the few-shot examples.
  return s


def validate_study(study: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad field and its fix."""
  schema = base_study()
  unknown = [k for k in study.keys() if k not in schema]
  unknown += [f'fewshot.{k}' for k in study.fewshot.keys() if k not in schema.fewshot]
  unknown += [f'star.{k}' for k in study.star.keys() if k not in schema.star]
  if unknown:
    raise ValueError(f'Unknown study key(s): {unknown}. The study fields are {sorted(schema.keys())} (see '
                     'experiments/scaling_laws/study.py::base_study).')
  config_schema.validate_config(study.base)
  if not study.steps or any(int(t) <= 0 for t in study.steps):
    raise ValueError(f'study.steps={tuple(study.steps)} must be a non-empty list of positive step counts.')
  if not study.train_examples or any(int(n) < 0 for n in study.train_examples):
    raise ValueError(f'study.train_examples={tuple(study.train_examples)} must be a non-empty list of sizes >= 0 '
                     '(0: the whole split).')
  if any(int(n) > 0 for n in study.train_examples) and '[' in study.base.dataset.train_split:
    raise ValueError(f'study.train_examples takes the first N examples of base.dataset.train_split, which is '
                     f'already sliced ({study.base.dataset.train_split!r}); use an unsliced split name.')
  if not 0.0 <= study.cooldown_fraction <= 1.0:
    raise ValueError(f'study.cooldown_fraction={study.cooldown_fraction} must lie in [0, 1].')
  if study.branch_cooldowns and study.base.optimizer.schedule not in ('constant', 'rsqrt'):
    raise ValueError(f'study.branch_cooldowns needs base.optimizer.schedule "constant" or "rsqrt" (an lr that does '
                     f'not depend on the run length before the cooldown), not {study.base.optimizer.schedule!r}. '
                     'Change the schedule or set branch_cooldowns=False.')
  for shape in study.shapes:
    if not isinstance(shape, dict) or not shape:
      raise ValueError(f'Each entry of study.shapes must be a non-empty dict of model.* overrides, got {shape!r}.')
  _validate_grid(study)
  if any(int(k) <= 0 for k in study.fewshot.shots):
    raise ValueError(f'study.fewshot.shots={tuple(study.fewshot.shots)} must be positive.')
  if study.fewshot.l2_reg <= 0 or study.fewshot.seeds <= 0:
    raise ValueError('study.fewshot.l2_reg and study.fewshot.seeds must be positive.')
  if study.base.optimizer.cooldown_steps:
    raise ValueError(f'study.base.optimizer.cooldown_steps={study.base.optimizer.cooldown_steps} would be replaced: '
                     'each run cools down for round(study.cooldown_fraction * steps) steps. Set it to 0 and choose '
                     'study.cooldown_fraction instead.')


def _validate_grid(study: ml_collections.ConfigDict) -> None:
  """study.grid and, for a star, its centre and values (raises ValueError naming the field and the fix)."""
  if study.grid not in ('full', 'star'):
    raise ValueError(f"study.grid={study.grid!r} must be 'full' (study.shapes) or 'star' (study.star).")
  centre, values = dict(study.star.centre), dict(study.star.vary)
  if study.grid == 'full':
    if centre or values:
      raise ValueError("study.star is set but study.grid='full' ignores it: set study.grid='star' or clear "
                       'study.star.centre and study.star.vary.')
    return
  if study.shapes:
    raise ValueError("study.grid='star' builds its shapes from study.star; leave study.shapes empty.")
  if not centre or not values:
    raise ValueError('study.grid=\'star\' needs study.star.centre (a shape dict) and study.star.vary (e.g. '
                     'dict(hidden_size=(32, 48, 64), num_layers=(1, 2, 4), mlp_dim=(64, 128, 256))).')
  for dim, vals in values.items():
    if dim not in centre:
      raise ValueError(f'study.star.vary varies {dim!r}, which study.star.centre does not set; add it to the '
                       'centre.')
    vals = tuple(vals)
    if len(set(vals) | {centre[dim]}) < 3 or any(int(v) <= 0 for v in vals):
      raise ValueError(f'study.star.vary.{dim}={vals} must be positive and give, with the centre\'s '
                       f'{centre[dim]}, at least 3 distinct values: a shape law has 3 exponents to fit.')
    if dim == 'hidden_size' and 'num_heads' in centre:
      bad = [v for v in vals if int(v) % int(centre['num_heads'])]
      if bad:
        raise ValueError(f'study.star.vary.hidden_size {bad} are not multiples of the centre\'s num_heads='
                         f'{centre["num_heads"]}; choose widths divisible by it or fewer heads.')


def grid_shapes(study: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The study's shapes: study.shapes for a full grid; for a star, the centre, then per dimension the centre with
  that dimension at each of its other values (sorted)."""
  if study.grid != 'star':
    return [dict(s) for s in study.shapes]
  centre = dict(study.star.centre)
  shapes = [centre]
  for dim, vals in study.star.vary.items():
    shapes += [{**centre, dim: int(v)} for v in sorted({int(v) for v in vals}) if int(v) != int(centre[dim])]
  return shapes


def star_dimension(study: ml_collections.ConfigDict, shape: dict[str, Any]) -> str:
  """For a star study, which dimension `shape` varies ('centre' for the centre); '' for a full grid."""
  if study.grid != 'star':
    return ''
  changed = [k for k, v in dict(study.star.centre).items() if int(shape.get(k, v)) != int(v)]
  return changed[0] if changed else 'centre'


@dataclasses.dataclass(frozen=True)
class Run:
  """One grid point: its name (its workdir under DIR/runs), its full training config and, for a branch, the trunk
  run it starts from and the trunk step it starts at."""
  name: str
  shape: dict[str, Any]
  steps: int
  train_examples: int
  config: ml_collections.ConfigDict
  trunk: Optional[str] = None
  branch_step: int = 0


def shape_name(shape: dict[str, Any]) -> str:
  """A short, file-name-safe name such as 'w64d4m128h4p4' ('base' for the base model)."""
  if not shape:
    return 'base'
  parts = [f'{_SHAPE_ABBREVIATIONS[k]}{shape[k]}' for k in _SHAPE_ABBREVIATIONS if k in shape]
  parts += [f'{k}{shape[k]}' for k in sorted(shape) if k not in _SHAPE_ABBREVIATIONS]
  return re.sub(r'[^A-Za-z0-9_.-]', '', '-'.join(parts) if len(parts) > 5 else ''.join(parts))


def run_name(shape: dict[str, Any], steps: int, train_examples: int) -> str:
  return f'{shape_name(shape)}_n{train_examples or "all"}_s{steps}'


def cooldown_steps(study: ml_collections.ConfigDict, steps: int) -> int:
  return int(round(study.cooldown_fraction * steps))


def _run_config(study: ml_collections.ConfigDict, shape: dict[str, Any], steps: int,
                train_examples: int) -> ml_collections.ConfigDict:
  config = study.base.copy_and_resolve_references()
  config.unlock()  # Study configs loaded by config_flags are locked; runs add model.* keys.
  for key, value in shape.items():
    config.model[key] = value
  config.total_steps = steps
  if config.optimizer.schedule in ('constant', 'rsqrt'):
    config.optimizer.cooldown_steps = cooldown_steps(study, steps)
  if train_examples:
    config.dataset.train_split = f'{study.base.dataset.train_split}[:{train_examples}]'
  return config


def _set_trunk_checkpoints(config: ml_collections.ConfigDict, starts: list[int], name: str) -> None:
  """The trunk saves at every branch start (a multiple of their gcd) and keeps all its saves, plus spare slots
  for preemption saves, so no branch start is ever evicted."""
  every = math.gcd(*starts)
  saves = -(-config.total_steps // every)  # Multiples of `every`, plus the final step when it is not one.
  if saves > MAX_TRUNK_CHECKPOINTS:
    raise ValueError(
        f'Branch starts {starts} of {name} share only the divisor {every}, so the trunk would keep {saves} '
        f'checkpoints (more than {MAX_TRUNK_CHECKPOINTS}). Choose study.steps whose cooldown starts '
        '(steps - round(cooldown_fraction * steps)) have a larger common divisor.')
  config.checkpoint_every = every
  config.keep_checkpoints = saves + PREEMPTION_SLOTS


def expand(study: ml_collections.ConfigDict) -> list[Run]:
  """The study's runs, trunks before their branches, so running them in order never waits on a missing trunk."""
  validate_study(study)
  logging.info('Each run trains its own study.steps length; study.base.total_steps=%d is not used.',
               study.base.total_steps)
  runs = []
  lengths = sorted({int(t) for t in study.steps}, reverse=True)
  for shape in (grid_shapes(study) or ({},)):
    shape = dict(shape)
    for n in sorted({int(n) for n in study.train_examples}):
      trunk_len = lengths[0]
      trunk_config = _run_config(study, shape, trunk_len, n)
      branches = []
      for t in lengths[1:]:
        config = _run_config(study, shape, t, n)
        start = t - config.optimizer.cooldown_steps
        if study.branch_cooldowns and start > 0:
          branches.append(Run(run_name(shape, t, n), shape, t, n, config, run_name(shape, trunk_len, n), start))
        else:
          branches.append(Run(run_name(shape, t, n), shape, t, n, config))
      starts = [r.branch_step for r in branches if r.trunk]
      if starts:
        _set_trunk_checkpoints(trunk_config, starts, run_name(shape, trunk_len, n))
      runs.append(Run(run_name(shape, trunk_len, n), shape, trunk_len, n, trunk_config))
      runs.extend(branches)
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(f'study.shapes has duplicate shapes (run names {sorted(names)}); remove the duplicates.')
  for run in runs:
    config_schema.validate_config(run.config)
  return runs
