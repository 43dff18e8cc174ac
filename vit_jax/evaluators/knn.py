"""DINO's weighted k-NN classifier on frozen features (Caron et al. 2021, facebookresearch/dino eval_knn.py).

Train and test features are L2-normalised, so their dot product is the cosine similarity. Each test example takes
its k most similar train examples; neighbour j votes for its label with weight exp(sim_j / T); the prediction is the
class with the largest summed vote (top-5: the five largest). DINO uses k = 20 and T = 0.07.

Memory stays bounded: test examples go through in chunks of `chunk_size`, so at most chunk_size x N_train
similarities exist at once (the last chunk is padded, so one compiled function serves every chunk).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.evaluators import base


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||, eps) per row, as torch.nn.functional.normalize."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=('k', 'num_classes'))
def knn_votes(query: jax.Array, bank: jax.Array, bank_labels: jax.Array, *, k: int, temperature: float,
              num_classes: int) -> jax.Array:
  """(Q, num_classes) summed votes exp(sim / T) of each query's k nearest (cosine) bank rows; both inputs are
  normalised here."""
  sim = l2_normalize(query.astype(jnp.float32)) @ l2_normalize(bank.astype(jnp.float32)).T
  top_sim, top_idx = jax.lax.top_k(sim, k)
  neighbours = jax.nn.one_hot(bank_labels[top_idx], num_classes, dtype=jnp.float32)  # (Q, k, C)
  return jnp.einsum('qk,qkc->qc', jnp.exp(top_sim / temperature), neighbours)


def knn_accuracy(train: base.Features, test: base.Features, *, num_classes: int, k: int = 20,
                 temperature: float = 0.07, chunk_size: int = 1024) -> dict[str, float]:
  """{'top1', 'top5'} accuracy of the weighted k-NN vote (top5 only with at least 5 classes)."""
  if not 0 < k <= len(train.labels):
    raise ValueError(f'k={k} must be in [1, {len(train.labels)}] (the number of train examples); lower k or use a '
                     'larger train split.')
  bank, bank_labels = jnp.asarray(train.features), jnp.asarray(train.labels)
  n = len(test.labels)
  top1 = top5 = 0
  for start in range(0, n, chunk_size):
    chunk = test.features[start:start + chunk_size]
    rows = len(chunk)
    padded = np.zeros((min(chunk_size, n),) + chunk.shape[1:], np.float32)
    padded[:rows] = chunk
    votes = np.asarray(knn_votes(jnp.asarray(padded), bank, bank_labels, k=k, temperature=temperature,
                                 num_classes=num_classes))[:rows]
    labels = test.labels[start:start + rows]
    ranked = np.argsort(-votes, axis=1, kind='stable')
    top1 += int(np.sum(ranked[:, 0] == labels))
    top5 += int(np.sum(np.any(ranked[:, :5] == labels[:, None], axis=1)))
  scalars = {'top1': top1 / n}
  if num_classes >= 5:
    scalars['top5'] = top5 / n
  return scalars


class KNN(base.Evaluator):
  """config.evals.NAME with type 'knn': k (20), temperature (0.07), chunk_size (test rows per similarity block)."""

  DEFAULTS = {'k': 20, 'temperature': 0.07, 'chunk_size': 1024}

  @classmethod
  def _validate(cls, config: dict[str, Any], where: str) -> None:
    if int(config['k']) < 1:
      raise ValueError(f'{where}.k={config["k"]} must be >= 1 (DINO uses 20).')
    if float(config['temperature']) <= 0:
      raise ValueError(f'{where}.temperature={config["temperature"]} must be > 0 (DINO uses 0.07).')
    if int(config['chunk_size']) < 1:
      raise ValueError(f'{where}.chunk_size={config["chunk_size"]} must be >= 1.')

  def evaluate(self, train: base.Features, test: base.Features, *, num_classes: int) -> dict[str, float]:
    return knn_accuracy(train, test, num_classes=num_classes, k=int(self.config['k']),
                        temperature=float(self.config['temperature']), chunk_size=int(self.config['chunk_size']))
