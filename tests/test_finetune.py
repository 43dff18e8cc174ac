"""Fine-tuning: init_from sources, head re-init, resolution change, freezing, lr/wd multipliers, layer decay; EMA;
the distillation step; and fine-tuning beating training from scratch on digits."""
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import checkpoint, convert, ema, finetune, models, optim, param_groups, train
from vit_jax.tasks import classification
from vit_jax.config_schema import base_config
from tests.test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(patch_size=4, hidden_size=16, mlp_dim=32, num_layers=3, num_heads=2)


@functools.lru_cache(maxsize=None)
def _init_cached(name, size, num_classes, kw):
  model = models.create_model(name, num_classes=num_classes, **{**TINY, **dict(kw)})
  init = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)['params'])
  return model, init()


def _init(name='vit_pico', size=16, num_classes=10, **kw):
  return _init_cached(name, size, num_classes, tuple(sorted(kw.items())))


def _update(tx, grads, params):
  return tx.update(grads, tx.init(params), params)[0]  # Eager: cheaper than compiling for one call.


def _opt(**kw):
  c = base_config().optimizer
  c.update(**{**dict(warmup_steps=0, schedule='constant', grad_clip_norm=0.0), **kw})
  return c


def _flat(tree):
  return {param_groups.path_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --- Parameter groups.


def test_layer_ids_follow_the_forward_order():
  model = models.create_model('vit_pico', num_classes=10, **TINY)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False))['params']
  ids, n = param_groups.layer_ids(list(_flat(params)))
  assert n == 3
  assert ids['embedding/kernel'] == ids['cls'] == ids['Transformer/posembed_input/pos_embedding'] == 0
  assert ids['Transformer/encoderblock_0/LayerNorm_0/scale'] == 1
  assert ids['Transformer/encoderblock_2/MlpBlock_0/Dense_1/kernel'] == 3
  assert ids['Transformer/encoder_norm/scale'] == ids['head/kernel'] == 4
  # Swin: stages flattened in order; the (official-layout) downsample belongs to the last block of its stage.
  names = ['patch_embed/proj/kernel', 'layers_0/blocks_0/attn/qkv/kernel', 'layers_0/blocks_1/mlp/fc1/kernel',
           'layers_0/downsample/reduction/kernel', 'layers_1/blocks_0/norm1/scale', 'layers_1/blocks_10/norm1/scale',
           'layers_1/blocks_2/norm1/scale', 'norm/scale', 'head/kernel']
  ids, n = param_groups.layer_ids(names)
  assert n == 5
  assert [ids[k] for k in names] == [0, 1, 2, 2, 3, 5, 4, 6, 6]
  # PVTv2: a stage's patch embedding comes before its blocks.
  ids, _ = param_groups.layer_ids(['stages_0/downsample/proj/kernel', 'stages_0/blocks_0/mlp/fc1/kernel',
                                   'stages_1/downsample/proj/kernel', 'stages_1/blocks_0/mlp/fc1/kernel',
                                   'stages_1/norm/scale', 'head/kernel'])
  assert ids['stages_1/downsample/proj/kernel'] == ids['stages_1/blocks_0/mlp/fc1/kernel'] == 2
  assert ids['stages_1/norm/scale'] == 2 and ids['head/kernel'] == 3


def test_lr_multipliers_and_layer_decay_scale_updates():
  _, params = _init()
  grads = jax.tree.map(jnp.ones_like, params)
  tx, _ = optim.create_optimizer(_opt(name='sgd', lr=1.0, b1=0.0, layer_decay=0.5,
                                      lr_multipliers=(('head/kernel', 10.0), ('^cls$', 0.0))), 10)
  updates = _update(tx, grads, params)
  u = {k: float(-v.reshape(-1)[0]) for k, v in _flat(updates).items()}
  assert u['embedding/kernel'] == pytest.approx(0.5 ** 4)
  assert u['Transformer/encoderblock_0/LayerNorm_0/scale'] == pytest.approx(0.5 ** 3)
  assert u['Transformer/encoderblock_2/MlpBlock_0/Dense_0/kernel'] == pytest.approx(0.5)
  assert u['head/bias'] == pytest.approx(1.0) and u['head/kernel'] == pytest.approx(10.0)
  assert u['cls'] == 0.0
  with pytest.raises(ValueError, match='lr_multipliers'):
    optim.create_optimizer(_opt(lr_multipliers=(('head(', 1.0),)), 10)
  with pytest.raises(ValueError, match='layer_decay'):
    optim.create_optimizer(_opt(layer_decay=1.5), 10)


