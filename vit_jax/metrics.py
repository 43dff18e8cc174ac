"""Metric collections (clu) computed on device, and the writers that report them.

No `from __future__ import annotations` here: clu reads the metric classes from real annotations.
"""

from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metric_writers, metrics


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
  loss: metrics.Average.from_output('loss')
  accuracy: metrics.Average.from_output('accuracy')
  grad_norm: metrics.Average.from_output('grad_norm')
  learning_rate: metrics.LastValue.from_output('learning_rate')


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
