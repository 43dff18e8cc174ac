"""What every evaluator shares: the feature function, frozen features of a split, and the evaluator interface.

An evaluator measures how good a model's frozen representation is for a downstream protocol (k-NN, a linear probe,
a few-shot ridge probe). It never trains the model: it sees only a *feature function* `(variables, images) ->
(B, D) features` (e.g. the pooled pre-logits, or DINO's class token) and the model variables, extracts the features
of a train split and an eval split once (eval preprocessing for both, as DINO's k-NN does), and returns scalars.

As in big_vision, each evaluator is a small object built from its own config entry (`config.evals.NAME`, see
`vit_jax.evaluators.run_periodic`); the protocol itself is a pure function of feature arrays, so tests can check it
on data whose answer is known.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from vit_jax import compile_options, input_pipeline, sharding

# (variables, images (B, H, W, 3) in [-1, 1]) -> features (B, D). Build it once and reuse it: it is compiled once
# per (function, mesh).
FeatureFn = Callable[[Mapping[str, Any], jax.Array], jax.Array]

# Keys every evaluator config has, with their defaults (None: taken from config.dataset at run time).
COMMON_DEFAULTS: dict[str, Any] = {
    'type': None,          # Which protocol: a key of vit_jax.evaluators.EVALUATORS.
    'every': 0,            # Run every this many train steps (and always after the last step); 0: only at the end.
    'train_split': None,   # Split whose features the protocol fits (None: config.dataset.train_split).
    'eval_split': None,    # Split it is measured on (None: config.dataset.eval_split).
}


@dataclasses.dataclass(frozen=True)
class Features:
  """Frozen features of one split: float32 (N, D) and their int labels (N,)."""
  features: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    if self.features.ndim != 2 or self.labels.shape != (self.features.shape[0],):
      raise ValueError(f'Features must be (N, D) with labels (N,); got {self.features.shape} and '
                       f'{self.labels.shape}. A feature function must return one vector per image.')


def _pre_logits(module: Any, images: jax.Array) -> jax.Array:
  return module.forward_head(module.forward_features(images, train=False), pre_logits=True, train=False)


def pre_logits_fn(model: Any) -> FeatureFn:
  """The default feature function: the model's pooled, pre-logit representation (class token or mean pool after
  the final norm, before the head), in inference mode."""
  def features(variables: Mapping[str, Any], images: jax.Array) -> jax.Array:
    return model.apply(variables, images, method=_pre_logits)
  return features


@functools.lru_cache(maxsize=16)
def _compiled(feature_fn: FeatureFn, mesh: jax.sharding.Mesh) -> Callable[..., jax.Array]:
  """`feature_fn` jitted with features replicated on every device, so each process can read all of them."""
  return compile_options.jit_inference(lambda v, x: feature_fn(v, x).astype(jnp.float32),
                                      out_shardings=sharding.replicated(mesh))


def _gather_local(x: np.ndarray) -> np.ndarray:
  """Every process's local rows in the global batch order (process 0's first), as `shard_batch` lays them out."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def extract_features(feature_fn: FeatureFn, variables: Mapping[str, Any], dataset_config: ml_collections.ConfigDict,
                     split: str, *, batch_size: int, mesh: jax.sharding.Mesh) -> Features:
  """Features and labels of every example of `split`, preprocessed as for evaluation (resize / centre crop, no
  augmentation); padding examples of the last batch are dropped. A collective when there are several processes."""
  sharding.check_global_batch(batch_size, mesh)  # A clear error for a batch the mesh cannot split.
  ds_config = dataset_config.copy_and_resolve_references()
  ds_config.eval_split = split
  apply = _compiled(feature_fn, mesh)
  feats, labels = [], []
  for batch in input_pipeline.create_eval_iterator(ds_config, global_batch_size=batch_size):
    out = np.asarray(jax.device_get(apply(variables, sharding.shard_batch({'image': batch['image']}, mesh)['image'])))
    keep = _gather_local(batch['mask']) > 0
    feats.append(out[keep])
    labels.append(_gather_local(batch['label'])[keep])
  if not feats:
    raise ValueError(f'Split {split!r} of {dataset_config.name!r} produced no examples for the evaluator.')
  return Features(np.concatenate(feats), np.concatenate(labels).astype(np.int64))


class Evaluator(abc.ABC):
  """One protocol with its settings. Subclasses set DEFAULTS (their own keys and defaults), check them in
  `_validate` and compute their scalars from train and eval features in `evaluate`."""

  DEFAULTS: ClassVar[dict[str, Any]] = {}

  def __init__(self, config: Mapping[str, Any] | ml_collections.ConfigDict, name: str = ''):
    self.name = name or str(config.get('type'))
    self.config = self.resolve(config, self.name)

  @classmethod
  def resolve(cls, config: Mapping[str, Any] | ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    """`config` over COMMON_DEFAULTS and DEFAULTS; an unknown key or a bad value is a ValueError naming it."""
    given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    known = {**COMMON_DEFAULTS, **cls.DEFAULTS}
    unknown = sorted(set(given) - set(known))
    if unknown:
      raise ValueError(f'config.evals.{name}: unknown key(s) {unknown} for type {given.get("type")!r}; its keys are '
                       f'{sorted(known)}.')
    resolved = {**known, **given}
    if int(resolved['every']) < 0:
      raise ValueError(f'config.evals.{name}.every={resolved["every"]} must be >= 0 (0: only after the last step).')
    cls._validate(resolved, f'config.evals.{name}')
    return resolved

  @classmethod
  def _validate(cls, config: dict[str, Any], where: str) -> None:
    """Raises ValueError naming `where`.KEY for a value the protocol cannot use."""

  def is_due(self, step: int, total_steps: int) -> bool:
    """Whether this evaluator runs after train step `step` of `total_steps`."""
    every = int(self.config['every'])
    return step == total_steps or (every > 0 and step % every == 0)

  def splits(self, dataset_config: ml_collections.ConfigDict) -> tuple[str, str]:
    """(train split, eval split), defaulting to the dataset's own."""
    return (self.config['train_split'] or dataset_config.train_split,
            self.config['eval_split'] or dataset_config.eval_split)

  @abc.abstractmethod
  def evaluate(self, train: Features, test: Features, *, num_classes: int) -> dict[str, float]:
    """Scalars {metric: value} of the protocol fitted on `train` and measured on `test`."""