def test_weight_decay_multipliers():
  _, params = _init()
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx, _ = optim.create_optimizer(_opt(name='adamw', lr=0.1, weight_decay=0.5,
                                      wd_multipliers=(('head/kernel', 0.0), ('pos_embedding', 2.0))), 10)
  updates = _update(tx, zeros, params)
  u, p = _flat(updates), _flat(params)
  k = 'Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel'
  np.testing.assert_allclose(u[k], -0.1 * 0.5 * p[k], rtol=1e-6)
  np.testing.assert_allclose(u['Transformer/posembed_input/pos_embedding'],
                             -0.1 * 0.5 * 2.0 * p['Transformer/posembed_input/pos_embedding'], rtol=1e-6)
  for name in ('head/kernel', 'head/bias', 'embedding/bias', 'cls'):
    assert float(jnp.abs(u[name]).max()) == 0.0, name


def test_adamw_without_rules_equals_optax_adamw():
  _, params = _init()
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  tx, sched = optim.create_optimizer(_opt(name='adamw', lr=1e-2, weight_decay=0.1, grad_clip_norm=1.0), 10)
  ref = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.adamw(sched, weight_decay=0.1, mask=optim.weight_decay_mask))
  a, b = _update(tx, grads, params), _update(ref, grads, params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9), a, b)


def test_freeze_gives_zero_updates_and_no_state():
  _, params = _init()
  grads = jax.tree.map(jnp.ones_like, params)
  tx, _ = optim.create_optimizer(_opt(name='adamw', lr=0.1, weight_decay=0.1, grad_clip_norm=1.0,
                                      freeze=r'^(embedding|cls|Transformer/encoderblock_[01])/?'), 10)
  state = jax.eval_shape(tx.init, params)
  updates = _update(tx, grads, params)
  frozen = [k for k in _flat(params) if k.startswith(('embedding', 'cls', 'Transformer/encoderblock_0',
                                                      'Transformer/encoderblock_1'))]
  assert frozen
  for name, u in _flat(updates).items():
    assert (float(jnp.abs(u).max()) == 0.0) == (name in frozen), name
  moments = sum(x.size for x in jax.tree.leaves(state))
  trainable = sum(v.size for k, v in _flat(params).items() if k not in frozen)
  assert moments < 2 * trainable + 10  # Adam's two moments only for trainable params.
  with pytest.raises(ValueError, match='freeze'):
    optim.create_optimizer(_opt(freeze='('), 10)


# --- init_from sources.


def test_init_from_converted_timm_deit_at_new_resolution_and_classes(tmp_path):
  fixture = ROOT / 'tests' / 'parity' / 'fixtures'
  meta = json.loads((fixture / 'deit.json').read_text())
  out = tmp_path / 'converted'
  convert.convert_file(meta['model'], str(fixture / 'deit.safetensors'), str(out),
                       model_overrides=meta['model_overrides'])
  source = convert.load_safetensors(str(fixture / 'deit.safetensors'))
  model = models.create_model(meta['model'], num_classes=10, **meta['model_overrides'])
  init = jax.jit(lambda: model.init(jax.random.key(1), jnp.zeros((1, 24, 24, 3)), train=False)['params'])()
  # (A 6x6 patch grid; the checkpoint's is 8x8.)
  for src in (str(out / 'params.npz'), str(out)):
    loaded = finetune.load_params(src, jax.device_get(init))
    assert loaded['head']['kernel'] is not None and loaded['head']['kernel'].shape == (32, 10)
    np.testing.assert_array_equal(loaded['head_dist']['kernel'], init['head_dist']['kernel'])  # Fresh heads.
    assert loaded['Transformer']['posembed_input']['pos_embedding'].shape == (1, 2 + 36, 32)
    pe = loaded['Transformer']['posembed_input']['pos_embedding']
    np.testing.assert_allclose(pe[0, :2], source['pos_embed'][0, :2], rtol=1e-6)  # cls and dist slots kept.
    np.testing.assert_allclose(loaded['dist'], source['dist_token'], rtol=1e-6)
  # Same class count: the heads load, unless re-initialisation is asked for.
  model5 = models.create_model(meta['model'], num_classes=5, **meta['model_overrides'])
  init5 = jax.device_get(jax.jit(
      lambda: model5.init(jax.random.key(1), jnp.zeros((1, 32, 32, 3)), train=False)['params'])())
  loaded = finetune.load_params(str(out), init5)
  np.testing.assert_allclose(loaded['head_dist']['kernel'], source['head_dist.weight'].T, rtol=1e-6)
  fresh = finetune.load_params(str(out), init5, reinit_head=True)
  np.testing.assert_array_equal(fresh['head']['kernel'], init5['head']['kernel'])
  with pytest.raises(ValueError, match='head'):
    finetune.load_params(str(out), jax.device_get(init), require_head=True)
  with pytest.raises(FileNotFoundError, match='init_from'):
    finetune.load_params(str(tmp_path / 'missing.npz'), init5)


