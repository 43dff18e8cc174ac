"""Metric collections (clu) computed on device, and the writers that report them.

No `from __future__ import annotations` here: clu reads the metric classes from real annotations.
"""

from typing import Any, Mapping, Optional

from absl import logging

import flax
import numpy as np
import jax
import jax.numpy as jnp
import optax
from clu import metric_writers, metrics


@flax.struct.dataclass
class FiniteAverage(metrics.Average):
  """Average of the finite values only, so one skipped nan/inf step does not turn a whole window's mean into nan."""

  @classmethod
  def from_model_output(cls, values: jnp.ndarray, mask: Optional[jnp.ndarray] = None, **_) -> 'FiniteAverage':
    values = jnp.atleast_1d(values)
    finite = jnp.isfinite(values)
    mask = finite if mask is None else finite & mask.astype(bool)
    return super().from_model_output(values, mask=mask)


@flax.struct.dataclass
class Sum(metrics.Metric):
  """Sum of a per-step scalar (e.g. the number of skipped updates in a window)."""
  total: jnp.ndarray

  @classmethod
  def empty(cls) -> 'Sum':
    return cls(total=jnp.array(0, jnp.int32))

  @classmethod
  def from_model_output(cls, values: jnp.ndarray, **_) -> 'Sum':
    return cls(total=jnp.sum(values).astype(jnp.int32))

  def merge(self, other: 'Sum') -> 'Sum':
    return type(self)(total=self.total + other.total)

  def compute(self) -> jnp.ndarray:
    return self.total


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: FiniteAverage.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')
  grad_norm: FiniteAverage.from_output('grad_norm')
  learning_rate: metrics.LastValue.from_output('learning_rate')
  nonfinite_updates: Sum.from_output('nonfinite_updates')  # Steps whose loss or grad norm was nan/inf.


@flax.struct.dataclass
class LossTrainMetrics(metrics.Collection):
  """TrainMetrics without accuracy, for tasks that have no labels to score (self-supervised pretraining)."""
  loss: FiniteAverage.from_output('loss')
  grad_norm: FiniteAverage.from_output('grad_norm')
  learning_rate: metrics.LastValue.from_output('learning_rate')
  nonfinite_updates: Sum.from_output('nonfinite_updates')


@flax.struct.dataclass
class LossEvalMetrics(metrics.Collection):
  """EvalMetrics without accuracy: the mean loss over the real (unpadded) examples, for tasks without labels."""
  loss: metrics.Average.from_output('loss')


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')
  top5_accuracy: metrics.Average.from_output('top5_accuracy')


def classification_outputs(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """Per-example float32 cross-entropy, top-1 and top-5 correctness from logits and integer labels."""
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top1 = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  k = min(5, logits.shape[-1])
  topk = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1).astype(jnp.float32)
  return {'loss': loss, 'accuracy': top1, 'top5_accuracy': topk}


def to_scalars(collection: metrics.Collection, prefix: str, *, num_classes: int) -> dict[str, float]:
  """Computes a collection into host floats named `{prefix}_{metric}`; top-5 only with more than 5 classes."""
  values = jax.device_get(collection.compute())
  return {f'{prefix}_{k}': float(v) for k, v in values.items() if k != 'top5_accuracy' or num_classes > 5}


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard event files under `workdir` plus console logging; only process 0 writes files."""
  return metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)


def write_hparams(writer: metric_writers.MetricWriter, config_dict: Mapping[str, Any]) -> None:
  """Records the flattened config once, so TensorBoard can compare runs."""
  flat = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, Mapping):
      for k, v in node.items():
        visit(f'{prefix}{k}.', v)
    else:
      flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

  visit('', config_dict)
  writer.write_hparams(flat)


def collection_to_json(collection: Optional[metrics.Collection]) -> Optional[dict[str, Any]]:
  """An accumulated collection as plain JSON (dtype and exact value of every leaf), for checkpointing."""
  if collection is None:
    return None
  state = flax.serialization.to_state_dict(jax.device_get(collection))
  return jax.tree.map(lambda x: {'dtype': str(np.asarray(x).dtype), 'value': np.asarray(x).tolist()}, state)


def collection_from_json(empty: metrics.Collection, data: Optional[Mapping[str, Any]]) -> Optional[metrics.Collection]:
  """Inverse of `collection_to_json`: bitwise the same leaves, in the structure of `empty` (Collection.empty())."""
  if data is None:
    return None
  if set(data) != set(empty.__dataclass_fields__):
    # Saved by a version with other metrics: only the current logging window's running means are lost.
    logging.warning('The saved train metrics hold %s, not %s: starting this logging window afresh.', sorted(data),
                    sorted(empty.__dataclass_fields__))
    return None
  is_leaf = lambda x: isinstance(x, Mapping) and set(x) == {'dtype', 'value'}
  state = jax.tree.map(lambda x: jnp.asarray(np.asarray(x['value'], dtype=x['dtype'])), dict(data), is_leaf=is_leaf)
  return flax.serialization.from_state_dict(empty, state)
