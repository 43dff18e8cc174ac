"""The DINO task in the loop: config checks, its optimizer (per-parameter clipping, frozen last layer), the teacher
EMA and centre after an update, and a short run through `python -m vit_jax.main` that resumes exactly."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_jax import config_schema, input_pipeline, train
from vit_jax.tasks import dino

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _digits_config(data_dir=None):
  sys.path.insert(0, str(ROOT))
  from configs import dino_digits  # pylint: disable=g-import-not-at-top
  config = dino_digits.get_config()
  if data_dir:
    config.dataset.data_dir = data_dir
  return config


@pytest.mark.parametrize('change,match', [
    (lambda c: setattr(c, 'model', ml_collections.ConfigDict({'name': 'vit_pico'})),
     r"needs a model with a DINO head, but config.model.name='vit_pico'.*dino_vit_s16"),
    (lambda c: c.dataset.update(train_crop='inception'), r"set config.dataset.train_crop='multicrop'"),
    (lambda c: c.dataset.update(local_image_size=10), r'local_image_size=10 is not divisible by the patch size 4'),
    (lambda c: c.task.dino.update(teacher_temp=0.0), r'task.dino.teacher_temp=0.0 must be > 0'),
    (lambda c: c.task.dino.update(center_momentum=1.0), r'center_momentum=1.0 in \[0, 1\)'),
])
def test_bad_dino_configs_fail_before_building(change, match):
  config = _digits_config()
  change(config)
  with pytest.raises(ValueError, match=match):
    config_schema.validate_config(config)


def test_collapse_diagnostics_tell_the_two_collapses_apart():
  k, temp = 64, 0.04
  center = jnp.zeros((1, k))
  # Uniform collapse: every teacher output equal, so after centring each image's distribution is uniform.
  flat = jnp.ones((2, 8, k))
  d = dino.collapse_diagnostics(flat, center, jnp.float32(np.log(k)), teacher_temp=temp)
  assert float(d['teacher_entropy']) == pytest.approx(np.log(k), rel=1e-5)
  assert float(d['teacher_batch_entropy']) == pytest.approx(np.log(k), rel=1e-5)
  assert abs(float(d['kl'])) < 1e-4  # A uniform student matches it.
  # One-prototype collapse: every image puts its mass on prototype 3.
  spike = jnp.zeros((2, 8, k)).at[..., 3].set(1.0)
  d = dino.collapse_diagnostics(spike, center, jnp.float32(0.5), teacher_temp=temp)
  assert float(d['teacher_entropy']) < 0.01 and float(d['teacher_batch_entropy']) < 0.01
  # Healthy: each image sharp on its own prototype, the batch spread over many.
  own = jnp.zeros((2, 8, k)).at[:, jnp.arange(8), jnp.arange(8)].set(1.0)
  d = dino.collapse_diagnostics(own, center, jnp.float32(1.0), teacher_temp=temp)
  assert float(d['teacher_entropy']) < 0.01 and float(d['teacher_batch_entropy']) == pytest.approx(np.log(8), rel=1e-3)
  # kl is the loss minus the teacher entropy: the cross-entropy's decomposition, against dino_loss itself.
  rng = np.random.RandomState(0)
  teacher, student = jnp.asarray(rng.randn(2, 8, k)), jnp.asarray(rng.randn(4, 8, k))
  loss, _ = dino.dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=temp, center_momentum=0.9)
  d = dino.collapse_diagnostics(teacher, center, loss, teacher_temp=temp)
  log_p = jax.nn.log_softmax(teacher / temp, axis=-1)
  log_q = jax.nn.log_softmax(student / 0.1, axis=-1)
  kl = [jnp.mean(jnp.sum(jnp.exp(log_p[i]) * (log_p[i] - log_q[v]), axis=-1))
        for i in range(2) for v in range(4) if v != i]
  assert float(d['kl']) == pytest.approx(float(np.mean(kl)), rel=1e-4)


def test_optimizer_clips_each_parameter_and_freezes_the_last_layer():
  config = _digits_config()
  config.optimizer.update(name='sgd', b1=0.0, lr=1.0, schedule='constant', warmup_steps=0, weight_decay=0.1,
                          weight_decay_end=None)
  task = dino.Dino(out_dim=4, total_steps=10, steps_per_epoch=2, freeze_last_layer_epochs=1, clip_grad=3.0)
  tx, _ = task.create_optimizer(config)
  params = {'dino_head': {'last_layer': {'kernel': jnp.ones((2, 4))}, 'Dense_0': {'bias': jnp.ones(4)}},
            'embedding': {'kernel': jnp.ones((3,))}}
  grads = {'dino_head': {'last_layer': {'kernel': jnp.full((2, 4), 10.0)}, 'Dense_0': {'bias': jnp.full(4, 0.5)}},
           'embedding': {'kernel': jnp.asarray([30.0, 40.0, 0.0])}}
  state = tx.init(params)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    # Each parameter's gradient norm is clipped to 3 on its own (the bias, norm 1, is left alone); sgd lr 1; wd on
    # kernels only.
    np.testing.assert_allclose(updates['embedding']['kernel'], -(np.array([1.8, 2.4, 0.0]) + 0.1), rtol=1e-5)
    np.testing.assert_allclose(updates['dino_head']['Dense_0']['bias'], -0.5, rtol=1e-6)
    last = np.asarray(updates['dino_head']['last_layer']['kernel'])
    if step < 2:  # Epoch 0 (2 steps): no update at all, not even weight decay.
      assert np.all(last == 0)
    else:
      np.testing.assert_allclose(last, -(3.0 / np.sqrt(8) + 0.1), rtol=1e-5)


@flax.struct.dataclass
class _State:
  step: jax.Array
  params: dict
  extra: dict


def test_after_update_moves_teacher_and_centre():
  task = dino.Dino(out_dim=3, total_steps=10, momentum_teacher=0.9, center_momentum=0.8)
  student, teacher = {'w': jnp.full((2,), 1.0)}, {'w': jnp.full((2,), 3.0)}
  outputs = jnp.arange(12, dtype=jnp.float32).reshape(2, 2, 3)  # (B, 2 views, K) as prepare_batch stores them
  state = _State(step=jnp.asarray(4), params=student, extra={'teacher': teacher, 'center': jnp.ones((1, 3))})
  new = task.after_update(state, {'teacher': outputs}, {})
  m = 1.0 + 0.5 * (0.9 - 1.0) * (1 + np.cos(np.pi * 3 / 10))  # DINO's momentum schedule at the step just made.
  np.testing.assert_allclose(new.extra['teacher']['w'], m * 3.0 + (1 - m) * 1.0, rtol=1e-6)
  np.testing.assert_allclose(new.extra['center'], 0.8 * 1.0 + 0.2 * np.arange(12).reshape(4, 3).mean(0)[None],
                             rtol=1e-6)
  np.testing.assert_array_equal(new.params['w'], student['w'])


def _restore(workdir, step):
  return ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(step) / 'default')


@pytest.mark.slow
def test_cli_run_and_exact_resume(digits_data_dir, tmp_path, monkeypatch):
  """4 steps through the CLI; the same run preempted at step 2 and resumed ends bitwise equal (student, teacher,
  centre, optimizer state) with the same final metrics."""
  overrides = ['--config.total_steps=4', '--config.checkpoint_every=2', '--config.log_every=2',
               '--config.optimizer.warmup_steps=1', f'--config.dataset.data_dir={digits_data_dir}']
  ref = tmp_path / 'cli'
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/dino_digits.py',
                         f'--workdir={ref}', *overrides], cwd=ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  ref_final = json.loads((ref / 'final_metrics.json').read_text())
  assert ref_final['step'] == 4 and np.isfinite(ref_final['train_loss']) and 'eval_accuracy' not in ref_final
  assert 0 <= ref_final['train_teacher_entropy'] <= np.log(_digits_config().model.out_dim) + 1e-3
  assert np.isfinite(ref_final['train_kl']) and 'train_teacher_batch_entropy' in ref_final

  config = _digits_config(digits_data_dir)
  config.total_steps, config.checkpoint_every, config.log_every, config.optimizer.warmup_steps = 4, 2, 2, 1
  original = input_pipeline.create_train_iterator
  drawn = []

  class Preempt:  # SIGTERM when the 2nd batch is drawn: the loop checkpoints step 2 and returns.
    def __init__(self, inner):
      self.inner = inner

    def __iter__(self):
      return self

    def __next__(self):
      drawn.append(1)
      if len(drawn) == 2:
        os.kill(os.getpid(), signal.SIGTERM)
      return next(self.inner)

    def get_state(self):
      return self.inner.get_state()

    def set_state(self, s):
      self.inner.set_state(s)

  monkeypatch.setattr(input_pipeline, 'create_train_iterator', lambda *a, **k: Preempt(original(*a, **k)))
  run = tmp_path / 'resumed'
  assert train.train_and_evaluate(config, str(run)) == {'preempted_at_step': 2}
  monkeypatch.undo()
  final = train.train_and_evaluate(config, str(run))
  assert final['resumed_from_step'] == 2
  strip = lambda d: {k: v for k, v in d.items() if k not in ('train_seconds', 'resumed_from_step')}
  assert strip(final) == strip(ref_final)
  a, b = _restore(ref, 4), _restore(run, 4)
  assert set(a['extra']) == {'teacher', 'center'} and a['extra']['center'].shape == (1, 256)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  teacher, student = a['extra']['teacher'], a['params']
  assert jax.tree.structure(teacher) == jax.tree.structure(student) and 'head' not in student
  assert any(np.abs(np.asarray(t) - np.asarray(s)).max() > 0 for t, s in zip(jax.tree.leaves(teacher),
                                                                              jax.tree.leaves(student)))


def test_saved_metrics_of_other_fields_restart_the_logging_window():
  """A checkpoint written before the collapse signals existed holds LossTrainMetrics: resuming it under
  DinoTrainMetrics drops that window's running means (with a warning) instead of failing; equal fields round-trip."""
  from vit_jax import metrics  # pylint: disable=g-import-not-at-top
  outputs = dict(loss=jnp.float32(2.0), grad_norm=jnp.float32(1.0), learning_rate=jnp.float32(0.1),
                 nonfinite_updates=jnp.int32(0))
  old = metrics.collection_to_json(metrics.LossTrainMetrics.single_from_model_output(**outputs))
  assert metrics.collection_from_json(dino.DinoTrainMetrics.empty(), old) is None
  new = dino.DinoTrainMetrics.single_from_model_output(**outputs, teacher_entropy=jnp.float32(3.0),
                                                        teacher_batch_entropy=jnp.float32(4.0), kl=jnp.float32(0.5))
  back = metrics.collection_from_json(dino.DinoTrainMetrics.empty(), metrics.collection_to_json(new))
  assert {k: float(v) for k, v in back.compute().items()} == {k: float(v) for k, v in new.compute().items()}