@pytest.mark.slow
def test_init_from_workdir_with_ema_and_frozen_layers(digits_data_dir, tmp_path):
  """A run with EMA saves it in its checkpoints; a second run at another resolution with a new head starts from
  those EMA weights, with the embedding frozen."""
  first = tmp_path / 'first'
  config = tiny_config(digits_data_dir, total_steps=10, checkpoint_every=10, eval_every=0, ema_decay=0.9)
  train.train_and_evaluate(config, str(first))
  raw = finetune.read_workdir_params(str(first))
  step, state = checkpoint.read_latest_state(first / checkpoint.CHECKPOINT_DIRNAME)
  assert step == 10
  assert state['ema_params'] is not None
  diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), state['ema_params'],
                      state['params'])
  assert max(jax.tree.leaves(diff)) > 0, 'EMA differs from the raw params'
  jax.tree.map(np.testing.assert_array_equal, raw, state['ema_params'])

  second = tmp_path / 'second'
  config2 = tiny_config(digits_data_dir, total_steps=4, checkpoint_every=4, eval_every=0, init_from=str(first))
  config2.dataset.image_size = 24
  config2.init_reinit_head = True
  config2.optimizer.freeze = '^embedding/'
  config2.optimizer.warmup_steps = 1
  train.train_and_evaluate(config2, str(second))
  end = finetune.read_workdir_params(str(second))
  np.testing.assert_array_equal(end['embedding']['kernel'], raw['embedding']['kernel'])  # Frozen, loaded.
  assert end['Transformer']['posembed_input']['pos_embedding'].shape == (1, 1 + 36, 32)
  assert not np.allclose(end['head']['kernel'], raw['head']['kernel'])


# --- EMA and the distillation step.


def test_train_step_ema_and_hard_distillation():
  student, s_params = _init('deit_ti16_distilled', num_classes=10, drop_path_rate=0.0, num_layers=1)
  teacher, t_params = _init('vit_pico', num_classes=10, hidden_size=24, num_layers=1)
  t_params = jax.tree.map(lambda x: x + 0.05 * jnp.sign(jnp.sin(jnp.arange(x.size).reshape(x.shape))), t_params)
  tx, schedule = optim.create_optimizer(_opt(name='sgd', lr=0.1, b1=0.0), 10)
  state = train.TrainState.create(apply_fn=student.apply, params=s_params, tx=tx, ema_params=s_params)
  task = classification.Classification(num_classes=10, label_smoothing=0.1, distill_type='hard', distill_alpha=0.5,
                                       teacher=teacher)
  batch = {'image': jax.random.normal(jax.random.key(2), (8, 16, 16, 3)), 'label': jnp.arange(8) % 10}
  step = jax.jit(functools.partial(train.train_step, dropout_key=jax.random.key(0), schedule=schedule, task=task,
                                   ema_decay=0.5))
  new, metrics = step(state, batch, {'params': t_params})
  # The reported loss is DeiT's: 0.5 * CE(cls, smoothed labels) + 0.5 * CE(dist, teacher argmax).
  t_logits = jax.jit(lambda p, x: teacher.apply({'params': p}, x, train=False))(t_params, batch['image'])
  cls, dist = jax.jit(lambda p, x: student.apply({'params': p}, x, train=True))(s_params, batch['image'])
  smoothed = 0.9 * jax.nn.one_hot(batch['label'], 10) + 0.01
  want = (0.5 * -(smoothed * jax.nn.log_softmax(cls)).sum(-1)
          + 0.5 * -jax.nn.log_softmax(dist)[jnp.arange(8), jnp.argmax(t_logits, -1)]).mean()
  np.testing.assert_allclose(float(metrics.compute()['loss']), float(want), rtol=1e-5)
  # EMA: ema = 0.5 * old + 0.5 * new params; evaluation reads it.
  jax.tree.map(lambda e, p0, p1: np.testing.assert_allclose(e, 0.5 * p0 + 0.5 * p1, rtol=1e-5, atol=1e-7),
               new.ema_params, s_params, new.params)
  assert ema.eval_variables(new)['params'] is new.ema_params
  assert ema.eval_variables(new.replace(ema_params=None)) == {'params': new.params}


@pytest.mark.slow
def test_finetuning_across_resolution_beats_scratch(digits_data_dir, tmp_path):
  """Acceptance: a checkpoint trained at 16 px, given a new head at 24 px, beats training from scratch at 24 px
  after the same N steps (seed fixed). Figures for larger N: experiments/recipes_digits.py."""
  n = 40
  pre = tiny_config(digits_data_dir, total_steps=150, checkpoint_every=150, eval_every=0, log_every=50)
  pre.optimizer.warmup_steps = 15
  train.train_and_evaluate(pre, str(tmp_path / 'pre'))
  results = {}
  for tag, init in (('scratch', None), ('finetune', str(tmp_path / 'pre'))):
    c = tiny_config(digits_data_dir, total_steps=n, checkpoint_every=n, eval_every=0, log_every=n, init_from=init)
    c.dataset.image_size = 24
    c.init_reinit_head = True
    results[tag] = train.train_and_evaluate(c, str(tmp_path / tag))['eval_accuracy']
  assert results['finetune'] > results['scratch'] + 0.1, results
