"""Downstream of MAE: the fine-tuning head (classifier='gap_fc_norm'), loading an encoder into it, the linear-probe
head (head_batchnorm) and the LARS optimizer, each against its definition."""
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from tests import model_utils
from vit_jax import optim
from vit_jax import pretrained
from vit_jax.config_schema import base_config
from vit_jax.models import registry

TINY = dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32)


def _vit(**kw):
  return registry.create_model('vit_b16', **{'num_classes': 5, **TINY, **kw})


def test_fc_norm_head_counts_and_names():
  """Same count as the class-token ViT-B/16 (the final norm moves after the pooling, as timm's fc_norm)."""
  model = registry.create_model('vit_b16', num_classes=1000, classifier='gap_fc_norm', scan_layers=True)
  params = model_utils.abstract_params(model, 224)
  assert model_utils.count(params) == 86_567_656
  assert 'fc_norm' in params and 'cls' in params and 'encoder_norm' not in params['Transformer']
  assert model.num_prefix_tokens == 1


def test_fc_norm_head_pools_patch_tokens_then_normalises():
  model = _vit(classifier='gap_fc_norm')
  x = model_utils.images(2, 16)
  params = model_utils.random_params(model, 16)

  @jax.jit
  def run(params, x):
    feats = model.apply({'params': params}, x, method='forward_features')
    return feats, model.apply({'params': params}, x), model.init(jax.random.key(0), x)['params']['head']['kernel']
  feats, logits, init = run(params, x)
  pooled = np.asarray(feats[:, 1:].mean(axis=1))  # Class token excluded.
  normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True) + 1e-6)
  normed = normed * params['fc_norm']['scale'] + params['fc_norm']['bias']
  want = normed @ params['head']['kernel'] + params['head']['bias']
  np.testing.assert_allclose(logits, want, atol=1e-5)
  # The head starts near zero (trunc-normal 2e-5), as the official MAE fine-tuning.
  assert 0 < np.abs(init).max() <= 4e-5


def test_encoder_loads_into_the_fc_norm_head():
  """A class-token encoder (timm's .mae weights, converted) into classifier='gap_fc_norm': the final norm is
  dropped, fc_norm and the head start fresh, everything else is loaded."""
  source = model_utils.random_params(_vit(num_classes=0), 16, seed=1)
  target = _vit(classifier='gap_fc_norm')
  init = jax.tree.map(np.asarray, model_utils.random_params(target, 16, seed=2))
  loaded = pretrained.load_pretrained(source, init)
  flat_src = traverse_util.flatten_dict(source, sep='/')
  for path, value in traverse_util.flatten_dict(loaded, sep='/').items():
    if path.startswith(('fc_norm/', 'head/')):
      np.testing.assert_array_equal(value, traverse_util.flatten_dict(init, sep='/')[path])
    else:
      np.testing.assert_array_equal(value, flat_src[path])


def test_head_batchnorm_normalises_with_batch_statistics():
  model = _vit(head_batchnorm=True)
  x = model_utils.images(4, 16)
  variables = model_utils.abstract_variables(model, x)
  assert set(variables) == {'params', 'batch_stats'} and 'head_norm' not in variables['params']
  params = model_utils.random_params(model, 16)
  stats = jax.tree.map(lambda s: jnp.full(s.shape, 0.5), variables['batch_stats'])

  @jax.jit
  def run(params, stats, x):
    v = {'params': params, 'batch_stats': stats}
    logits, state = model.apply(v, x, train=True, mutable=['batch_stats'])
    feats = model.apply(v, x, method='forward_features')
    pooled = model.apply(v, feats, pre_logits=True, method='forward_head')
    return logits, state, pooled, model.apply(v, x, train=False)
  logits, state, pooled, eval_logits = jax.tree.map(np.asarray, run(params, stats, x))
  mean, var = pooled.mean(0), pooled.var(0)
  head = lambda z: z @ np.asarray(params['head']['kernel']) + np.asarray(params['head']['bias'])
  np.testing.assert_allclose(logits, head((pooled - mean) / np.sqrt(var + 1e-6)), atol=1e-4)
  np.testing.assert_allclose(state['batch_stats']['head_norm']['mean'], 0.9 * 0.5 + 0.1 * mean, atol=1e-6)
  # Eval mode: the running statistics (here all 0.5).
  np.testing.assert_allclose(eval_logits, head((pooled - 0.5) / np.sqrt(0.5 + 1e-6)), atol=1e-4)


def _opt_config(**kw) -> ml_collections.ConfigDict:
  config = base_config().optimizer
  config.update(dict(name='lars', lr=0.5, warmup_steps=0, schedule='constant', grad_clip_norm=0.0, b1=0.9, **kw))
  return config


