"""The training loop: build mesh, model, task, optimizer and state; train with periodic eval and checkpoints.

One loop serves every objective: the task (`vit_jax/tasks/`, `config.task.name`) turns batches into a loss and
metrics, adds its own state (`TrainState.extra`) and updates it after each optimizer step; the loop owns the rest.
The trainer sees models only through the registry, data only through the task's iterators (the input pipeline),
and devices only through `sharding`, so each piece can change without touching this file.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Any, Callable, Iterator, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import periodic_actions
from etils import epath
from flax.training import train_state

from vit_jax import (attention_image, checkpoint, compile_options, config_schema, console, ema, finetune, guards,
                     input_pipeline, labels, metrics, models, preemption, sharding, tasks)
from vit_jax.tasks import base as task_base
from vit_jax.tasks import classification

FINAL_METRICS_FILENAME = 'final_metrics.json'


# The task of callers that name none (tests, tools): plain cross-entropy on the labels.
DEFAULT_TASK = classification.Classification()
_PREPARE_SALT = 0x6D6978  # fold_in salt of the randomness of `Task.prepare_batch` (e.g. mixup/cutmix).


class TrainState(train_state.TrainState):
  """Step, params, optimizer state, the model's BatchNorm statistics, the EMA and the task's additions.

  `batch_stats`: the model's `batch_stats` collection (None for models without BatchNorm); `ema_params` /
  `ema_batch_stats`: their EMA (None unless config.ema_decay); `extra`: what the task adds (`Task.init_extra`, e.g.
  DINO's teacher and centre; None for most). apply_fn and tx are static, so they are not checkpointed.
  """
  ema_params: Any = None
  batch_stats: Any = None
  ema_batch_stats: Any = None
  extra: Any = None


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """The registry model named by config.model.name; the other model.* keys override its hyperparameters, and
  config.dtype / remat / scan_layers set the model's compute dtype, rematerialisation policy and layer scan."""
  overrides = {k: v for k, v in config.model.items() if k != 'name'}
  # Top-level fields passed to the model when they differ from their defaults.
  for key, value, default in (('dtype', config.dtype, 'float32'), ('remat', config.remat, 'none'),
                              ('scan_layers', config.scan_layers, False)):
    if key in overrides:
      raise ValueError(f'Set config.{key}, not config.model.{key} (the trainer passes config.{key} to the model).')
    if value != default:
      if key not in models.registry.model_options(models.registry.get_model_spec(config.model.name).builder):
        raise ValueError(f'config.{key}={value!r}, but model {config.model.name!r} has no {key!r} option. '
                         f'Leave config.{key} at {default!r} for this model.')
      overrides[key] = jnp.dtype(value) if key == 'dtype' else value
  return models.create_model(config.model.name, num_classes=num_classes, **overrides)


def count_params(params: Any) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def _split_variables(variables: dict[str, Any]) -> tuple[Any, Any]:
  """(params, batch_stats or None) of a model's variables; other mutable collections are not supported."""
  variables = dict(variables)
  params, batch_stats = variables.pop('params'), variables.pop('batch_stats', None)
  if variables:
    raise ValueError(f'The model has variable collections {sorted(variables)} besides params and batch_stats; '
                     'the trainer keeps only those two. Make them params or batch_stats.')
  return params, batch_stats


def _boxed_init(model: nn.Module, tx: optax.GradientTransformation, image_size: int,
                rules: sharding.Rules, keep_ema: bool = False, task: Optional[task_base.Task] = None) -> Any:
  """key -> TrainState whose parameters, optimizer moments and param-derived task state are boxed with logical
  axis names."""
  task = task or DEFAULT_TASK

  def init(key: jax.Array) -> TrainState:
    with models.layers.logical_partitioning(), nn.logical_axis_rules(rules):
      variables = task.init_variables(model, key, image_size)
      params, batch_stats = _split_variables(variables)
      extra = task.init_extra(variables, jax.random.fold_in(key, 1))
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats, extra=extra,
                             ema_params=params if keep_ema else None,
                             ema_batch_stats=batch_stats if keep_ema else None)
  return init


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, *, image_size: int,
                         mesh: jax.sharding.Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES,
                         keep_ema: bool = False, task: Optional[task_base.Task] = None) -> tuple[TrainState, Any]:
  """The state's shapes, dtypes and shardings (jax.ShapeDtypeStruct leaves) without allocating it, and the
  shardings; e.g. to restore a checkpoint onto this mesh or to compile a step ahead of time."""
  boxed = jax.eval_shape(_boxed_init(model, tx, image_size, rules, keep_ema, task), jax.random.key(0))
  shardings = sharding.state_sharding(mesh, boxed, rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(boxed), shardings)
  return abstract, shardings


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, *, image_size: int, seed: int,
                       mesh: jax.sharding.Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES,
                       keep_ema: bool = False, task: Optional[task_base.Task] = None) -> tuple[TrainState, Any]:
  """Initialises the state directly into its shardings; also returns those shardings.

  Under the logical-axis `rules` the model's parameters come back boxed with their logical names, optax carries the
  boxes into the optimizer moments, and `sharding.state_sharding` turns them into one NamedSharding per leaf; the
  state itself is unboxed (plain arrays), so checkpoints and parameter trees keep their usual layout. `task`
  (default: classification) builds the variables and its `extra` state.
  """
  init = _boxed_init(model, tx, image_size, rules, keep_ema, task)
  _, shardings = abstract_train_state(model, tx, image_size=image_size, mesh=mesh, rules=rules, keep_ema=keep_ema,
                                      task=task)
  state = jax.jit(lambda k: nn.meta.unbox(init(k)), out_shardings=shardings)(jax.random.key(seed))
  return state, shardings


