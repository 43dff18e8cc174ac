"""Few-shot linear probe on frozen features, as big_vision's few-shot evaluator (closed-form ridge regression).

Features of k examples per class (drawn from a train split) are standardised, given a constant bias feature of 100
(so the bias is almost unregularised), and regressed in closed form with ridge penalty `l2_reg` onto one-hot targets
in {-1, 1}; the probe predicts the argmax on the eval split. The error is averaged over `seeds` draws of the k
examples. The scaling-law study (experiments/scaling_laws) records these errors in its ledger.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from vit_jax.evaluators import base

BIAS_CONSTANT = 100.0


def ridge_weights(x: np.ndarray, y: np.ndarray, l2_reg: float, *, dual: bool | None = None) -> np.ndarray:
  """Ridge solution (x^T x + l2 I)^-1 x^T y, or the equal x^T (x x^T + l2 I)^-1 y (`dual`, the default when there
  are fewer points than features: it solves an n x n system instead of a d x d one)."""
  n, d = x.shape
  if dual is None:
    dual = n < d
  if dual:
    return x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
  return np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)


def ridge_probe_error(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
                      num_classes: int, l2_reg: float) -> float:
  """Error of the closed-form ridge classifier fitted on (x_train, y_train), measured on (x_test, y_test)."""
  x_train, x_test = np.asarray(x_train, np.float64), np.asarray(x_test, np.float64)
  mean, std = x_train.mean(0, keepdims=True), x_train.std(0, keepdims=True) + 1e-5
  x = np.pad((x_train - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
  xt = np.pad((x_test - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_CONSTANT)
  y = 2.0 * np.eye(num_classes)[np.asarray(y_train)] - 1.0
  w = ridge_weights(x, y, l2_reg)
  return float(np.mean(np.argmax(xt @ w, axis=1) != np.asarray(y_test)))


def fewshot_errors(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                   test_labels: np.ndarray, *, num_classes: int, shots: Iterable[int], l2_reg: float,
                   seeds: int) -> dict[int, float]:
  """{k: mean probe error over `seeds` draws of k train examples per class}."""
  train_labels = np.asarray(train_labels)
  errors = {}
  for k in shots:
    per_seed = []
    for seed in range(seeds):
      rng = np.random.default_rng(seed)
      picks = []
      for c in range(num_classes):
        members = np.flatnonzero(train_labels == c)
        if len(members) < k:
          raise ValueError(f'{k}-shot probe: class {c} has only {len(members)} examples in the probe\'s train split; '
                           'lower the number of shots.')
        picks.append(rng.permutation(members)[:k])
      idx = np.concatenate(picks)
      per_seed.append(ridge_probe_error(train_features[idx], train_labels[idx], test_features, test_labels,
                                        num_classes=num_classes, l2_reg=l2_reg))
    errors[int(k)] = float(np.mean(per_seed))
  return errors


class FewShot(base.Evaluator):
  """config.evals.NAME with type 'fewshot': shots ((5, 10)), l2_reg (2**10, big_vision's), seeds (3). Reports
  `{k}shot_top1` = 1 - the mean k-shot error."""

  DEFAULTS = {'shots': (5, 10), 'l2_reg': 2.0 ** 10, 'seeds': 3}

  @classmethod
  def _validate(cls, config: dict[str, Any], where: str) -> None:
    shots = tuple(config['shots'])
    if not shots or any(int(k) < 1 for k in shots):
      raise ValueError(f'{where}.shots={shots} must be a non-empty tuple of positive counts, e.g. (5, 10).')
    if float(config['l2_reg']) <= 0:
      raise ValueError(f'{where}.l2_reg={config["l2_reg"]} must be > 0.')
    if int(config['seeds']) < 1:
      raise ValueError(f'{where}.seeds={config["seeds"]} must be >= 1.')

  def evaluate(self, train: base.Features, test: base.Features, *, num_classes: int) -> dict[str, float]:
    errors = fewshot_errors(train.features, train.labels, test.features, test.labels, num_classes=num_classes,
                            shots=self.config['shots'], l2_reg=float(self.config['l2_reg']),
                            seeds=int(self.config['seeds']))
    return {f'{k}shot_top1': 1.0 - err for k, err in errors.items()}
