"""Schedules, weight-decay masks and optimizer selection."""
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import optim
from vit_jax.config_schema import base_config


def _opt(**kw):
  c = base_config().optimizer
  c.update(kw)
  return c


@pytest.mark.parametrize('schedule', ['cosine', 'linear', 'constant'])
def test_schedule_warms_up_then_decays(schedule):
  sched = optim.create_learning_rate_schedule(_opt(lr=1.0, warmup_steps=10, schedule=schedule,
                                                   end_lr_factor=0.1), 110)
  assert float(sched(0)) == 0.0
  np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
  end = float(sched(110))
  np.testing.assert_allclose(end, 1.0 if schedule == 'constant' else 0.1, rtol=1e-5)
  if schedule == 'cosine':
    np.testing.assert_allclose(float(sched(60)), 0.1 + 0.9 * 0.5, rtol=1e-5)
  if schedule == 'linear':
    np.testing.assert_allclose(float(sched(60)), 0.55, rtol=1e-5)


def test_bad_schedule_and_warmup_name_the_key():
  with pytest.raises(ValueError, match='optimizer.schedule'):
    optim.create_learning_rate_schedule(_opt(schedule='cosin'), 100)
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.create_learning_rate_schedule(_opt(warmup_steps=200), 100)
  with pytest.raises(ValueError, match='optimizer.name'):
    optim.create_optimizer(_opt(name='lamb'), 100)


def test_weight_decay_mask_only_kernels():
  params = {'embedding': {'kernel': 1, 'bias': 2}, 'cls': 3,
            'Transformer': {'posembed_input': {'pos_embedding': 4}, 'encoder_norm': {'scale': 5, 'bias': 6}},
            'head': {'kernel': 7, 'bias': 8}}
  mask = optim.weight_decay_mask(params)
  assert mask == {'embedding': {'kernel': True, 'bias': False}, 'cls': False,
                  'Transformer': {'posembed_input': {'pos_embedding': False},
                                  'encoder_norm': {'scale': False, 'bias': False}},
                  'head': {'kernel': True, 'bias': False}}


@pytest.mark.parametrize('name', ['adamw', 'sgd'])
def test_decay_skips_biases(name):
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones((2,))}}
  tx, _ = optim.create_optimizer(_opt(name=name, lr=0.1, warmup_steps=0, schedule='constant', weight_decay=0.5,
                                      grad_clip_norm=0.0), 10)
  zero = {'dense': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros((2,))}}
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['dense']['bias'], 0.0)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1 * 0.5)


def test_clipping_bounds_the_update():
  params = {'w': {'kernel': jnp.zeros((3,))}}
  tx, _ = optim.create_optimizer(_opt(name='sgd', b1=0.0, lr=1.0, warmup_steps=0, schedule='constant',
                                      grad_clip_norm=1.0), 10)
  updates, _ = tx.update({'w': {'kernel': jnp.array([30.0, 40.0, 0.0])}}, tx.init(params), params)
  np.testing.assert_allclose(updates['w']['kernel'], [-0.6, -0.8, 0.0], rtol=1e-6)
