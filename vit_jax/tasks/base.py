"""The Task interface: what one training objective (classification, MAE, DINO, ...) adds to the one loop.

`vit_jax/train.py` runs the same loop for every task; `config.task.name` picks the task (`vit_jax.tasks.get_task`).
The loop owns everything generic: the mesh and shardings, the optimizer update, gradient accumulation, remat and
dtype (model options), the non-finite guard, the EMA (params and batch_stats), checkpoints, exact resume, preemption
and `init_from`.
A task declares only what is specific to its objective:

  config      `config_defaults()`: the task's own fields, under `config.task.<name>` (the schema adds them, so
              unknown keys are rejected as everywhere else); `check_config(config)`: a ValueError naming the key
              and the fix, called by config validation before anything is built or compiled.
  state       `init_variables` builds the model's variables (`params` plus collections such as `batch_stats`);
              `init_extra` returns what the task adds to the train state (`TrainState.extra`, any pytree, e.g.
              DINO's teacher params and centre). Both run inside the loop's boxed init, under the logical-axis
              rules, so a leaf derived from the student's params (a copy, `jax.tree.map` of it) keeps the
              `nn.Partitioned` boxes and is sharded exactly like the student; unboxed leaves are replicated. `extra`
              is checkpointed, restored on resume, and kept unchanged by a skipped (non-finite) step.
  constants   `load_constants` returns frozen inputs passed to every step but never checkpointed (e.g. the
              distillation teacher's params), already placed on the mesh.
  step        `prepare_batch(ctx, batch, rng)` runs once per step on the whole global batch (e.g. mixup, a teacher's
              forward pass); the loop then splits the result into `accum_steps` micro-batches and differentiates
              `loss(ctx, params, micro_batch, rng)` on each; after the optimizer update it calls
              `after_update(state, batch, outputs)` (e.g. DINO's teacher EMA and centre update). The step's metrics
              are `train_metrics.single_from_model_output(**outputs, grad_norm=..., learning_rate=...,
              nonfinite_updates=...)`.
  eval        `eval_step(state, batch)` scores one eval batch (`eval_metrics`; None: no eval pass, e.g. for a task
              judged only by evaluators); `eval_variables(state)` are the weights to evaluate (default: the EMA
              when kept, else the raw variables; DINO: its teacher); `feature_fn(model)` is what the periodic
              evaluators (config.evals) score (default: pooled pre-logits); `evaluators` names the kinds in
              vit_jax/evaluators/ that suit the task's features.
  input       `train_iterator` / `eval_iterator` (default: the input pipeline's image/label batches), e.g. DINO's
              multi-crop views. Every array of a batch has the global batch as its leading axis.
  optimizer   `create_optimizer(config)` (default: `optim.create_optimizer(config.optimizer, config.total_steps)`).

Rules for `loss`: it returns `(mean_loss, outputs, model_state)`. `mean_loss` is the scalar to differentiate;
`outputs` maps names to per-example arrays (leading axis = the micro-batch) or to scalars (averaged over
micro-batches), and must hold 'loss' (what the non-finite guard and the train metrics read) and no 'mask' (clu
reads that name as the metrics' mask); `model_state` is the
updated non-param collections (`ctx.apply(..., train=True)` returns it; pass `ctx.model_state` through when the
model has none). Randomness comes only from `rng` (a function of seed and step), so a resumed run repeats it.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, ClassVar, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import ema

Batch = dict[str, jax.Array]
Outputs = dict[str, jax.Array]


@flax.struct.dataclass
class StepContext:
  """What a task's `prepare_batch` and `loss` see of the train state, read-only.

  `model_state`: the model's non-param collections (e.g. {'batch_stats': ...}; {} for most models);
  `extra`: the task's own state (`init_extra`); `constants`: `load_constants`'s frozen inputs; `step`: the
  optimizer step being computed (before the update).
  """
  apply_fn: Callable[..., Any] = flax.struct.field(pytree_node=False)
  model_state: Mapping[str, Any]
  extra: Any
  constants: Any
  step: jax.Array

  def apply(self, params: Any, *args: Any, train: bool, rngs: Optional[Mapping[str, jax.Array]] = None,
            **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """(model output, updated model state) of `apply_fn` with `params` and the state's collections.

    In train mode the collections (BatchNorm statistics) are mutable and come back updated, computed over the
    whole (micro-)batch whatever the mesh; in eval mode they are read only and come back unchanged.
    """
    variables = {'params': params, **self.model_state}
    if train and self.model_state:
      out, new_state = self.apply_fn(variables, *args, train=True, rngs=rngs, mutable=list(self.model_state),
                                     **kwargs)
      return out, dict(new_state)
    return self.apply_fn(variables, *args, train=train, rngs=rngs, **kwargs), dict(self.model_state)


def model_family(config: ml_collections.ConfigDict) -> str:
  """The registry family of config.model.name (it owns the layer grouping the optimizer uses)."""
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  return models.get_model_spec(config.model.name).family


def model_state_of(state: Any) -> dict[str, Any]:
  """The non-param collections a train state holds ({'batch_stats': ...} or {})."""
  return {} if getattr(state, 'batch_stats', None) is None else {'batch_stats': state.batch_stats}


class Task(abc.ABC):
  """One training objective. Subclasses set `name`, implement `loss`, and override the hooks they need.

  Instances are built by `from_config` and closed over by the jitted step (they are static: hold Python values and
  callables, never arrays that change).
  """
  name: ClassVar[str] = ''
  # Train metrics: a clu Collection built from the loss outputs plus grad_norm, learning_rate, nonfinite_updates.
  train_metrics: ClassVar[Any] = None
  # Eval metrics: a clu Collection built by `eval_step` (with a 'mask' for padding); None: no eval pass.
  eval_metrics: ClassVar[Any] = None
  # Kinds of vit_jax/evaluators/ that suit the task's features (e.g. ('knn', 'linear_probe')).
  evaluators: ClassVar[tuple[str, ...]] = ()

  # ----------------------------------------------------------------------------------------------- config
  @classmethod
  def config_defaults(cls) -> dict[str, Any]:
    """The task's own config fields and defaults, placed under `config.task.<name>` ({}: none)."""
    return {}

  @classmethod
  def check_config(cls, config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (naming the key and its fix) for a config this task cannot train; runs before anything
    is built or compiled. May build the model on shapes only (jax.eval_shape)."""

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config: ml_collections.ConfigDict, model: Any, dataset_info: Any) -> Task:
    """The task for a validated config, its model (flax module) and the dataset's `DatasetInfo`."""

  # ------------------------------------------------------------------------------------------------ state
  @classmethod
  def init_variables(cls, model: Any, rng: jax.Array, image_size: int) -> dict[str, Any]:
    """The model's initial variables: {'params': ..., and collections such as 'batch_stats'}. A classmethod:
    config validation also traces it (on shapes only) to check the model against the image size."""
    from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
    example = registry.example_input(model, image_size)  # Images, or the model's own input (video, audio).
    return dict(model.init({'params': rng}, jnp.zeros(example.shape, example.dtype), train=False))

  def init_extra(self, variables: Mapping[str, Any], rng: jax.Array) -> Any:
    """What the task adds to the train state (None: nothing). `variables` are the boxed initial variables."""
    del variables, rng
    return None

  def load_constants(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, rules: Any) -> Any:
    """Frozen per-step inputs, on the mesh (None: none). Not checkpointed: reloaded on every (re)start."""
    del config, mesh, rules
    return None

  def create_optimizer(self, config: ml_collections.ConfigDict) -> tuple[optax.GradientTransformation,
                                                                          optax.Schedule]:
    """(optimizer, learning-rate schedule) of the run; layer decay numbers the layers by the model family's own
    grouping (`FamilyFacts.grouping`)."""
    from vit_jax import optim  # pylint: disable=g-import-not-at-top
    return optim.create_optimizer(config.optimizer, config.total_steps, family=model_family(config))

  # ------------------------------------------------------------------------------------------------- step
  def prepare_batch(self, ctx: StepContext, batch: Batch, rng: jax.Array) -> Batch:
    """The global batch the loss sees (split into micro-batches after this); runs once per step."""
    del ctx, rng
    return dict(batch)

  @abc.abstractmethod
  def loss(self, ctx: StepContext, params: Any, batch: Batch,
           rng: jax.Array) -> tuple[jax.Array, Outputs, dict[str, Any]]:
    """(scalar loss to differentiate, outputs incl. per-example 'loss', updated model state); see the module
    docstring."""

  def after_update(self, state: Any, batch: Batch, outputs: Outputs) -> Any:
    """The state after the optimizer update (its step already advanced); e.g. updates `state.extra`."""
    del batch, outputs
    return state

  # ------------------------------------------------------------------------------------------------- eval
  def eval_step(self, state: Any, batch: Batch) -> Any:
    """`eval_metrics` of one eval batch; padding examples (batch['mask'] == 0) must count for nothing."""
    raise NotImplementedError(f'Task {self.name!r} has no eval step (eval_metrics is None).')

  def eval_variables(self, state: Any) -> dict[str, Any]:
    """The model variables to evaluate and to hand to evaluators."""
    return ema.eval_variables(state)

  def feature_fn(self, model: Any) -> Callable[[Mapping[str, Any], jax.Array], jax.Array]:
    """(variables, images) -> (B, D) features the evaluators (config.evals) score: default, the model's pooled
    pre-logits in inference mode. Called once per run; its result is compiled once."""
    from vit_jax import evaluators  # pylint: disable=g-import-not-at-top
    return evaluators.pre_logits_fn(model)

  # ------------------------------------------------------------------------------------------------ input
  def train_iterator(self, config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int) -> Any:
    """This process's endless train batches; must be checkpointable like input_pipeline's (exact resume)."""
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.create_train_iterator(config.dataset, global_batch_size=global_batch_size, seed=seed)

  def eval_iterator(self, config: ml_collections.ConfigDict, *, global_batch_size: int) -> Any:
    """One pass over this process's part of the eval split, padded to whole batches with a 'mask'."""
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    return input_pipeline.create_eval_iterator(config.dataset, global_batch_size=global_batch_size)


_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
  """Class decorator: makes `cls` available as config.task.name = cls.name."""
  if not cls.name:
    raise ValueError(f'{cls.__name__} needs a non-empty `name` to be registered.')
  if cls.name in _TASKS and _TASKS[cls.name] is not cls:
    raise ValueError(f'Task {cls.name!r} is registered twice ({_TASKS[cls.name].__name__} and {cls.__name__}).')
  _TASKS[cls.name] = cls
  return cls


def registered_tasks() -> dict[str, type[Task]]:
  return dict(_TASKS)
