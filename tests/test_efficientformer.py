"""EfficientFormer v1 and v2: timm counts (unfolded and BatchNorm-folded), timm layout, parity with timm's logits on the
committed fixtures (BatchNorm running statistics included), deploy folding, the attention bias table (index and
resize), the model API, BatchNorm in training, init_from converted weights, and the main job on digits.

Fixtures: tests/parity/make_efficientformer_efficientvit_fixtures.py (torch + timm); these tests need neither.
Full-size models only through jax.eval_shape.
"""
import functools
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
from vit_jax.models import efficientformer
from vit_jax.models import registry
from vit_jax.models import resize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'parity', 'fixtures')
# timm 1.0.31: sum(p.numel()) of efficientformer_{l1,l3,l7}, and the same less every BatchNorm's weight and bias
# (2 x 15,960 / 29,216 / 44,688 BatchNorm channels): what the folded model keeps (timm has no fused EfficientFormer;
# the folded convs already had biases).
COUNTS = {'efficientformer_l1': (12_289_928, 12_258_008), 'efficientformer_l3': (31_406_000, 31_347_568),
          'efficientformer_l7': (82_229_328, 82_139_952)}


def _fixture(name):
  """(timm state dict, input, timm logits, our model name, our overrides) of a committed parity fixture."""
  with open(os.path.join(FIXTURES, name + '.json')) as f:
    meta = json.load(f)
  io = np.load(os.path.join(FIXTURES, name + '.npz'))
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
  sd = convert.load_safetensors(os.path.join(FIXTURES, name + '.safetensors'))
  return sd, io['input_nhwc'], io['logits'], meta['model'], overrides


def _flat(tree):
  return traverse_util.flatten_dict(tree, sep='/')


# -- counts, registry, layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', [pytest.param('efficientformer_l1'),
                                  pytest.param('efficientformer_l3', marks=pytest.mark.slow),
                                  pytest.param('efficientformer_l7', marks=pytest.mark.slow)])
def test_folded_param_counts(name):
  """The registry holds timm's count (tests/test_vit.py counts the model); the deploy form drops exactly the
  BatchNorms' affine parameters."""
  count, folded = COUNTS[name]
  assert registry.get_model_spec(name).num_params == count
  model = registry.create_model(name, num_classes=1000, deploy=True)
  assert model_utils.count_params(model, 224) == folded


def test_registry_metadata():
  assert set(registry.list_models('efficientformer_l*')) == set(COUNTS)
  for name in COUNTS:
    spec = registry.get_model_spec(name)
    assert spec.timm_name == name + '.snap_dist_in1k' and spec.image_size == 224 and spec.family == 'efficientformer'
  assert registry.create_model('efficientformer_l3', num_classes=10).num_features == 512


