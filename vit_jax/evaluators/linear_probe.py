"""Linear probe: a softmax-regression classifier trained on frozen, standardised features.

Protocol (ours; stated because every paper's differs): features are standardised with the train split's mean and
standard deviation (a BatchNorm without affine parameters at its dataset statistics, as MAE's linear probe), then a
linear layer with bias is trained from zeros by AdamW on the softmax cross-entropy for `epochs` passes of shuffled
mini-batches of `batch_size` (a fixed seed: the result is deterministic), with a cosine learning-rate decay from
`lr` to 0 and decoupled weight decay on the kernel. The whole optimisation is one compiled `lax.scan`. Reports
top-1 (and top-5 with at least 5 classes) accuracy on the eval split and top-1 on the train split (underfitting
shows as a low `train_top1`).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vit_jax.evaluators import base


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """Each array minus the train mean, over the train standard deviation (+1e-6 for constant features)."""
  mean, std = train.mean(0, keepdims=True), train.std(0, keepdims=True) + 1e-6
  return [((x - mean) / std).astype(np.float32) for x in (train,) + others]


def _batch_indices(n: int, batch_size: int, epochs: int, seed: int) -> np.ndarray:
  """(epochs * steps_per_epoch, batch) example indices: a new permutation each epoch, the remainder dropped."""
  batch_size = min(batch_size, n)
  steps = n // batch_size
  rng = np.random.RandomState(seed)
  return np.concatenate([rng.permutation(n)[:steps * batch_size].reshape(steps, batch_size) for _ in range(epochs)])


@functools.partial(jax.jit, static_argnames=('num_classes', 'lr', 'weight_decay'))
def _fit(x: jax.Array, y: jax.Array, batches: jax.Array, *, num_classes: int, lr: float,
         weight_decay: float) -> dict[str, jax.Array]:
  params = {'kernel': jnp.zeros((x.shape[1], num_classes), jnp.float32), 'bias': jnp.zeros((num_classes,))}
  schedule = optax.cosine_decay_schedule(lr, batches.shape[0])
  tx = optax.adamw(schedule, weight_decay=weight_decay, mask={'kernel': True, 'bias': False})

  def loss_fn(p, idx):
    logits = x[idx] @ p['kernel'] + p['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

  def step(carry, idx):
    p, opt_state = carry
    grads = jax.grad(loss_fn)(p, idx)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
  return params


def fit_linear_probe(train: base.Features, *, num_classes: int, epochs: int = 100, batch_size: int = 256,
                     lr: float = 0.01, weight_decay: float = 1e-4, seed: int = 0) -> dict[str, jax.Array]:
  """{'kernel' (D, C), 'bias' (C,)} of the probe on already standardised `train` features (see the module doc)."""
  batches = _batch_indices(len(train.labels), batch_size, epochs, seed)
  return _fit(jnp.asarray(train.features, jnp.float32), jnp.asarray(train.labels, jnp.int32), jnp.asarray(batches),
              num_classes=num_classes, lr=float(lr), weight_decay=float(weight_decay))


def _accuracy(params: dict[str, jax.Array], data: base.Features, top: int) -> float:
  logits = np.asarray(data.features @ np.asarray(params['kernel']) + np.asarray(params['bias']))
  ranked = np.argsort(-logits, axis=1, kind='stable')[:, :top]
  return float(np.mean(np.any(ranked == data.labels[:, None], axis=1)))


def linear_probe_accuracy(train: base.Features, test: base.Features, *, num_classes: int,
                          **fit_kwargs: Any) -> dict[str, float]:
  """{'top1', 'top5' (>= 5 classes), 'train_top1'} of the probe fitted on `train` and measured on `test`."""
  x_train, x_test = standardize(train.features, test.features)
  train, test = base.Features(x_train, train.labels), base.Features(x_test, test.labels)
  params = fit_linear_probe(train, num_classes=num_classes, **fit_kwargs)
  scalars = {'top1': _accuracy(params, test, 1), 'train_top1': _accuracy(params, train, 1)}
  if num_classes >= 5:
    scalars['top5'] = _accuracy(params, test, 5)
  return scalars


class LinearProbe(base.Evaluator):
  """config.evals.NAME with type 'linear_probe': epochs (100), batch_size (256), lr (0.01), weight_decay (1e-4),
  seed (0)."""

  DEFAULTS = {'epochs': 100, 'batch_size': 256, 'lr': 0.01, 'weight_decay': 1e-4, 'seed': 0}

  @classmethod
  def _validate(cls, config: dict[str, Any], where: str) -> None:
    for key in ('epochs', 'batch_size'):
      if int(config[key]) < 1:
        raise ValueError(f'{where}.{key}={config[key]} must be >= 1.')
    if float(config['lr']) <= 0:
      raise ValueError(f'{where}.lr={config["lr"]} must be > 0.')
    if float(config['weight_decay']) < 0:
      raise ValueError(f'{where}.weight_decay={config["weight_decay"]} must be >= 0.')

  def evaluate(self, train: base.Features, test: base.Features, *, num_classes: int) -> dict[str, float]:
    c = self.config
    return linear_probe_accuracy(train, test, num_classes=num_classes, epochs=int(c['epochs']),
                                 batch_size=int(c['batch_size']), lr=float(c['lr']),
                                 weight_decay=float(c['weight_decay']), seed=int(c['seed']))
