"""The task seam (vit_jax/tasks/): the registry, config sections and checks, and what the loop gives every task.

A toy task defined here (registered only for the test that uses it) adds state derived from the params (an EMA
"teacher" and a counter), a post-update hook and a scalar output, so the loop's contract is checked against its
definition: the additions are sharded like the student, updated after every optimizer step, kept by a skipped
non-finite step, and accumulation gives the same update.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vit_jax import config_schema, metrics, models, optim, sharding, tasks, train
from vit_jax.tasks import base, classification

IMAGE, CLASSES = 8, 4
TINY = dict(hidden_size=16, num_heads=2, mlp_dim=32, num_layers=1, patch_size=4)


def test_registry_names_tasks_and_defaults_to_classification():
  assert tasks.get_task('classification') is classification.Classification
  assert 'classification' in tasks.list_tasks()
  with pytest.raises(ValueError, match=r"'nope' is not a known task.*classification"):
    tasks.get_task('nope')
  config = config_schema.base_config()
  assert config.task.name == 'classification'
  assert tasks.task_name(ml_collections.ConfigDict({'model': {'name': 'vit_pico'}})) == 'classification'


def test_task_config_is_validated():
  config = config_schema.base_config()
  config.task.nmae = 'mae'
  with pytest.raises(ValueError, match=r'Unknown config key\(s\): task.nmae'):
    config_schema.validate_config(config)
  config = config_schema.base_config()
  config.task.name = 'nope'
  with pytest.raises(ValueError, match=r"config.task.name='nope' is not a known task"):
    config_schema.validate_config(config)


def test_classification_checks_its_teacher_before_building():
  config = config_schema.base_config()
  config.distill.type = 'soft'
  with pytest.raises(ValueError, match=r"distill.type='soft' needs a teacher.*distill.init_from"):
    config_schema.validate_config(config)


@base.register_task
@dataclasses.dataclass(frozen=True)
class _ToyTeacherTask(base.Task):
  """Cross-entropy plus a teacher that follows the student: teacher <- 0.5 teacher + 0.5 params after each update."""
  name = '_toy_teacher'
  train_metrics = metrics.LossTrainMetrics

  @classmethod
  def from_config(cls, config, model, dataset_info):
    return cls()

  def init_extra(self, variables, rng):
    teacher = jax.tree.map(lambda p: p, variables['params'])  # Keeps the boxes: sharded like the student.
    return {'teacher': teacher, 'updates': jnp.zeros((), jnp.int32)}

  def loss(self, ctx, params, batch, rng):
    logits, model_state = ctx.apply(params, batch['image'], train=True, rngs={'dropout': rng})
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
    return loss.mean(), {'loss': loss, 'logit_mean': logits.mean()}, model_state

  def after_update(self, state, batch, outputs):
    teacher = jax.tree.map(lambda t, p: 0.5 * t + 0.5 * p, state.extra['teacher'], state.params)
    return state.replace(extra={'teacher': teacher, 'updates': state.extra['updates'] + 1})


@pytest.fixture
def toy_task():
  """The toy task, registered for one test only, so the registry-wide tests do not see it."""
  base._TASKS[_ToyTeacherTask.name] = _ToyTeacherTask  # pylint: disable=protected-access
  yield _ToyTeacherTask()
  base._TASKS.pop(_ToyTeacherTask.name)  # pylint: disable=protected-access


base._TASKS.pop(_ToyTeacherTask.name)  # pylint: disable=protected-access  (registered by the fixture only)


def _run(task, mesh, batches, *, accum_steps=1, skip_nonfinite=False):
  model = models.create_model('vit_pico', num_classes=CLASSES, **TINY)
  opt = config_schema.base_config().optimizer
  opt.update(name='sgd', lr=0.1, warmup_steps=0, b1=0.0, grad_clip_norm=0.0)
  tx, schedule = optim.create_optimizer(opt, 10)
  state, shardings = train.create_train_state(model, tx, image_size=IMAGE, seed=0, mesh=mesh, task=task)
  step = jax.jit(sharding.with_activation_sharding(
      functools.partial(train.train_step, dropout_key=jax.random.key(1), schedule=schedule, task=task,
                        accum_steps=accum_steps, skip_nonfinite=skip_nonfinite), mesh, sharding.DEFAULT_RULES),
      in_shardings=(shardings, sharding.batch_sharding(mesh)), out_shardings=(shardings, None))
  states, step_metrics = [state], []
  for batch in batches:
    state, m = step(state, sharding.shard_batch(batch, mesh))
    states.append(state)
    step_metrics.append(m)
  return states, step_metrics, shardings


def _batches(n, size=8):
  rng = np.random.default_rng(0)
  return [{'image': rng.normal(size=(size, IMAGE, IMAGE, 3)).astype(np.float32),
           'label': rng.integers(0, CLASSES, size=(size,)).astype(np.int32)} for _ in range(n)]


def _close(a, b, **kw):
  jax.tree.map(functools.partial(np.testing.assert_allclose, **kw), jax.device_get(a), jax.device_get(b))


def test_task_state_is_sharded_updated_and_kept_by_skipped_steps(toy_task):
  mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 8, 'tensor': 1}))
  batches = _batches(2)
  bad = {**batches[1], 'image': np.full_like(batches[1]['image'], np.nan)}
  states, step_metrics, shardings = _run(toy_task, mesh, [batches[0], bad, batches[1]], skip_nonfinite=True)
  # The teacher is split over 'fsdp' exactly like the student's params.
  assert jax.tree.map(lambda s: s.spec, shardings.extra['teacher']) == jax.tree.map(lambda s: s.spec,
                                                                                   shardings.params)
  kernel = shardings.params['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0']['kernel']
  assert 'fsdp' in str(kernel.spec)
  # after_update ran after each good update: teacher_k = 0.5 teacher_{k-1} + 0.5 params_k.
  s0, s1, s2, s3 = states
  _close(s1.extra['teacher'], jax.tree.map(lambda t, p: 0.5 * t + 0.5 * p, s0.extra['teacher'], s1.params),
         rtol=1e-6, atol=1e-7)
  # The non-finite step changed nothing but the step counter: params, optimizer state and extra are kept.
  assert int(s2.step) == 2 and int(s2.extra['updates']) == 1
  assert int(step_metrics[1].compute()['nonfinite_updates']) == 1
  _close(s2.extra, s1.extra, rtol=0, atol=0)
  _close(s2.params, s1.params, rtol=0, atol=0)
  assert int(s3.extra['updates']) == 2
  # The toy task's metrics have no accuracy (LossTrainMetrics).
  assert set(step_metrics[0].compute()) == {'loss', 'grad_norm', 'learning_rate', 'nonfinite_updates'}


def test_accumulation_gives_the_same_task_update(toy_task):
  """Two micro-batches make the same update (params and extra) as the whole batch; scalar outputs are averaged."""
  mesh = sharding.create_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1}),
                              devices=jax.devices()[:1])
  batches = _batches(2)
  whole, whole_metrics, _ = _run(toy_task, mesh, batches)
  split, split_metrics, _ = _run(toy_task, mesh, batches, accum_steps=2)
  _close(split[-1].params, whole[-1].params, rtol=1e-5, atol=1e-6)
  _close(split[-1].extra, whole[-1].extra, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(split_metrics[0].compute()['loss']), float(whole_metrics[0].compute()['loss']),
                             rtol=1e-5)


@pytest.mark.slow
def test_periodic_evaluators_run_when_due_and_reach_final_metrics(digits_data_dir, tmp_path, monkeypatch):
  """config.evals.knn with every=2 in a 4-step run: it runs after steps 2 and 4 on the task's eval variables, and
  its last scalars are in final_metrics.json."""
  from vit_jax import evaluators  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  ran = []
  original = evaluators.run_periodic

  def recording(*args, **kwargs):
    scalars = original(*args, **kwargs)
    if scalars:
      ran.append((kwargs['step'], scalars))
    return scalars

  monkeypatch.setattr(evaluators, 'run_periodic', recording)
  config = tiny_config(digits_data_dir, total_steps=4, log_every=2, eval_every=0, checkpoint_every=4,
                       **{'optimizer.warmup_steps': 1})
  config.evals.knn = ml_collections.ConfigDict({'type': 'knn', 'every': 2, 'k': 5})
  final = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert [step for step, _ in ran] == [2, 4]
  assert final['knn/top1'] == ran[-1][1]['knn/top1'] and 0.0 <= final['knn/top1'] <= 1.0
