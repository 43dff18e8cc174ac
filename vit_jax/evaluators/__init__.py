"""Evaluation protocols on frozen features (k-NN, linear probe, few-shot ridge) and the entry the loop calls.

`config.evals` is a ConfigDict of named evaluator configs, e.g.

    config.evals.knn = dict(type='knn', every=100, k=20, temperature=0.07)
    config.evals.linear = dict(type='linear_probe', every=0, epochs=100)

Every entry has `type` (a key of EVALUATORS), `every` (run every this many steps and after the last step; 0: only
after the last step), `train_split` and `eval_split` (default: the dataset's), plus its protocol's own keys (see
each class's DEFAULTS). `run_periodic` runs the due ones and returns `{'NAME/METRIC': value}`; the command line
`python -m vit_jax.evaluate` runs them on a workdir or a converted checkpoint.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import ml_collections

from vit_jax.evaluators import fewshot, knn, linear_probe
from vit_jax.evaluators.base import Evaluator, FeatureFn, Features, extract_features, pre_logits_fn

EVALUATORS: dict[str, type[Evaluator]] = {
    'knn': knn.KNN,
    'linear_probe': linear_probe.LinearProbe,
    'fewshot': fewshot.FewShot,
}

__all__ = ['EVALUATORS', 'Evaluator', 'FeatureFn', 'Features', 'build_evaluators', 'extract_features',
           'pre_logits_fn', 'run_evaluators', 'run_periodic', 'validate_evals']


def build_evaluator(name: str, config: Mapping[str, Any] | ml_collections.ConfigDict) -> Evaluator:
  """The evaluator `config.evals.<name>` describes; a missing or unknown type is a ValueError naming it."""
  kind = config.get('type')
  if kind not in EVALUATORS:
    raise ValueError(f'config.evals.{name}.type={kind!r}; set it to one of {sorted(EVALUATORS)}.')
  return EVALUATORS[kind](config, name)


def build_evaluators(evals_config: ml_collections.ConfigDict | Mapping[str, Any] | None) -> dict[str, Evaluator]:
  """{name: evaluator} for every entry of `config.evals` (None or empty: none)."""
  if not evals_config:
    return {}
  out = {}
  for name, entry in evals_config.items():
    if not isinstance(entry, (ml_collections.ConfigDict, Mapping)):
      raise ValueError(f'config.evals.{name} must be a dict with a type, e.g. dict(type="knn"); got {entry!r}.')
    if '/' in name:
      raise ValueError(f'config.evals.{name}: the name must not contain "/" (it prefixes the metric names).')
    out[name] = build_evaluator(name, entry)
  return out


def validate_evals(evals_config: ml_collections.ConfigDict | Mapping[str, Any] | None) -> None:
  """Raises ValueError for any bad entry of `config.evals` (types, keys, ranges), before anything is compiled."""
  build_evaluators(evals_config)


def run_evaluators(evaluators: Mapping[str, Evaluator], *, feature_fn: FeatureFn, variables: Mapping[str, Any],
                   dataset_config: ml_collections.ConfigDict, batch_size: int, mesh: jax.sharding.Mesh,
                   num_classes: int) -> dict[str, float]:
  """Runs every evaluator; returns {'NAME/METRIC': value}. Each split's features are extracted once and shared by
  the evaluators that use it."""
  cache: dict[str, Features] = {}

  def features(split: str) -> Features:
    if split not in cache:
      cache[split] = extract_features(feature_fn, variables, dataset_config, split, batch_size=batch_size, mesh=mesh)
    return cache[split]

  scalars = {}
  for name, evaluator in evaluators.items():
    train_split, eval_split = evaluator.splits(dataset_config)
    result = evaluator.evaluate(features(train_split), features(eval_split), num_classes=num_classes)
    scalars.update({f'{name}/{metric}': float(value) for metric, value in result.items()})
  return scalars


def run_periodic(evals_config: ml_collections.ConfigDict | None, *, step: int, total_steps: int,
                 feature_fn: FeatureFn, variables: Mapping[str, Any], dataset_config: ml_collections.ConfigDict,
                 batch_size: int, mesh: jax.sharding.Mesh, num_classes: int) -> dict[str, float]:
  """The training loop's hook: after train step `step` of `total_steps`, runs the evaluators of `config.evals` that
  are due (`every` divides the step, or it is the last step) and returns their scalars {'NAME/METRIC': value}
  (empty when none is due). Write them to TensorBoard and final_metrics.json.

  `feature_fn(variables, images) -> (B, D)` is the task's representation (e.g. `pre_logits_fn(model)`, or DINO's
  teacher class token); build it once, it is compiled once. `variables` are the model variables it reads
  ({'params': ..., other collections}). Features come from `dataset_config` with eval preprocessing, in batches of
  `batch_size` split over `mesh`. With several processes every process must call this (it is a collective).
  """
  due = {name: e for name, e in build_evaluators(evals_config).items() if e.is_due(step, total_steps)}
  if not due:
    return {}
  return run_evaluators(due, feature_fn=feature_fn, variables=variables, dataset_config=dataset_config,
                        batch_size=batch_size, mesh=mesh, num_classes=num_classes)