def _split_microbatches(x: jax.Array, accum_steps: int) -> jax.Array:
  """(B, ...) -> (accum_steps, B / accum_steps, ...); micro-batch i holds rows i, i + A, ..., so each one is spread
  over all devices of the batch axes like the whole batch (no data movement)."""
  x = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1)
  return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))


def _merge_microbatches(x: jax.Array) -> jax.Array:
  """Inverse of `_split_microbatches`: per-example outputs back in the batch's order; a scalar output (one per
  micro-batch) becomes its mean."""
  if x.ndim == 1:
    return x.mean()
  return x.swapaxes(0, 1).reshape((-1,) + x.shape[2:])


def compute_gradients(loss_fn: Any, params: Any, batch: dict[str, jax.Array], rng: jax.Array,
                      accum_steps: int = 1, model_state: Optional[dict[str, Any]] = None
                      ) -> tuple[Any, dict[str, jax.Array], dict[str, Any]]:
  """Gradient of the batch-mean loss, the outputs and the updated model state, over `accum_steps` micro-batches.

  `loss_fn(params, batch, rng, model_state) -> (mean loss, ({name: per-example array or scalar}, model_state))`.
  With equal micro-batches the mean of their mean-loss gradients is the whole batch's gradient, so accumulation
  changes memory, not the update. Micro-batch i draws its randomness from fold_in(rng, i) (accum_steps=1 uses `rng`
  itself) and sees the model state (BatchNorm running statistics) left by micro-batch i - 1, as a sequential
  framework's accumulation would.
  """
  grad_fn = jax.grad(loss_fn, has_aux=True)
  model_state = {} if model_state is None else model_state
  if accum_steps == 1:
    grads, (outputs, model_state) = grad_fn(params, batch, rng, model_state)
    return grads, outputs, model_state
  micro = jax.tree.map(lambda x: _split_microbatches(x, accum_steps), batch)

  def body(carry, xs):
    total, state = carry
    index, micro_batch = xs
    grads, (outputs, state) = grad_fn(params, micro_batch, jax.random.fold_in(rng, index), state)
    return (jax.tree.map(jnp.add, total, grads), state), outputs

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (total, model_state), outputs = jax.lax.scan(body, (zeros, model_state), (jnp.arange(accum_steps), micro))
  grads = jax.tree.map(lambda g, p: (g / accum_steps).astype(p.dtype), total, params)
  return grads, jax.tree.map(_merge_microbatches, outputs), model_state


def _update_ema(state: TrainState, decay: float) -> TrainState:
  """The EMA of params and batch_stats after an update (see vit_jax/ema.py)."""
  state = state.replace(ema_params=ema.update(state.ema_params, state.params, decay))
  if state.ema_batch_stats is not None:
    state = state.replace(ema_batch_stats=ema.update(state.ema_batch_stats, state.batch_stats, decay))
  return state


