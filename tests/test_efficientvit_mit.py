"""EfficientViT-B (MIT): timm counts (unfolded and BatchNorm-folded), timm layout, parity with timm's logits on the
committed fixture (BatchNorm running statistics included), deploy folding, the float32 ReLU linear attention, the
model API, BatchNorm in training, init_from converted weights, and the main job on digits.

Fixture: tests/parity/make_efficientformer_efficientvit_fixtures.py (torch + timm); these tests need neither.
Full-size models only through jax.eval_shape.
"""
import json
import os
import subprocess
import sys

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from tests import xla_env
from vit_jax import convert
from vit_jax import deploy
from vit_jax import finetune
from vit_jax import param_groups
from vit_jax.models import efficientvit_mit
from vit_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'parity', 'fixtures')
# timm 1.0.31: sum(p.numel()) of efficientvit_b{0..3}; folded: every BatchNorm (2,680 / 6,704 / 13,272 / 23,904
# channels) becomes its bias-free conv's bias, one parameter per channel instead of two (timm has no fused B model).
COUNTS = {'efficientvit_b0': (3_410_008, 3_407_328), 'efficientvit_b1': (9_102_024, 9_095_320),
          'efficientvit_b2': (24_330_712, 24_317_440), 'efficientvit_b3': (48_646_056, 48_622_152)}


def _fixture(name='efficientvit_mit'):
  with open(os.path.join(FIXTURES, name + '.json')) as f:
    meta = json.load(f)
  io = np.load(os.path.join(FIXTURES, name + '.npz'))
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
  sd = convert.load_safetensors(os.path.join(FIXTURES, name + '.safetensors'))
  return sd, io['input_nhwc'], io['logits'], meta['model'], overrides


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


# -- counts, registry, layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', [pytest.param('efficientvit_b0')] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ('efficientvit_b1', 'efficientvit_b2', 'efficientvit_b3')])
def test_folded_param_counts(name):
  count, folded = COUNTS[name]
  assert registry.get_model_spec(name).num_params == count
  assert model_utils.count_params(registry.create_model(name, num_classes=1000, deploy=True), 224) == folded


def test_registry_metadata():
  assert set(registry.list_models('efficientvit_b*')) == set(COUNTS)
  for name in COUNTS:
    spec = registry.get_model_spec(name)
    assert spec.timm_name == name + '.r224_in1k' and spec.image_size == 224 and spec.family == 'efficientvit_mit'
  assert registry.create_model('efficientvit_b2', num_classes=10).num_features == 2560


