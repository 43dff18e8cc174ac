"""Few-shot linear-probe error on frozen pre-logit features, as big_vision's few-shot evaluator.

Features of k examples per class (drawn from a train split) are standardised, given a constant bias feature of 100
(so the bias is almost unregularised), and regressed in closed form with ridge penalty `l2_reg` onto one-hot targets
in {-1, 1}; the probe predicts the argmax on the eval split. The error is averaged over `seeds` draws.
"""
from __future__ import annotations

from typing import Any, Iterable

import jax
import ml_collections
import numpy as np

from vit_jax import checkpoint, input_pipeline, optim, sharding, train

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
                           'lower study.fewshot.shots.')
        picks.append(rng.permutation(members)[:k])
      idx = np.concatenate(picks)
      per_seed.append(ridge_probe_error(train_features[idx], train_labels[idx], test_features, test_labels,
                                        num_classes=num_classes, l2_reg=l2_reg))
    errors[int(k)] = float(np.mean(per_seed))
  return errors


def _pre_logits(module: Any, images: jax.Array) -> jax.Array:
  return module.forward_head(module.forward_features(images, train=False), pre_logits=True)


def restore_params(config: ml_collections.ConfigDict, workdir: str, num_classes: int, step: int) -> tuple[Any, Any]:
  """(model, params) of the run `config` at checkpoint `step` of `workdir`, restored without running an init."""
  model = train.build_model(config, num_classes)
  tx, _ = optim.create_optimizer(config.optimizer, config.total_steps)
  abstract, _ = train.abstract_train_state(model, tx, image_size=config.dataset.image_size,
                                           mesh=sharding.create_mesh(config.mesh),
                                           rules=sharding.logical_rules(config.sharding_rules))
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    if step not in ckpt.all_steps():
      raise FileNotFoundError(f'{workdir} has no checkpoint at step {step} (has {ckpt.all_steps()}) for the few-shot '
                              'probe; rerun the sweep to finish this run.')
    state = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  return model, state.params


def extract_features(model: Any, params: Any, dataset_config: ml_collections.ConfigDict, split: str, *,
                     batch_size: int, mesh_config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """Pre-logit features and labels of every example of `split`, preprocessed as for evaluation."""
  ds_config = dataset_config.copy_and_resolve_references()
  ds_config.eval_split = split
  mesh = sharding.create_mesh(mesh_config)
  apply = jax.jit(lambda p, x: model.apply({'params': p}, x, method=_pre_logits))
  feats, labels = [], []
  for batch in input_pipeline.create_eval_iterator(ds_config, global_batch_size=batch_size):
    out = np.asarray(jax.device_get(apply(params, sharding.shard_batch(batch, mesh)['image'])))
    keep = batch['mask'] > 0
    feats.append(out[keep])
    labels.append(batch['label'][keep])
  return np.concatenate(feats), np.concatenate(labels)


def probe_run(config: ml_collections.ConfigDict, workdir: str, *, train_split: str, shots: Iterable[int],
              l2_reg: float, seeds: int) -> dict[int, float]:
  """Few-shot errors of the final checkpoint of the run in `workdir`: probe fitted on `train_split`, tested on the
  run's eval split."""
  info = input_pipeline.get_dataset_info(config.dataset)
  model, params = restore_params(config, workdir, info.num_classes, config.total_steps)
  kw = dict(batch_size=config.batch_size, mesh_config=config.mesh)
  x_train, y_train = extract_features(model, params, config.dataset, train_split, **kw)
  x_test, y_test = extract_features(model, params, config.dataset, config.dataset.eval_split, **kw)
  return fewshot_errors(x_train, y_train, x_test, y_test, num_classes=info.num_classes, shots=shots, l2_reg=l2_reg,
                        seeds=seeds)