def test_timm_layout_full_size():
  """Names and shapes of timm's efficientformer_l1 state dict as converted: l1's last stage is 3 pooling blocks,
  timm's Flat (index 3, no parameters) and one attention block (index 4)."""
  model = registry.create_model('efficientformer_l1', num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  p = {k: v.shape for k, v in _flat(shapes['params']).items()}
  stats = {k: v.shape for k, v in _flat(shapes['batch_stats']).items()}
  assert p['stem/conv1/kernel'] == (3, 3, 3, 24) and p['stem/conv2/kernel'] == (3, 3, 24, 48)
  assert stats['stem/norm1/mean'] == (24,) and stats['stages_1/downsample/norm/var'] == (96,)
  assert p['stages_1/downsample/conv/kernel'] == (3, 3, 48, 96)
  assert p['stages_3/blocks_2/mlp/fc1/kernel'] == (1, 1, 448, 1792) and p['stages_3/blocks_2/ls1'] == (448,)
  assert not any(k.startswith('stages_3/blocks_3/') for k in p)  # timm's Flat.
  a = 'stages_3/blocks_4/'
  assert p[a + 'token_mixer/qkv/kernel'] == (448, 8 * (32 + 32 + 128)) and p[a + 'token_mixer/proj/kernel'] == (
      1024, 448)
  assert p[a + 'token_mixer/attention_biases'] == (8, 49) and p[a + 'mlp/fc1/kernel'] == (448, 1792)
  assert p[a + 'norm1/scale'] == (448,) and p['norm/scale'] == (448,)
  assert p['head/kernel'] == (448, 1000) and p['head_dist/kernel'] == (448, 1000)
  assert all(not k.startswith(a) for k in stats)  # LayerNorms only in the attention block.


# -- parity and folding ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny():
  """The num_vit=1 fixture converted; one jitted program gives eval logits, features, pre-logits, per-stage maps,
  a train-mode forward with its updated statistics, and the folded model's logits."""
  sd, x, logits, name, overrides = _fixture('efficientformer')
  model = registry.create_model(name, num_classes=5, **overrides)
  variables = convert.timm_to_params(name, sd, model_overrides=overrides)
  folded_model, folded = deploy.fold_for_inference(name, variables, num_classes=5, **overrides)

  @jax.jit
  def run(variables, folded, x):
    train, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    feats = model.apply(variables, x, method='forward_features')
    return dict(eval=model.apply(variables, x), train=train, stats=updated['batch_stats'], features=feats,
                pre_logits=model.apply(variables, feats, pre_logits=True, method='forward_head'),
                stages=model.apply(variables, x, norm=True, method='forward_intermediates'),
                folded=folded_model.apply(folded, x))
  return model, variables, folded, x, logits, run(variables, folded, jnp.asarray(x))


def test_timm_parity_l1_layout(tiny):
  """[pooling block, Flat, attention block] in the last stage; eval-mode BatchNorm with the checkpoint's running
  statistics; max |logit diff| <= 1e-5 in float32."""
  *_, logits, out = tiny
  diff = float(np.abs(np.asarray(out['eval']) - logits).max())
  print(f'\n[parity] efficientformer (l1 layout): max |logit diff| vs timm = {diff:.2e}')
  assert diff <= 1e-5


def test_timm_parity_attention_only_last_stage():
  """num_vit >= the last depth (l7's layout): timm's Flat comes first, every last-stage block attends."""
  sd, x, logits, name, overrides = _fixture('efficientformer_allvit')
  variables = convert.timm_to_params(name, sd, model_overrides=overrides)
  assert set(variables) == {'params', 'batch_stats'}
  assert 'blocks_0' not in variables['params']['stages_3']  # The Flat's index.
  model = registry.create_model(name, num_classes=5, **overrides)
  diff = float(np.abs(np.asarray(jax.jit(model.apply)(variables, x)) - logits).max())
  print(f'\n[parity] efficientformer_allvit (l7 layout): max |logit diff| vs timm = {diff:.2e}')
  assert diff <= 1e-5


def test_folded_model_gives_the_same_logits(tiny):
  """deploy.fold_for_inference: no BatchNorm left (params only, none of the norm modules), convs carry the folded
  biases, the same logits within 1e-5, and fewer parameters by the BatchNorms' scale and bias."""
  model, variables, folded, x, _, out = tiny
  assert set(folded) == {'params'}
  np.testing.assert_allclose(np.asarray(out['folded']), np.asarray(out['eval']), atol=1e-5, rtol=0)
  flat, before = _flat(folded['params']), _flat(variables['params'])
  assert 'stem/norm1/scale' not in flat and 'stages_0/blocks_0/mlp/norm2/scale' not in flat
  assert 'stages_3/blocks_2/norm1/scale' in flat  # The attention block's LayerNorms stay.
  bn_affine = sum(v.size for k, v in before.items() if k.rsplit('/', 1)[0] in {
      p.rsplit('/', 1)[0] for p in _flat(variables['batch_stats'])})
  assert model_utils.count(folded['params']) == model_utils.count(variables['params']) - bn_affine > 0
  # An already folded model folds to itself.
  again_model, again = deploy.fold_for_inference('efficientformer_l1', folded, num_classes=5, deploy=True,
                                                 **_fixture('efficientformer')[4])
  assert again_model.deploy and jax.tree.all(jax.tree.map(np.array_equal, again, folded))


def test_head_averages_class_and_distillation_heads(tiny):
  """pre-logits = mean over the final-normed map; logits = (head + head_dist) / 2 (timm's inference output)."""
  _, variables, _, _, _, out = tiny
  p = variables['params']
  pooled = np.asarray(out['features'], np.float64).mean(axis=(1, 2))
  np.testing.assert_allclose(out['pre_logits'], pooled, atol=1e-6)
  want = ((pooled @ p['head']['kernel'] + p['head']['bias']) + (pooled @ p['head_dist']['kernel'] +
                                                                p['head_dist']['bias'])) / 2
  np.testing.assert_allclose(out['eval'], want, atol=1e-5)


def test_per_stage_features(tiny):
  """NHWC maps at strides 4, 8, 16, 32 with the stage widths; the last one final-normed (= forward_features)."""
  *_, out = tiny
  assert [s.shape for s in out['stages']] == [(1, 24, 24, 8), (1, 12, 12, 16), (1, 6, 6, 16), (1, 3, 3, 24)]
  np.testing.assert_allclose(out['stages'][-1], out['features'], atol=1e-6)


def test_batch_norm_statistics(tiny):
  """Train mode normalises by the batch and moves every running statistic by 0.1 towards the batch's."""
  model, variables, _, x, _, out = tiny
  assert not np.allclose(out['train'], out['eval'], atol=1e-3)
  conv = variables['params']['stem']['conv1']
  y = jax.lax.conv_general_dilated(x, conv['kernel'], (2, 2), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + conv['bias']
  old, new = variables['batch_stats']['stem']['norm1'], out['stats']['stem']['norm1']
  np.testing.assert_allclose(new['mean'], 0.9 * np.asarray(old['mean']) + 0.1 * np.asarray(y).mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(out['stats']) == jax.tree.structure(variables['batch_stats'])


# -- pieces by hand -------------------------------------------------------------------------------------------------

def test_attention_bias_index_by_hand():
  """|dy| * r + |dx| between row-major positions (timm's attention_bias_idxs)."""
  np.testing.assert_array_equal(efficientformer.attention_bias_index(2), [[0, 1, 2, 3], [1, 0, 3, 2],
                                                                          [2, 3, 0, 1], [3, 2, 1, 0]])
  index = efficientformer.attention_bias_index(3)
  assert index[0, 8] == 2 * 3 + 2 and index[5, 1] == 1 * 3 + 1 and index[2, 6] == 2 * 3 + 2


def test_pool_mixer_excludes_padding_from_the_mean():
  x = jnp.arange(9, dtype=jnp.float32).reshape(1, 3, 3, 1)
  out = np.asarray(efficientformer.pool_mixer(x, 3))[0, :, :, 0]
  assert out[0, 0] == pytest.approx((0 + 1 + 3 + 4) / 4 - 0)  # Corner: 4 real neighbours.
  assert out[1, 1] == pytest.approx(36 / 9 - 4) and out[0, 1] == pytest.approx((0 + 1 + 2 + 3 + 4 + 5) / 6 - 1)


def test_attention_tables_resize_bicubically_through_convert():
  """Converting for attn_resolution 4 (128 px) resizes each head's 3x3 grid with PyTorch's bicubic; the model then
  takes 128 px images. A table of other heads is refused by name."""
  sd, _, _, name, overrides = _fixture('efficientformer')
  table = sd['stages.3.blocks.2.token_mixer.attention_biases']
  ours = {**overrides, 'attn_resolution': 4}
  variables = convert.timm_to_params(name, sd, model_overrides=ours)
  got = variables['params']['stages_3']['blocks_2']['token_mixer']['attention_biases']
  m = resize.torch_bicubic_matrix(3, 4)
  want = np.einsum('ph,nhw,qw->npq', m, table.reshape(2, 3, 3), m).reshape(2, 16)
  np.testing.assert_allclose(got, want, atol=1e-6)
  model = registry.create_model(name, num_classes=5, **ours)
  assert jax.eval_shape(functools.partial(model.apply, variables), jnp.zeros((1, 128, 128, 3))).shape == (1, 5)
  with pytest.raises(ValueError, match='head counts'):
    efficientformer.resize_attention_biases(table, (3, 16))


def test_input_size_and_option_errors():
  model = registry.create_model('efficientformer_l1', num_classes=5, **_fixture('efficientformer')[4])
  with pytest.raises(ValueError, match='Fix: use 96x96 images'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match='patch_size'):
    jax.eval_shape(model.clone(patch_size=8).init, jax.random.key(0), jnp.zeros((1, 96, 96, 3)))
  with pytest.raises(ValueError, match='num_vit'):
    jax.eval_shape(model.clone(num_vit=0).init, jax.random.key(0), jnp.zeros((1, 96, 96, 3)))


# -- API, drop path, remat, grouping ----------------------------------------------------------------------------------

def test_drop_path_remat_and_layer_grouping(tiny):
  """drop_path_rate > 0 makes train-mode outputs depend on the dropout rng; remat leaves the eval logits unchanged;
  layer ids number stem 0, the 5 blocks 1..5 in order (downsamples with the next block), the rest 6."""
  model, variables, _, x, _, out = tiny

  @jax.jit
  def train_logits(key):
    return model.clone(drop_path_rate=0.5).apply(variables, x, train=True, mutable=['batch_stats'],
                                                 rngs={'dropout': key})[0]
  assert not np.allclose(train_logits(jax.random.key(0)), train_logits(jax.random.key(1)))
  np.testing.assert_allclose(jax.jit(model.clone(remat=True).apply)(variables, x), out['eval'], atol=1e-6)
  ids, num_blocks = param_groups.layer_ids(list(_flat(variables['params'])), 'efficientformer')
  assert num_blocks == 5
  assert ids['stem/conv1/kernel'] == 0 and ids['stages_0/blocks_0/ls1'] == 1
  assert ids['stages_1/downsample/conv/kernel'] == 2 and ids['stages_3/blocks_0/mlp/fc1/kernel'] == 4
  assert ids['stages_3/blocks_2/token_mixer/attention_biases'] == 5
  assert ids['norm/scale'] == ids['head_dist/kernel'] == 6


# -- fine-tuning from converted timm weights, and the main job ----------------------------------------------------

def test_init_from_converted_weights_with_a_new_head(tiny, tmp_path):
  """`python -m vit_jax.convert` output as config.init_from of a 3-class model: every body weight and BatchNorm
  statistic comes from timm, both heads keep their fresh 3-class init, and the features equal the 5-class model's."""
  _, variables5, _, x, _, out = tiny
  sd, _, _, name, overrides = _fixture('efficientformer')
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(sd, str(tmp_path / 'timm.safetensors'))
  convert.convert_file(name, str(tmp_path / 'timm.safetensors'), str(tmp_path / 'conv'),
                       model_overrides=overrides)
  model = registry.create_model(name, num_classes=3, **overrides)
  init = jax.tree.map(np.asarray, model_utils.random_variables(model, jax.ShapeDtypeStruct((1, 96, 96, 3),
                                                                                           jnp.float32)))
  loaded = finetune.load_variables(str(tmp_path / 'conv'), init, model=model)
  for head in ('head', 'head_dist'):
    np.testing.assert_array_equal(loaded['params'][head]['kernel'], init['params'][head]['kernel'])
  np.testing.assert_array_equal(loaded['params']['stages_3']['blocks_2']['token_mixer']['attention_biases'],
                                variables5['params']['stages_3']['blocks_2']['token_mixer']['attention_biases'])
  _ = jax.tree.map(np.testing.assert_array_equal, loaded['batch_stats'], variables5['batch_stats'])
  feats, logits = jax.jit(lambda v, x: (model.apply(v, x, method='forward_features'), model.apply(v, x)))(
      loaded, x)
  np.testing.assert_allclose(feats, out['features'], atol=1e-6)
  assert logits.shape == (1, 3)


MAIN_OVERRIDES = {'patch_size': 2, 'depths': (1, 1, 1, 1), 'embed_dims': (8, 8, 16, 16), 'attn_key_dim': 8,
                  'attn_heads': 2, 'attn_ratio': 2.0, 'attn_resolution': 1}  # 16 px digits: maps 8, 4, 2, 1.


@pytest.mark.slow
def test_main_job_trains_efficientformer_on_digits(digits_data_dir, tmp_path):
  """`python -m vit_jax.main --config=configs/default.py --config.model.name=efficientformer_l1 ...` trains 3 steps
  with BatchNorm statistics in the checkpoint."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
         f'--config.dataset.data_dir={digits_data_dir}', '--config.total_steps=3', '--config.batch_size=16',
         '--config.log_every=1', '--config.eval_every=3', '--config.checkpoint_every=3',
         '--config.optimizer.warmup_steps=1', '--config.model.name=efficientformer_l1',
         *[f'--config.model.{k}={v}' for k, v in MAIN_OVERRIDES.items()]]
  env = xla_env.subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'final_metrics.json') as f:
    final = json.load(f)
  assert final['step'] == 3 and all(np.isfinite(v) for v in final.values())
  assert 0 < final['train_loss'] < 10 and 0 <= final['eval_accuracy'] <= 1
  model = registry.create_model('efficientformer_l1', num_classes=10, **MAIN_OVERRIDES)
  assert final['num_params'] == model_utils.count_params(model, 16)
  assert b'batch_stats' in (workdir / 'checkpoints' / '3' / 'default' / '_METADATA').read_bytes()


# == EfficientFormer V2 ===============================================================================================

# timm 1.0.31 counts; folded: less every conv-following BatchNorm's weight and bias (the final BatchNorm becomes a
# per-channel affine of the same size).
V2_COUNTS = {'efficientformerv2_s0': (3_600_256, 3_551_296), 'efficientformerv2_s1': (6_185_560, 6_115_096),
             'efficientformerv2_s2': (12_710_112, 12_588_896), 'efficientformerv2_l': (26_322_288, 26_126_632)}


@pytest.mark.parametrize('name', [pytest.param('efficientformerv2_s0')] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ('efficientformerv2_s1', 'efficientformerv2_s2',
                                                      'efficientformerv2_l')])
def test_v2_folded_param_counts(name):
  count, folded = V2_COUNTS[name]
  spec = registry.get_model_spec(name)
  assert spec.num_params == count and spec.timm_name == name + '.snap_dist_in1k' and spec.image_size == 224
  assert model_utils.count_params(registry.create_model(name, num_classes=1000, deploy=True), 224) == folded


def test_v2_timm_layout_full_size():
  """efficientformerv2_s0 at 224 px: stage 2's strided attention attends on 7x7 (table 49), stage 3's downsampling
  attention reads the 14x14 map (table 196), stage 3's blocks attend on 7x7; value width 4 x key dim per head."""
  model = registry.create_model('efficientformerv2_s0', num_classes=1000)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  p = {k: v.shape for k, v in _flat(shapes['params']).items()}
  stats = {k: v.shape for k, v in _flat(shapes['batch_stats']).items()}
  t = 'stages_2/blocks_4/token_mixer/'
  assert p[t + 'attention_biases'] == (8, 49) and p[t + 'stride_conv/conv/kernel'] == (3, 3, 1, 96)
  assert p[t + 'q/conv/kernel'] == (1, 1, 96, 256) and p[t + 'v/conv/kernel'] == (1, 1, 96, 1024)
  assert p[t + 'v_local/conv/kernel'] == (3, 3, 1, 1024) and p[t + 'talking_head1/kernel'] == (1, 1, 8, 8)
  assert 'stages_2/blocks_3/token_mixer/q/conv/kernel' not in p  # Only the last num_vit = 2 blocks attend.
  d = 'stages_3/downsample/attn/'
  assert p[d + 'attention_biases'] == (8, 196) and p[d + 'q/local/kernel'] == (3, 3, 1, 96)
  assert p[d + 'q/proj/conv/kernel'] == (1, 1, 96, 128) and p[d + 'proj/conv/kernel'] == (1, 1, 512, 176)
  assert p['stages_3/blocks_3/token_mixer/attention_biases'] == (8, 49)
  assert p['stages_2/blocks_1/mid/conv/kernel'] == (3, 3, 1, 288)  # mlp ratio 3 (s0's stage 2, block 1).
  assert stats['norm/mean'] == (176,) and stats['stem_conv1/bn/var'] == (16,)


@pytest.fixture(scope='module')
def tiny_v2():
  sd, x, logits, name, overrides = _fixture('efficientformerv2')
  model = registry.create_model(name, num_classes=5, **overrides)
  variables = convert.timm_to_params(name, sd, model_overrides=overrides)
  folded_model, folded = deploy.fold_for_inference(name, variables, num_classes=5, **overrides)

  @jax.jit
  def run(variables, folded, x):
    train, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return dict(eval=model.apply(variables, x), train=train, stats=updated['batch_stats'],
                stages=model.apply(variables, x, norm=True, method='forward_intermediates'),
                features=model.apply(variables, x, method='forward_features'), folded=folded_model.apply(folded, x))
  return model, variables, folded, x, logits, run(variables, folded, jnp.asarray(x))


def test_v2_timm_parity_and_folding(tiny_v2):
  """Eval mode with running statistics: max |logit diff| <= 1e-5 in float32; the folded model (no batch_stats,
  the final BatchNorm an affine) gives the same logits within 1e-5."""
  _, variables, folded, _, logits, out = tiny_v2
  diff = float(np.abs(np.asarray(out['eval']) - logits).max())
  print(f'\n[parity] efficientformerv2: max |logit diff| vs timm = {diff:.2e}')
  assert diff <= 1e-5
  assert set(folded) == {'params'} and set(folded['params']['norm']) == {'scale', 'bias'}
  np.testing.assert_allclose(np.asarray(out['folded']), np.asarray(out['eval']), atol=1e-5, rtol=0)
  assert not any(k.endswith('/bn/scale') for k in _flat(folded['params']))
  assert [s.shape for s in out['stages']] == [(1, 24, 24, 8), (1, 12, 12, 16), (1, 6, 6, 16), (1, 3, 3, 24)]
  np.testing.assert_allclose(out['stages'][-1], out['features'], atol=1e-6)
  assert not np.allclose(out['train'], out['eval'], atol=1e-3)
  assert jax.tree.structure(out['stats']) == jax.tree.structure(variables['batch_stats'])


def test_v2_tables_follow_img_size_through_convert():
  """Converting the 96 px fixture for img_size 128 resizes all three kinds of table (stage 2's strided attention
  3x3 -> 4x4, the downsampling attention 6x6 -> 8x8, stage 3's 3x3 -> 4x4)."""
  sd, _, _, name, overrides = _fixture('efficientformerv2')
  variables = convert.timm_to_params(name, sd, model_overrides={**overrides, 'img_size': 128})
  p = _flat(variables['params'])
  assert p['stages_2/blocks_1/token_mixer/attention_biases'].shape == (2, 16)
  assert p['stages_3/downsample/attn/attention_biases'].shape == (2, 64)
  assert p['stages_3/blocks_1/token_mixer/attention_biases'].shape == (2, 16)
  np.testing.assert_allclose(p['stages_3/downsample/attn/attention_biases'],
                             efficientformer.resize_attention_biases(
                                 sd['stages.3.downsample.attn.attention_biases'], (2, 64)), atol=1e-6)


def test_v2_pieces_by_hand():
  """torch's bilinear x2 (align_corners=False) and the downsampling attention's |query - key| index."""
  x = jnp.asarray([0.0, 1.0, 3.0]).reshape(1, 1, 3, 1)
  up = np.asarray(efficientformer.upsample2_bilinear(jnp.broadcast_to(x, (1, 2, 3, 1))))[0, 0, :, 0]
  np.testing.assert_allclose(up, [0, 0.25, 0.75, 1.5, 2.5, 3])
  index = efficientformer.downsample_bias_index(3)  # Queries at (0, 0), (0, 2), (2, 0), (2, 2).
  assert index.shape == (4, 9) and index[0, 4] == 1 * 3 + 1 and index[3, 0] == 2 * 3 + 2 and index[1, 2] == 0
  model = registry.create_model('efficientformerv2_s0', num_classes=5, **_fixture('efficientformerv2')[4])
  with pytest.raises(ValueError, match='img_size'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  with pytest.raises(ValueError, match='even'):
    jax.eval_shape(model.clone(img_size=80).init, jax.random.key(0), jnp.zeros((1, 80, 80, 3)))


V2_MAIN_OVERRIDES = {'patch_size': 2, 'img_size': 16, 'depths': (1, 1, 1, 1), 'embed_dims': (8, 8, 16, 16),
                     'mlp_ratios': 2.0, 'num_vit': 1, 'attn_key_dim': 8, 'attn_heads': 2, 'attn_ratio': 2.0,
                     'downsample_key_dim': 4}  # 16 px digits: maps 8, 4, 2 (attends on 1x1), 1.


@pytest.mark.slow
def test_main_job_trains_efficientformerv2_on_digits(digits_data_dir, tmp_path):
  """The main job trains efficientformerv2_s0 at tiny width for 3 steps, BatchNorm statistics checkpointed."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
         f'--config.dataset.data_dir={digits_data_dir}', '--config.total_steps=3', '--config.batch_size=16',
         '--config.log_every=1', '--config.eval_every=3', '--config.checkpoint_every=3',
         '--config.optimizer.warmup_steps=1', '--config.model.name=efficientformerv2_s0',
         *[f'--config.model.{k}={v}' for k, v in V2_MAIN_OVERRIDES.items()]]
  env = xla_env.subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'final_metrics.json') as f:
    final = json.load(f)
  assert final['step'] == 3 and all(np.isfinite(v) for v in final.values())
  assert 0 < final['train_loss'] < 10 and 0 <= final['eval_accuracy'] <= 1
  model = registry.create_model('efficientformerv2_s0', num_classes=10, **V2_MAIN_OVERRIDES)
  assert final['num_params'] == model_utils.count_params(model, 16)
  assert b'batch_stats' in (workdir / 'checkpoints' / '3' / 'default' / '_METADATA').read_bytes()
