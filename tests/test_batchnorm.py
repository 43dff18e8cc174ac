"""BatchNorm in the trainer: the state holds `batch_stats`, computes them over the whole global batch on every
mesh, evaluates with the running averages, averages them in the EMA, and carries them through checkpoints, exact
resume and init_from.

A tiny BatchNorm model is defined here and registered only while this module's tests run, so the registry-wide
tests never see it. Its first layer normalises the input pixels, so the running statistics after one step have a
closed form in the batch: mean = 0.1 * batch mean, var = 0.9 + 0.1 * batch variance (flax momentum 0.9, biased
batch variance).
"""
import functools
import os
import signal

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from vit_jax import checkpoint, config_schema, finetune, metrics, optim, sharding, train
from vit_jax.models import facts, layers, registry
from tests.test_reliability import _assert_bitwise_equal, _hook_iterator, _same_metrics
from tests.test_train import tiny_config

NAME = '_test_tiny_bn'
IMAGE, CLASSES, WIDTH = 16, 10, 16
MESHES = {'1 device': ((1, 1, 1), 1), 'data8': ((8, 1, 1), 8), 'fsdp8': ((1, 8, 1), 8)}


class TinyBN(nn.Module):
  """BatchNorm(pixels) -> 4x4 patch conv -> BatchNorm -> GELU -> mean pool -> linear head."""
  num_classes: int = CLASSES
  width: int = WIDTH

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
    x = norm(name='bn_in')(x)
    x = nn.Conv(self.width, (4, 4), strides=4, name='stem',
                kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, 'embed')))(x)
    x = nn.gelu(norm(name='bn_stem')(x)).mean(axis=(1, 2))
    return nn.Dense(self.num_classes, name='head',
                    kernel_init=layers.logical(nn.initializers.lecun_normal(), ('embed', None)))(x)


@pytest.fixture(scope='module', autouse=True)
def tiny_bn_model():
  # Every registered model's family has facts (init_from reads them); this one needs none beyond its name.
  facts.register_family(facts.FamilyFacts(name='test_batchnorm'))
  registry.register_model(NAME, TinyBN, family='test_batchnorm', image_size=IMAGE)
  yield NAME
  registry._REGISTRY.pop(NAME)  # pylint: disable=protected-access
  facts._FAMILIES.pop('test_batchnorm')  # pylint: disable=protected-access


def _mesh(shape, n):
  return sharding.create_mesh(ml_collections.ConfigDict({'data': shape[0], 'fsdp': shape[1], 'tensor': shape[2]}),
                              devices=jax.devices()[:n])


def _train(mesh, batches, ema_decay=0.5):
  """States after each step of `train.train_step` on `mesh` (SGD with momentum, EMA), and the losses."""
  model = TinyBN()
  opt = config_schema.base_config().optimizer
  opt.update(name='sgd', lr=0.1, warmup_steps=0, b1=0.9, grad_clip_norm=0.0)
  tx, schedule = optim.create_optimizer(opt, 10)
  state, shardings = train.create_train_state(model, tx, image_size=IMAGE, seed=0, mesh=mesh, keep_ema=True)
  step = jax.jit(sharding.with_activation_sharding(
      functools.partial(train.train_step, dropout_key=jax.random.key(1), schedule=schedule, ema_decay=ema_decay),
      mesh, sharding.DEFAULT_RULES), in_shardings=(shardings, sharding.batch_sharding(mesh)))
  states, losses = [jax.device_get(state)], []
  for batch in batches:
    state, m = step(state, sharding.shard_batch(batch, mesh))
    states.append(jax.device_get(state))
    losses.append(float(m.compute()['loss']))
  return states, np.array(losses), shardings, state


def _batches(n=2, size=16):
  rng = np.random.default_rng(0)
  return [{'image': (2.0 + 3.0 * rng.normal(size=(size, IMAGE, IMAGE, 3))).astype(np.float32),
           'label': rng.integers(0, CLASSES, size=(size,)).astype(np.int32)} for _ in range(n)]


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