def train_step(state: TrainState, batch: dict[str, jax.Array], constants: Any = None, *,
               dropout_key: jax.Array, schedule: optax.Schedule, accum_steps: int = 1,
               task: Optional[task_base.Task] = None, ema_decay: float = 0.0,
               skip_nonfinite: bool = False) -> tuple[TrainState, Any]:
  """One optimizer update of `task`'s loss (over `accum_steps` micro-batches), then the task's `after_update`;
  all randomness depends only on (seed, step). `constants` are the task's frozen inputs (`Task.load_constants`,
  e.g. the distillation teacher); `task` defaults to plain classification.

  With `skip_nonfinite`, a step whose loss, gradient norm or updated parameters are nan/inf keeps the previous state
  (params, optimizer state, batch_stats, EMA and the task's `extra`; only the step advances); either way the step
  is counted in `nonfinite_updates`.
  """
  task = task or DEFAULT_TASK
  step_key = jax.random.fold_in(dropout_key, state.step)
  ctx = task_base.StepContext(apply_fn=state.apply_fn, model_state=task_base.model_state_of(state),
                              extra=state.extra, constants=constants, step=state.step)
  work = task.prepare_batch(ctx, batch, jax.random.fold_in(step_key, _PREPARE_SALT))

  def loss_fn(params, micro_batch, rng, model_state):
    loss, outputs, model_state = task.loss(ctx.replace(model_state=model_state), params, micro_batch, rng)
    return loss, (outputs, model_state)

  grads, outputs, model_state = compute_gradients(loss_fn, state.params, work, step_key, accum_steps,
                                                  ctx.model_state)
  new_state = state.apply_gradients(grads=grads)
  if state.batch_stats is not None:
    new_state = new_state.replace(batch_stats=model_state['batch_stats'])
  new_state = task.after_update(new_state, work, outputs)
  if ema_decay:
    new_state = _update_ema(new_state, ema_decay)
  grad_norm = optax.global_norm(grads)
  # The updated params too: a finite gradient times a huge learning rate can still overflow them (one reduction).
  finite = guards.is_finite(outputs['loss'], grad_norm, optax.global_norm(new_state.params))
  if skip_nonfinite:
    new_state = guards.keep_if_finite(finite, new_state, state)
  step_metrics = task.train_metrics.single_from_model_output(
      **outputs, grad_norm=grad_norm, learning_rate=schedule(state.step),
      nonfinite_updates=(~finite).astype(jnp.int32))
  return new_state, step_metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, task: Optional[task_base.Task] = None) -> Any:
  """The task's metrics of one eval batch (default: classification); padding examples (mask 0) count for
  nothing."""
  return (task or DEFAULT_TASK).eval_step(state, batch)


def evaluate(eval_fn, state: TrainState, batches: Iterator[dict[str, np.ndarray]], mesh: jax.sharding.Mesh,
             num_classes: int) -> dict[str, float]:
  """Runs `eval_fn` over one full pass of the eval split and returns `eval_*` scalars."""
  totals: Optional[metrics.EvalMetrics] = None
  for batch in batches:
    batch_metrics = eval_fn(state, sharding.shard_batch(batch, mesh))
    totals = batch_metrics if totals is None else totals.merge(batch_metrics)
  if totals is None:
    raise ValueError('The eval split produced no batches; check config.dataset.eval_split.')
  return metrics.to_scalars(totals, 'eval', num_classes=num_classes)


@dataclasses.dataclass
class LoopRecord:
  """The loop's own state, checkpointed with the train state so a resumed run reports exactly the same metrics.

  `final`: the latest train/eval scalars (what final_metrics.json reports); `train_metrics`: the train metrics
  accumulated since the last log; `nonfinite_updates`: non-finite steps so far (skipped in skip mode).
  """
  final: dict[str, Any] = dataclasses.field(default_factory=dict)
  train_metrics: Optional[metrics.TrainMetrics] = None
  nonfinite_updates: int = 0

  def to_json(self) -> dict[str, Any]:
    return {'final': self.final, 'train_metrics': metrics.collection_to_json(self.train_metrics),
            'nonfinite_updates': self.nonfinite_updates}

  @classmethod
  def from_json(cls, data: dict[str, Any], train_metrics: Any = metrics.TrainMetrics) -> LoopRecord:
    """The record saved by `to_json`; `train_metrics` is the task's train-metrics collection class."""
    return cls(final=dict(data.get('final', {})),
               train_metrics=metrics.collection_from_json(train_metrics.empty(), data.get('train_metrics')),
               nonfinite_updates=int(data.get('nonfinite_updates', 0)))