def test_lars_matches_mae_definition():
  """MAE util/lars.py: for >= 2-D params g <- (g + wd p) * 0.001 |p| / |g + wd p|, 1-D params as they are; then
  mu <- 0.9 mu + g and p <- p - lr mu."""
  tx, _ = optim.create_optimizer(_opt_config(weight_decay=0.1), total_steps=10)
  params = {'dense': {'kernel': jnp.asarray([[1., 2.], [3., 4.]]), 'bias': jnp.asarray([0.5, -0.5])}}
  grads = [{'dense': {'kernel': jnp.asarray([[.1, -.2], [.3, .1]]), 'bias': jnp.asarray([1., 2.])}},
           {'dense': {'kernel': jnp.asarray([[.2, .2], [-.1, .4]]), 'bias': jnp.asarray([-1., .5])}}]
  state = tx.init(params)
  ref = {k: np.asarray(v) for k, v in params['dense'].items()}
  mu = {k: np.zeros_like(v) for k, v in ref.items()}
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    for k in ref:
      dp = np.asarray(g['dense'][k])
      if ref[k].ndim > 1:
        dp = dp + 0.1 * ref[k]
        dp = dp * (0.001 * np.linalg.norm(ref[k]) / np.linalg.norm(dp))
      mu[k] = 0.9 * mu[k] + dp
      ref[k] = ref[k] - 0.5 * mu[k]
  for k in ref:
    np.testing.assert_allclose(params['dense'][k], ref[k], rtol=1e-6)


def test_linear_probe_freezes_all_but_the_head():
  config = _opt_config(freeze=r'^(?!head/)')
  tx, _ = optim.create_optimizer(config, total_steps=10)
  params = {'head': {'kernel': jnp.ones((2, 2))}, 'Transformer': {'encoder_norm': {'scale': jnp.ones(2)}},
            'embedding': {'kernel': jnp.ones((2, 2))}}
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  assert float(jnp.abs(updates['head']['kernel']).sum()) > 0
  assert float(jnp.abs(updates['embedding']['kernel']).sum()) == 0
  assert float(jnp.abs(updates['Transformer']['encoder_norm']['scale']).sum()) == 0


@pytest.mark.parametrize('recipe', ['mae_pretrain', 'mae_finetune', 'mae_linprobe'])
def test_recipes_are_published_numbers(recipe):
  from vit_jax import recipes  # pylint: disable=g-import-not-at-top
  config = getattr(recipes, recipe)()
  opt = config.optimizer
  if recipe == 'mae_pretrain':
    assert (config.batch_size, opt.lr, (opt.b1, opt.b2), opt.weight_decay) == (4096, 1.5e-4 * 16, (0.9, 0.95), 0.05)
    assert opt.warmup_steps * 800 == config.total_steps * 40 and config.dataset.crop_min_area == 0.2
    assert config.dataset.randaugment_layers == 0 and config.mixup.mixup_alpha == 0 and config.dataset.flip
    assert config.model.mask_ratio == 0.75 and config.model.norm_pix_loss and config.task.name == 'mae'
  elif recipe == 'mae_finetune':
    assert (config.batch_size, opt.lr, opt.layer_decay, config.model.classifier) == (1024, 2e-3, 0.65, 'gap_fc_norm')
    assert (config.mixup.mixup_alpha, config.mixup.cutmix_alpha, config.label_smoothing) == (0.8, 1.0, 0.1)
    assert config.model.drop_path_rate == 0.1 and opt.warmup_steps * 100 == config.total_steps * 5
  else:
    assert (config.batch_size, opt.name, opt.lr, opt.weight_decay) == (16384, 'lars', 6.4, 0.0)
    assert config.model.head_batchnorm and opt.warmup_steps * 90 == config.total_steps * 10


def test_fc_norm_head_matches_timm():
  """timm's VisionTransformer(global_pool='avg', fc_norm=True) (committed fixture, tests/parity/
  make_mae_fixtures.py) converts into classifier='gap_fc_norm' and gives the same logits."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  base = os.path.join(os.path.dirname(__file__), 'parity', 'fixtures', 'mae_finetune')
  with open(base + '.json') as f:
    meta = json.load(f)
  ref = np.load(base + '.npz')
  params = convert.timm_to_params('vit_b16', convert.load_safetensors(base + '.safetensors'),
                                  model_overrides=meta['overrides'])
  assert meta['timm_kwargs']['global_pool'] == 'avg' and meta['timm_kwargs']['fc_norm']
  model = registry.create_model('vit_b16', num_classes=5, **meta['overrides'])
  logits = jax.jit(lambda p, x: model.apply({'params': p}, x))(params, ref['input_nhwc'])
  np.testing.assert_allclose(logits, ref['logits'], atol=1e-5)