def test_batch_statistics_are_global_on_every_mesh():
  """1 device, data=8 and fsdp=8 give the same losses, params and running statistics; the statistics are those of
  the whole global batch, the EMA averages them, and they are replicated."""
  batches = _batches()
  results = {name: _train(_mesh(*spec), batches) for name, spec in MESHES.items()}
  states, losses, shardings, last = results['1 device']
  first, second = states[1], states[2]
  images = batches[0]['image'].astype(np.float64)
  np.testing.assert_allclose(first.batch_stats['bn_in']['mean'], 0.1 * images.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(first.batch_stats['bn_in']['var'], 0.9 + 0.1 * images.var((0, 1, 2)), rtol=1e-5)
  # EMA (decay 0.5) of the statistics, from their initial values.
  _close(second.ema_batch_stats, jax.tree.map(lambda e, s: 0.5 * e + 0.5 * s, first.ema_batch_stats,
                                              second.batch_stats))
  assert not np.allclose(second.batch_stats['bn_stem']['mean'], first.batch_stats['bn_stem']['mean'])
  for name in ('data8', 'fsdp8'):
    got_states, got_losses, got_shardings, got_last = results[name]
    np.testing.assert_allclose(got_losses, losses, rtol=1e-5, err_msg=name)
    _close(got_states[-1].params, states[-1].params)
    _close(got_states[-1].batch_stats, states[-1].batch_stats)
    _close(got_states[-1].ema_batch_stats, states[-1].ema_batch_stats)
    assert all(s.is_fully_replicated for s in jax.tree.leaves(got_shardings.batch_stats))
    assert len(jax.tree.leaves(got_last.batch_stats)[0].sharding.device_set) == 8
  assert 'fsdp' in str(results['fsdp8'][2].params['stem']['kernel'].spec)

  # Eval normalises with the (EMA) running averages: the same logits as a train=False apply of those variables.
  batch = {**batches[1], 'mask': np.ones(16, np.float32)}
  got = jax.jit(train.eval_step)(last, batch).compute()
  logits = TinyBN().apply({'params': last.ema_params, 'batch_stats': last.ema_batch_stats}, batch['image'])
  want = metrics.EvalMetrics.single_from_model_output(
      mask=batch['mask'], **metrics.classification_outputs(logits, batch['label'])).compute()
  np.testing.assert_allclose(float(got['loss']), float(want['loss']), rtol=1e-6)


def _variables(seed):
  return jax.device_get(TinyBN().init(jax.random.key(seed), jnp.zeros((1, IMAGE, IMAGE, 3)), train=False))


def test_init_from_loads_batch_stats_from_npz_and_workdir(tmp_path):
  init, source = _variables(0), _variables(1)
  source = {'params': source['params'],
            'batch_stats': jax.tree.map(lambda x: x + 1.5, source['batch_stats'])}
  # A converted BatchNorm model: flat 'params/...' and 'batch_stats/...' keys in params.npz.
  flat = {f'{c}/{k}': v for c in source for k, v in traverse_util.flatten_dict(source[c], sep='/').items()}
  np.savez(tmp_path / finetune.CONVERTED_FILENAME, **flat)
  loaded = finetune.load_variables(str(tmp_path), init)
  _close(loaded, source, rtol=0, atol=0)
  # A workdir: its latest checkpoint's batch_stats (the EMA's when the run kept one).
  tx = optax.sgd(0.1)
  state = train.TrainState.create(apply_fn=None, params=source['params'], tx=tx,
                                  batch_stats=jax.tree.map(lambda x: x * 0, source['batch_stats']),
                                  ema_params=source['params'], ema_batch_stats=source['batch_stats'])
  workdir = tmp_path / 'run'
  ckpt = checkpoint.Checkpointer(str(workdir), keep=1)
  ckpt.save(3, state)
  ckpt.close()
  loaded = finetune.load_variables(str(workdir), init)
  _close(loaded, source, rtol=0, atol=0)
  # A params-only source keeps the model's initial statistics; a mis-shaped statistic is named.
  np.savez(tmp_path / 'plain.npz', **traverse_util.flatten_dict(source['params'], sep='/'))
  kept = finetune.load_variables(str(tmp_path / 'plain.npz'), init)
  _close(kept['batch_stats'], init['batch_stats'], rtol=0, atol=0)
  bad = dict(flat, **{'batch_stats/bn_in/mean': np.zeros(4, np.float32)})
  (tmp_path / 'bad').mkdir()
  np.savez(tmp_path / 'bad' / finetune.CONVERTED_FILENAME, **bad)
  with pytest.raises(ValueError, match=r'bn_in/mean has shape \(4,\), the model \(3,\)'):
    finetune.load_variables(str(tmp_path / 'bad'), init)


def _bn_config(data_dir, **overrides):
  config = tiny_config(data_dir, total_steps=6, checkpoint_every=3, eval_every=3, log_every=3, **overrides)
  config.model = ml_collections.ConfigDict({'name': NAME})
  config.dataset.image_size = IMAGE
  config.ema_decay = 0.9
  return config


def _state(workdir, step):
  return ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(step) / 'default')


@pytest.mark.slow
def test_batchnorm_run_resumes_exactly_and_initialises_from_its_workdir(digits_data_dir, tmp_path, monkeypatch):
  """A run preempted at step 4 resumes to the uninterrupted run's statistics bitwise; init_from its workdir loads
  its (EMA) statistics."""
  ref_dir, run_dir = tmp_path / 'ref', tmp_path / 'run'
  ref_final = train.train_and_evaluate(_bn_config(digits_data_dir), str(ref_dir))

  def sigterm_at_4(n, batch):
    if n == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  _hook_iterator(monkeypatch, sigterm_at_4)
  assert train.train_and_evaluate(_bn_config(digits_data_dir), str(run_dir)) == {'preempted_at_step': 4}
  monkeypatch.undo()
  final = train.train_and_evaluate(_bn_config(digits_data_dir), str(run_dir))
  assert final['resumed_from_step'] == 4 and _same_metrics(final, ref_final)
  ref, got = _state(ref_dir, 6), _state(run_dir, 6)
  for key in ('params', 'batch_stats', 'ema_batch_stats'):
    _assert_bitwise_equal(got[key], ref[key])

  config = _bn_config(digits_data_dir, init_from=str(ref_dir))
  run = train.setup_run(config)
  state = train._init_from(config, run, run.state)  # pylint: disable=protected-access
  _close(jax.device_get(state.batch_stats), ref['ema_batch_stats'], rtol=0, atol=0)
  _close(jax.device_get(state.ema_batch_stats), ref['ema_batch_stats'], rtol=0, atol=0)