@dataclasses.dataclass
class RunSetup:
  """What a run builds before its first step; the same for training, the benchmark and the evaluators.

  `state` is freshly initialised into `state_shardings` (or, from `setup_run(..., abstract=True)`, its
  jax.ShapeDtypeStruct leaves, e.g. to restore a checkpoint without allocating the initial state).
  """
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  rules: sharding.Rules
  dataset_info: input_pipeline.DatasetInfo
  model: nn.Module
  task: task_base.Task
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state: TrainState
  state_shardings: Any


def setup_run(config: ml_collections.ConfigDict, *, devices: Optional[Any] = None,
              abstract: bool = False) -> RunSetup:
  """Mesh, logical-axis rules, dataset info, model, task, optimizer and the sharded train state of a validated
  config (`config_schema.validate_config`; this does not validate again). `devices`: the mesh's devices (default
  all)."""
  mesh = sharding.create_mesh(config.mesh, devices=devices)
  rules = sharding.logical_rules(config.sharding_rules)
  sharding.check_global_batch(config.batch_size, mesh, config.accum_steps)
  info = input_pipeline.get_dataset_info(config.dataset)
  model = build_model(config, info.num_classes)
  task = tasks.from_config(config, model, info)
  tx, schedule = task.create_optimizer(config)
  options = dict(image_size=config.dataset.image_size, mesh=mesh, rules=rules, keep_ema=bool(config.ema_decay),
                 task=task)
  if abstract:
    state, shardings = abstract_train_state(model, tx, **options)
  else:
    state, shardings = create_train_state(model, tx, seed=config.seed, **options)
  return RunSetup(config=config, mesh=mesh, rules=rules, dataset_info=info, model=model, task=task, tx=tx,
                  schedule=schedule, state=state, state_shardings=shardings)


def _init_from(config: ml_collections.ConfigDict, run: RunSetup, state: TrainState) -> TrainState:
  """`state` with its params and BatchNorm statistics (and their EMA) replaced by those of config.init_from."""
  logging.info('Initialising weights from %s.', config.init_from)
  init = {'params': sharding.to_host(state.params)}
  if state.batch_stats is not None:
    init['batch_stats'] = sharding.to_host(state.batch_stats)
  loaded = finetune.load_variables(config.init_from, init, reinit_head=config.init_reinit_head,
                                   posemb_interpolation=config.init_posemb_interpolation, model=run.model)
  params = jax.device_put(loaded['params'], run.state_shardings.params)
  state = state.replace(params=params, ema_params=params if config.ema_decay else None)
  if state.batch_stats is not None:
    stats = jax.device_put(loaded['batch_stats'], run.state_shardings.batch_stats)
    state = state.replace(batch_stats=stats, ema_batch_stats=stats if config.ema_decay else None)
  return state