def test_timm_layout_full_size():
  """Names and shapes of timm's efficientvit_b0 as converted (OIHW -> HWIO, grouped convs (kh, kw, in/g, out))."""
  model = registry.create_model('efficientvit_b0', num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  p = {k: v.shape for k, v in _flat(shapes['params']).items()}
  stats = {k: v.shape for k, v in _flat(shapes['batch_stats']).items()}
  assert p['stem/in_conv/conv/kernel'] == (3, 3, 3, 8) and 'stem/in_conv/conv/bias' not in p
  assert p['stem/res0/depth_conv/conv/kernel'] == (3, 3, 1, 8) and stats['stem/res0/point_conv/norm/var'] == (8,)
  assert p['stages_0/blocks_1/main/inverted_conv/conv/kernel'] == (1, 1, 16, 64)
  assert stats['stages_0/blocks_1/main/depth_conv/norm/mean'] == (64,)
  # Fewer norms in the attention stages' MBConvs: biases instead of the first two BatchNorms.
  assert p['stages_2/blocks_0/main/inverted_conv/conv/bias'] == (128,)  # 4 x the input width 32.
  assert 'stages_2/blocks_0/main/inverted_conv/norm/mean' not in stats
  c = 'stages_3/blocks_1/context_module/'
  assert p[c + 'qkv/conv/kernel'] == (1, 1, 128, 384)  # 8 heads of 16: 3 x 128.
  assert p[c + 'aggreg_0_0/kernel'] == (5, 5, 1, 384) and p[c + 'aggreg_0_1/kernel'] == (1, 1, 16, 384)
  assert p[c + 'proj/conv/kernel'] == (1, 1, 256, 128) and stats[c + 'proj/norm/mean'] == (128,)
  assert p['stages_3/blocks_1/local_module/point_conv/conv/kernel'] == (1, 1, 512, 128)
  assert p['head_in_conv/conv/kernel'] == (1, 1, 128, 1024) and p['head_fc/kernel'] == (1024, 1280)
  assert 'head_fc/bias' not in p and p['head_norm/scale'] == (1280,) and p['head/kernel'] == (1280, 1000)


# -- parity and folding ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny():
  """The fixture converted; one jitted program gives eval logits (float32 and bfloat16), features, pre-logits,
  per-stage maps, a train-mode forward with its statistics, and the folded model's logits."""
  sd, x, logits, name, overrides = _fixture()
  model = registry.create_model(name, num_classes=5, **overrides)
  variables = convert.timm_to_params(name, sd, model_overrides=overrides)
  folded_model, folded = deploy.fold_for_inference(name, variables, num_classes=5, **overrides)
  bf16 = model.clone(dtype=jnp.bfloat16)

  @jax.jit
  def run(variables, folded, x):
    train, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    feats = model.apply(variables, x, method='forward_features')
    return dict(eval=model.apply(variables, x), train=train, stats=updated['batch_stats'], features=feats,
                pre_logits=model.apply(variables, feats, pre_logits=True, method='forward_head'),
                stages=model.apply(variables, x, method='forward_intermediates'),
                folded=folded_model.apply(folded, x), bf16=bf16.apply(variables, x))
  return model, variables, folded, x, logits, run(variables, folded, jnp.asarray(x))


def test_timm_parity(tiny):
  """Eval mode with the checkpoint's BatchNorm statistics: max |logit diff| <= 1e-5 in float32."""
  *_, logits, out = tiny
  diff = float(np.abs(np.asarray(out['eval']) - logits).max())
  print(f'\n[parity] efficientvit_mit: max |logit diff| vs timm = {diff:.2e}')
  assert diff <= 1e-5
  # bfloat16 compute (attention still float32 inside) stays near: a loose sanity bound, not parity.
  assert out['bf16'].dtype == jnp.float32 and np.abs(np.asarray(out['bf16']) - logits).max() < 0.25


def test_folded_model_gives_the_same_logits(tiny):
  """No BatchNorm left, each folded conv gains a bias, the same logits within 1e-5."""
  _, variables, folded, _, _, out = tiny
  assert set(folded) == {'params'}
  np.testing.assert_allclose(np.asarray(out['folded']), np.asarray(out['eval']), atol=1e-5, rtol=0)
  flat = _flat(folded['params'])
  assert not any('/norm/' in k for k in flat)
  assert flat['stem/in_conv/conv/bias'].shape == (4,) and 'head_norm/scale' in flat  # The LayerNorm stays.
  channels = sum(v.size for k, v in _flat(variables['batch_stats']).items() if k.endswith('/mean'))
  assert model_utils.count(folded['params']) == model_utils.count(variables['params']) - channels


def test_head_and_features(tiny):
  """pre-logits = Hardswish(LN(Linear(mean(Hardswish(BN(conv1x1(features))))))); stages at strides 4..32."""
  _, variables, _, _, _, out = tiny
  assert [s.shape for s in out['stages']] == [(1, 16, 16, 8), (1, 8, 8, 16), (1, 4, 4, 16), (1, 2, 2, 24)]
  np.testing.assert_array_equal(out['stages'][-1], out['features'])
  p, s = variables['params'], variables['batch_stats']
  y = np.asarray(out['features'], np.float64) @ p['head_in_conv']['conv']['kernel'][0, 0]
  bn = s['head_in_conv']['norm']
  y = (y - bn['mean']) / np.sqrt(bn['var'] + 1e-5) * p['head_in_conv']['norm']['scale'] + p['head_in_conv'][
      'norm']['bias']
  hswish = lambda t: t * np.clip(t + 3, 0, 6) / 6
  z = hswish(y).mean(axis=(1, 2)) @ p['head_fc']['kernel']
  z = (z - z.mean(-1, keepdims=True)) / np.sqrt(z.var(-1, keepdims=True) + 1e-5)
  z = hswish(z * p['head_norm']['scale'] + p['head_norm']['bias'])
  np.testing.assert_allclose(out['pre_logits'], z, atol=1e-5)


def test_batch_norm_statistics(tiny):
  model, variables, _, x, _, out = tiny
  assert not np.allclose(out['train'], out['eval'], atol=1e-3)
  conv = variables['params']['stem']['in_conv']['conv']
  y = jax.lax.conv_general_dilated(x, conv['kernel'], (2, 2), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  old, new = variables['batch_stats']['stem']['in_conv']['norm'], out['stats']['stem']['in_conv']['norm']
  np.testing.assert_allclose(new['mean'], 0.9 * np.asarray(old['mean']) + 0.1 * np.asarray(y).mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)


# -- the attention ------------------------------------------------------------------------------------------------

def test_relu_linear_attention_by_hand_in_float32():
  """ReLU(q) (ReLU(k)^T [v, 1]) normalised by its last column + 1e-5, against float64 numpy; bfloat16 inputs are
  computed in float32 (the result is the float32 answer rounded once); an all-zero key row gives 0, not NaN."""
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 3, 10, 4)) for _ in range(3))
  rq, rk = np.maximum(q, 0), np.maximum(k, 0)
  kv = np.einsum('bgnd,bgne->bgde', rk, v)
  want = (rq @ kv) / ((rq @ rk.sum(axis=2)[..., None]) + 1e-5)
  got = efficientvit_mit.relu_linear_attention(*(jnp.asarray(t, jnp.float32) for t in (q, k, v)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  low = efficientvit_mit.relu_linear_attention(*(jnp.asarray(t, jnp.bfloat16) for t in (q, k, v)))
  assert low.dtype == jnp.bfloat16
  f32_of_bf16 = efficientvit_mit.relu_linear_attention(
      *(jnp.asarray(t, jnp.bfloat16).astype(jnp.float32) for t in (q, k, v)))
  np.testing.assert_array_equal(low, f32_of_bf16.astype(jnp.bfloat16))
  zero = efficientvit_mit.relu_linear_attention(jnp.ones((1, 1, 2, 2)), -jnp.ones((1, 1, 2, 2)), jnp.ones((1, 1, 2, 2)))
  np.testing.assert_array_equal(zero, 0.0)


def test_attention_needs_a_head():
  model = registry.create_model('efficientvit_b0', num_classes=5, **{**_fixture()[4], 'head_dim': 32})
  with pytest.raises(ValueError, match='no head'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


# -- API, drop path, remat, grouping ----------------------------------------------------------------------------------

def test_drop_path_remat_and_layer_grouping(tiny):
  """drop_path_rate > 0 makes train-mode outputs depend on the dropout rng; remat leaves the eval logits unchanged;
  layer ids: stem 0, blocks 1..8 in order (the strided MBConvs count as blocks, as timm's group_matcher), rest 9."""
  model, variables, _, x, _, out = tiny

  @jax.jit
  def train_logits(key):
    return model.clone(drop_path_rate=0.5).apply(variables, x, train=True, mutable=['batch_stats'],
                                                 rngs={'dropout': key})[0]
  assert not np.allclose(train_logits(jax.random.key(0)), train_logits(jax.random.key(1)))
  np.testing.assert_allclose(jax.jit(model.clone(remat=True).apply)(variables, x), out['eval'], atol=1e-6)
  ids, num_blocks = param_groups.layer_ids(list(_flat(variables['params'])), 'efficientvit_mit')
  assert num_blocks == 2 + 1 + 2 + 3
  assert ids['stem/res0/depth_conv/conv/kernel'] == 0 and ids['stages_0/blocks_0/main/point_conv/conv/kernel'] == 1
  assert ids['stages_3/blocks_2/context_module/qkv/conv/kernel'] == 8
  assert ids['head_in_conv/conv/kernel'] == ids['head/kernel'] == 9


# -- fine-tuning from converted timm weights, and the main job ----------------------------------------------------

def test_init_from_converted_weights_with_a_new_head(tiny, tmp_path):
  """`vit_jax.convert` output as init_from of a 3-class model: body, head conv/fc/norm and BatchNorm statistics
  from timm, a fresh 3-class classifier; the pre-logits equal the 5-class model's."""
  _, variables5, _, x, _, out = tiny
  sd, _, _, name, overrides = _fixture()
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(sd, str(tmp_path / 'timm.safetensors'))
  convert.convert_file(name, str(tmp_path / 'timm.safetensors'), str(tmp_path / 'conv'), model_overrides=overrides)
  model = registry.create_model(name, num_classes=3, **overrides)
  init = jax.tree.map(np.asarray, model_utils.random_variables(model, jax.ShapeDtypeStruct((1, 64, 64, 3),
                                                                                           jnp.float32)))
  loaded = finetune.load_variables(str(tmp_path / 'conv'), init, model=model)
  np.testing.assert_array_equal(loaded['params']['head']['kernel'], init['params']['head']['kernel'])
  np.testing.assert_array_equal(loaded['params']['head_fc']['kernel'], variables5['params']['head_fc']['kernel'])
  _ = jax.tree.map(np.testing.assert_array_equal, loaded['batch_stats'], variables5['batch_stats'])
  pre, logits = jax.jit(lambda v, x: (model.apply(v, model.apply(v, x, method='forward_features'), pre_logits=True,
                                                  method='forward_head'), model.apply(v, x)))(loaded, x)
  np.testing.assert_allclose(pre, out['pre_logits'], atol=1e-6)
  assert logits.shape == (1, 3)


MAIN_OVERRIDES = {'patch_size': 1, 'widths': (8, 8, 16, 16, 16), 'depths': (1, 1, 1, 1, 1), 'head_dim': 8,
                  'head_widths': (16, 16)}  # 16 px digits, unstrided stem: maps 16, 8, 4, 2, 1.


@pytest.mark.slow
def test_main_job_trains_efficientvit_on_digits(digits_data_dir, tmp_path):
  """`python -m vit_jax.main --config=configs/default.py --config.model.name=efficientvit_b0 ...` trains 3 steps
  with BatchNorm statistics in the checkpoint."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
         f'--config.dataset.data_dir={digits_data_dir}', '--config.total_steps=3', '--config.batch_size=16',
         '--config.log_every=1', '--config.eval_every=3', '--config.checkpoint_every=3',
         '--config.optimizer.warmup_steps=1', '--config.model.name=efficientvit_b0',
         *[f'--config.model.{k}={v}' for k, v in MAIN_OVERRIDES.items()]]
  env = xla_env.subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'final_metrics.json') as f:
    final = json.load(f)
  assert final['step'] == 3 and all(np.isfinite(v) for v in final.values())
  assert 0 < final['train_loss'] < 10 and 0 <= final['eval_accuracy'] <= 1
  model = registry.create_model('efficientvit_b0', num_classes=10, **MAIN_OVERRIDES)
  assert final['num_params'] == model_utils.count_params(model, 16)
  assert b'batch_stats' in (workdir / 'checkpoints' / '3' / 'default' / '_METADATA').read_bytes()