def periodic_evaluators(config: ml_collections.ConfigDict,
                        run: RunSetup) -> Optional[Callable[[int, TrainState], dict[str, float]]]:
  """(step, state) -> {'<name>/<metric>': value} of the config.evals evaluators due after `step` (None when
  config.evals is empty). They score the task's features (`Task.feature_fn`) of its eval variables."""
  if not config.evals:
    return None
  from vit_jax import evaluators  # pylint: disable=g-import-not-at-top
  feature_fn = run.task.feature_fn(run.model)
  entries = evaluators.build_evaluators(config.evals)  # Once: the step loop only asks whether one is due.

  def run_due(step: int, state: TrainState) -> dict[str, float]:
    if not any(e.is_due(step, config.total_steps) for e in entries.values()):
      return {}
    return evaluators.run_periodic(config.evals, step=step, total_steps=config.total_steps, feature_fn=feature_fn,
                                   variables=run.task.eval_variables(state), dataset_config=config.dataset,
                                   batch_size=config.batch_size, mesh=run.mesh,
                                   num_classes=run.dataset_info.num_classes)
  return run_due


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds this run) and returns the final metrics.

  On SIGTERM or Ctrl-C (or the multi-host preemption sync point) it checkpoints the current step and returns
  {'preempted_at_step': step} without writing final_metrics.json; rerunning resumes exactly where it stopped. A
  signal before training starts returns {'preempted_at_step': step} as well, having written nothing new.
  """
  with preemption.PreemptionWatcher() as preempted:
    return _train_and_evaluate(config, workdir, preempted)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        preempted: preemption.PreemptionWatcher) -> dict[str, Any]:
  config_schema.validate_config(config, num_devices=jax.device_count())  # Before anything is built or compiled.
  final_path = epath.Path(workdir) / FINAL_METRICS_FILENAME
  run = setup_run(config)
  state, state_shardings, mesh, task, info = run.state, run.state_shardings, run.mesh, run.task, run.dataset_info
  logging.info('Task %s; model %s: %s parameters, %d classes; mesh %s; compute dtype %s.', task.name,
               config.model.name, f'{count_params(state.params):,}', info.num_classes, dict(mesh.shape),
               config.dtype)
  # Everything that can fail on bad input is built before the workdir is claimed (config.json written), so a typo
  # (a dataset option, an init_from or teacher path) never blocks the fixed rerun: the data, the initial weights
  # and the task's constants (e.g. the distillation teacher).
  # The iterator's position is part of every checkpoint, so a resumed run draws exactly the batches it would have.
  train_iter = task.train_iterator(config, global_batch_size=config.batch_size, seed=config.seed)
  if config.init_from and not checkpoint.has_checkpoints(workdir):  # A resumed run restores its own weights.
    state = _init_from(config, run, state)
  constants = task.load_constants(config, mesh, run.rules)
  if preempted.requested:
    logging.warning('Stopped by %s before training started; nothing was written.', preempted.reason)
    return {'preempted_at_step': 0}

  with checkpoint.WorkdirLock(workdir):  # One run per workdir (process 0 holds it for a multi-host run).
    resuming = checkpoint.claim_workdir(workdir, config, defaults=config_schema.base_config())
    labels.record_class_names(workdir, config.dataset)  # For predict/visualize on machines without the dataset.
    return _train_claimed(config, workdir, run, state, train_iter, constants, resuming, final_path, preempted)


def _train_claimed(config: ml_collections.ConfigDict, workdir: str, run: RunSetup, state: TrainState,
                   train_iter: Any, constants: Any, resuming: bool, final_path: epath.Path,
                   preempted: preemption.PreemptionWatcher) -> dict[str, Any]:
  """The loop of `train_and_evaluate`, in a workdir this process holds and has claimed."""
  state_shardings, mesh, task, info = run.state_shardings, run.mesh, run.task, run.dataset_info
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  preempted.set_sync_point(ckpt.reached_preemption)
  start_step, loop = 0, LoopRecord()
  try:
    restored = ckpt.restore_latest_valid(state, data_iterator=train_iter)
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state, start_step = restored.state, int(restored.state.step)
    loop = LoopRecord.from_json(restored.loop, task.train_metrics)
    if not restored.data_restored:  # Position not restored (older checkpoint, other process count): no replay.
      train_iter = task.train_iterator(config, global_batch_size=config.batch_size,
                                       seed=config.seed + 1_000_003 * start_step)
    logging.info('Resumed from step %d of %d.', start_step, config.total_steps)
  elif resuming:
    logging.info('Workdir %s has this config but no usable checkpoint; starting from step 0.', workdir)
  if start_step >= config.total_steps and final_path.exists():
    logging.info('Run already complete at step %d; %s is unchanged.', start_step, final_path)
    ckpt.close()
    return checkpoint.read_json(final_path)
  if preempted.requested:
    ckpt.close()
    logging.warning('Stopped by %s before the first step; the workdir is as it was (step %d).', preempted.reason,
                    start_step)
    return {'preempted_at_step': start_step}

  writer = metrics.create_writer(workdir)
  if start_step == 0:
    metrics.write_hparams(writer, config.to_dict())
  batch_spec = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  dropout_key = jax.random.fold_in(jax.random.key(config.seed), 1)
  constants_sharding = jax.tree.map(lambda x: x.sharding, constants)
  p_train_step = jax.jit(
      sharding.with_activation_sharding(
          functools.partial(train_step, dropout_key=dropout_key, schedule=run.schedule,
                            accum_steps=config.accum_steps, task=task, ema_decay=config.ema_decay,
                            skip_nonfinite=config.on_nonfinite == 'skip'),
          mesh, run.rules),
      in_shardings=(state_shardings, batch_spec, constants_sharding), out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  p_eval_step = compile_options.jit_inference(
      sharding.with_activation_sharding(functools.partial(eval_step, task=task), mesh, run.rules),
      in_shardings=(state_shardings, batch_spec), out_shardings=replicated)

  has_eval = task.eval_metrics is not None
  run_eval = functools.partial(evaluate, p_eval_step, mesh=mesh, num_classes=info.num_classes)
  new_eval_iter = functools.partial(task.eval_iterator, config, global_batch_size=config.batch_size)
  run_evaluators = periodic_evaluators(config, run)
  rollout_image = (attention_image.RolloutImage.of_first_example(run.model, new_eval_iter(), mesh)
                   if config.rollout_image and (has_eval or run_evaluators is not None) else None)
  report_progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  monitor = guards.NonFiniteMonitor(config.on_nonfinite, workdir)
  last_saved = start_step if restored is not None else None
  progress = console.TrainConsole(total_steps=config.total_steps, start_step=start_step, batch_size=config.batch_size,
                                  workdir=workdir, writer=writer, checkpoint_dir=str(ckpt.directory),
                                  is_main=jax.process_index() == 0)

  def record(step: int, scalars: dict[str, float]) -> None:
    """Writes scalars to TensorBoard and keeps them for final_metrics.json."""
    writer.write_scalars(step, scalars)
    loop.final.update(scalars)

  def record_rollout_image(step: int, state: TrainState) -> None:
    """After an eval: the attention rollout of the fixed eval example to TensorBoard (models that have one)."""
    image = rollout_image(task.eval_variables(state)) if rollout_image is not None else None
    if image is not None:
      writer.write_images(step, {'attention_rollout': image[None]})

  start_time = time.time()
  try:
    for step in range(start_step + 1, config.total_steps + 1):
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, step_metrics = p_train_step(state, sharding.shard_batch(next(train_iter), mesh), constants)
      monitor.add(step, step_metrics.nonfinite_updates.total)
      loop.train_metrics = step_metrics if loop.train_metrics is None else loop.train_metrics.merge(step_metrics)
      report_progress(step, time.time())
      is_last = step == config.total_steps
      if step % config.log_every == 0 or is_last:
        monitor.check(last_saved)
        scalars = metrics.to_scalars(loop.train_metrics, 'train', num_classes=info.num_classes)
        record(step, scalars)
        progress.train(step, scalars)
        loop.nonfinite_updates += int(scalars['train_nonfinite_updates'])
        loop.train_metrics = None
      eval_due = has_eval and ((config.eval_every and step % config.eval_every == 0) or is_last)
      if eval_due:
        monitor.check(last_saved)
        eval_scalars = run_eval(state, new_eval_iter())
        record(step, eval_scalars)
        progress.eval(step, eval_scalars)
      scalars = run_evaluators(step, state) if run_evaluators is not None else {}  # Only those due now.
      if scalars:
        monitor.check(last_saved)
        record(step, scalars)
        progress.eval(step, scalars)
      if eval_due or scalars:
        record_rollout_image(step, state)
      stop = preempted(step) and not is_last
      if step % config.checkpoint_every == 0 or is_last or stop:
        monitor.check(last_saved)  # Never save a non-finite state (stop mode).
        ckpt.save(step, state, data_iterator=train_iter, loop=loop.to_json())
        last_saved = step
      if stop:
        ckpt.wait_until_finished()
        writer.flush()
        logging.warning('Preempted (%s) at step %d of %d: checkpoint %s saved. Rerun the same command to resume.',
                        preempted.reason, step, config.total_steps, ckpt.step_dir(step))
        return {'preempted_at_step': step}
  finally:
    ckpt.close()

  final = loop.final
  if has_eval and start_step >= config.total_steps and 'eval_loss' not in final:  # Old checkpoint, no loop record.
    final.update(run_eval(state, new_eval_iter()))
  writer.flush()
  final.update(step=int(state.step), num_params=count_params(state.params), nonfinite_updates=loop.nonfinite_updates,
               train_seconds=round(time.time() - start_time, 2), resumed_from_step=start_step)
  if info.skipped_files is not None:  # image_folder: how many undecodable files the dataset left out.
    final['dataset_skipped_files'] = info.skipped_files
  if jax.process_index() == 0:  # Atomic: a kill -9 never leaves a truncated final_metrics.json.
    checkpoint.write_text_atomic(final_path, json.dumps(final, indent=2, sort_keys=True))
  progress.summary(final, str(final_path))
  return final
