"""MobileViT v1 and v2: exact timm counts, timm layout, unfold / fold and PyTorch's bilinear resize, parity with
BatchNorm running statistics, BatchNorm folding, layer grouping, init_from and the main job.

Parity with timm's logits runs on the committed fixtures of tests/parity/make_mobilevit_fastvit_fixtures.py (tiny
timm ByobNets of timm's mobilevit / mobilevitv2 blocks, random weights and statistics, a 3x3 map resized around
its global block); full-size models only through jax.eval_shape.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests import model_utils
from tests import xla_env
from vit_jax import convert
from vit_jax import deploy
from vit_jax import finetune
from vit_jax import param_groups
from vit_jax.models import mobilevit
from vit_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'parity', 'fixtures')
V1 = ('mobilevit_xxs', 'mobilevit_xs', 'mobilevit_s')
V2 = tuple(f'mobilevitv2_{v}' for v in ('050', '075', '100', '125', '150', '175', '200'))


def _fixture(name):
  base = os.path.join(FIXTURES, name)
  with open(base + '.json') as f:
    meta = json.load(f)
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
  with np.load(base + '.npz') as data:
    io = {k: data[k] for k in data.files}
  return meta, overrides, io, convert.load_safetensors(base + '.safetensors')


def _flat_shapes(name, size=64):
  model = registry.create_model(name, num_classes=1000)
  shapes = model_utils.abstract_variables(model, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return {c: {k: v.shape for k, v in traverse_util.flatten_dict(t, sep='/').items()} for c, t in shapes.items()}


# -- registry, layout ----------------------------------------------------------------------------------------------

def test_registry_metadata():
  """timm 1.0.31 counts (sum of parameter numel, 1000 classes; tests/test_vit.py counts the models themselves)."""
  assert set(registry.list_models('mobilevit*')) == set(V1 + V2)
  counts = {n: registry.get_model_spec(n).num_params for n in V1 + V2}
  assert counts == {'mobilevit_xxs': 1_272_024, 'mobilevit_xs': 2_317_848, 'mobilevit_s': 5_578_632,
                    'mobilevitv2_050': 1_370_593, 'mobilevitv2_075': 2_866_009, 'mobilevitv2_100': 4_901_841,
                    'mobilevitv2_125': 7_478_089, 'mobilevitv2_150': 10_594_753, 'mobilevitv2_175': 14_251_833,
                    'mobilevitv2_200': 18_449_329}
  for name in V1 + V2:
    spec = registry.get_model_spec(name)
    assert spec.timm_name == name + '.cvnets_in1k' and spec.image_size == 256
    assert spec.family == ('mobilevit' if name in V1 else 'mobilevitv2')
  assert registry.create_model('mobilevit_s', num_classes=3).num_features == 640
  assert registry.create_model('mobilevitv2_075', num_classes=3).num_features == 384


def test_timm_layout_full_size():
  p, stats = (lambda f: (f['params'], f['batch_stats']))(_flat_shapes('mobilevit_xs'))
  assert p['stem/conv/kernel'] == (3, 3, 3, 16) and stats['stem/bn/mean'] == (16,)
  assert p['stages_1/blocks_0/conv1_1x1/conv/kernel'] == (1, 1, 32, 128)  # Expand x4 of the input width.
  assert p['stages_1/blocks_0/conv2_kxk/conv/kernel'] == (3, 3, 1, 128)
  b = 'stages_2/blocks_1/'
  assert p[b + 'conv_kxk/conv/kernel'] == (3, 3, 64, 64) and p[b + 'conv_1x1/kernel'] == (1, 1, 64, 96)
  assert p[b + 'transformer_1/attn/qkv/kernel'] == (96, 288) and p[b + 'transformer_1/mlp/fc1/kernel'] == (96, 192)
  assert p[b + 'norm/scale'] == (96,) and p[b + 'conv_fusion/conv/kernel'] == (3, 3, 128, 64)
  assert 'stages_2/blocks_2/conv_kxk/conv/kernel' not in p
  assert p['final_conv/conv/kernel'] == (1, 1, 96, 384) and p['head/kernel'] == (384, 1000)
  p = _flat_shapes('mobilevitv2_100')['params']
  b = 'stages_3/blocks_1/'
  assert p[b + 'conv_kxk/conv/kernel'] == (3, 3, 1, 384) and p[b + 'conv_1x1/kernel'] == (1, 1, 384, 192)
  assert p[b + 'transformer_3/attn/qkv_proj/kernel'] == (1, 1, 192, 385)  # 1 score + keys + values.
  assert p[b + 'transformer_3/mlp/fc2/kernel'] == (1, 1, 384, 192) and p[b + 'norm/scale'] == (192,)
  assert b + 'conv_fusion/conv/kernel' not in p and 'final_conv/conv/kernel' not in p
  assert p['head/kernel'] == (512, 1000)


def test_bad_options_are_named():
  with pytest.raises(ValueError, match='version'):
    jax.eval_shape(registry.create_model('mobilevit_xxs', num_classes=2, version=3).init, jax.random.key(0),
                   jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='one entry per stage'):
    jax.eval_shape(registry.create_model('mobilevit_xxs', num_classes=2, ir_depths=(1, 1)).init,
                   jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# -- unfold / fold and the bilinear resize, by hand -----------------------------------------------------------------

def test_unfold_fold_by_hand():
  x = jnp.arange(4 * 6, dtype=jnp.float32).reshape(1, 4, 6, 1)  # value = 6 * row + col
  patches = mobilevit.unfold(x, 2)
  assert patches.shape == (1, 4, 6, 1)  # 4 pixel offsets, 2 x 3 patches.
  np.testing.assert_array_equal(patches[0, 0, :, 0], [0, 2, 4, 12, 14, 16])  # Offset (0, 0) of every patch.
  np.testing.assert_array_equal(patches[0, 3, :, 0], [7, 9, 11, 19, 21, 23])  # Offset (1, 1).
  np.testing.assert_array_equal(mobilevit.fold(patches, 2, (4, 6)), x)


def test_bilinear_resize_matches_torch_formulas():
  """A ramp stays a ramp with align_corners=True; align_corners=False samples at (i + 0.5) * in / out - 0.5,
  clamped at the borders (PyTorch's F.interpolate)."""
  ramp = np.array([0.0, 1.0, 2.0])
  np.testing.assert_allclose(mobilevit.linear_resize_matrix(3, 4, True) @ ramp, [0, 2 / 3, 4 / 3, 2])
  np.testing.assert_allclose(mobilevit.linear_resize_matrix(3, 4, False) @ ramp, [0, 0.625, 1.375, 2])
  np.testing.assert_allclose(mobilevit.linear_resize_matrix(4, 3, False) @ np.arange(4.0), [1 / 6, 1.5, 17 / 6])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 5, 2)), jnp.float32)
  np.testing.assert_allclose(mobilevit.resize_bilinear(x, (3, 5), align_corners=False), x, atol=1e-6)


# -- parity, BatchNorm ------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module', params=['mobilevit', 'mobilevitv2'])
def tiny(request):
  meta, overrides, io, sd = _fixture(request.param)
  variables = convert.timm_to_params(meta['model'], sd, model_overrides=overrides)
  model = registry.create_model(meta['model'], num_classes=5, **overrides)
  folded_model, folded = deploy.fold_for_inference(meta['model'], variables, num_classes=5, **overrides)

  @jax.jit
  def run(variables, folded, x):
    train, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return dict(eval=model.apply(variables, x), train=train, stats=updated['batch_stats'],
                folded=folded_model.apply(folded, x), folded_params=folded['params'])
  return request.param, model, variables, io, run(variables, folded, jnp.asarray(io['input_nhwc']))


def test_timm_parity(tiny):
  """Eval mode with the checkpoint's BatchNorm running statistics (v1: attention over unfolded patches, fusion
  conv; v2: separable linear attention, GroupNorm; both: a 3x3 map resized as timm does)."""
  _, _, _, io, out = tiny
  assert np.abs(np.asarray(out['eval']) - io['logits']).max() <= 1e-5


def test_folded_model_matches_unfolded(tiny):
  """fold_for_inference folds every BatchNorm into its conv (inference_mode=True): the same logits, no statistics,
  and C fewer parameters per BatchNorm of C channels (timm has no fused MobileViT: its count is the train count)."""
  _, _, variables, _, out = tiny
  assert np.abs(np.asarray(out['folded']) - np.asarray(out['eval'])).max() <= 1e-5
  channels = sum(v.size for v in jax.tree.leaves(variables['batch_stats'])) // 2
  count = lambda t: sum(v.size for v in jax.tree.leaves(t))
  assert count(out['folded_params']) == count(variables['params']) - channels
  flat = traverse_util.flatten_dict(out['folded_params'], sep='/')
  assert flat['stem/conv/bias'].shape == (8,) and not any('/bn/' in k for k in flat)
  with pytest.raises(ValueError, match='running statistics'):
    mobilevit.fold_batchnorms({}, {'params': variables['params']})


def test_batch_norm_statistics(tiny):
  _, _, variables, io, out = tiny
  assert not np.allclose(out['train'], out['eval'], atol=1e-3)
  assert jax.tree.structure(out['stats']) == jax.tree.structure(variables['batch_stats'])
  x = io['input_nhwc']
  conv = jax.lax.conv_general_dilated(x, variables['params']['stem']['conv']['kernel'], (2, 2), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  old = variables['batch_stats']['stem']['bn']
  np.testing.assert_allclose(out['stats']['stem']['bn']['mean'],
                             0.9 * old['mean'] + 0.1 * np.asarray(conv).mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)


def test_features_and_stages():
  """forward_features: v1's final conv map (v2: the last stage's); stage maps at strides 2 .. 32 (v2 keeps the
  resized 4x4 map of stage 3, v1 returns to 3x3)."""
  for name, width, stage3 in (('mobilevit', 40, 3), ('mobilevitv2', 24, 4)):
    meta, overrides, io, _ = _fixture(name)
    model = registry.create_model(meta['model'], num_classes=5, **overrides)
    x = jax.ShapeDtypeStruct(io['input_nhwc'].shape, jnp.float32)
    variables = model_utils.abstract_variables(model, x)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, method='forward_features'), variables, x)
    stages = jax.eval_shape(lambda v, x: model.apply(v, x, method='forward_intermediates'), variables, x)
    assert feats.shape == (2, 2, 2, width) and model.num_features == width
    assert [s.shape[1] for s in stages] == [24, 12, 6, stage3, 2]


# -- facts: heads, layer grouping, init_from -----------------------------------------------------------------------

def test_new_class_count_reinitialises_only_the_classifier():
  meta, overrides, _, sd = _fixture('mobilevitv2')
  params = convert.timm_to_params(meta['model'], sd, num_classes=3, model_overrides=overrides)['params']
  assert params['head']['kernel'].shape == (24, 3) and not np.any(params['head']['kernel'])
  np.testing.assert_array_equal(params['stages_2']['blocks_1']['transformer_0']['attn']['qkv_proj']['kernel'],
                                sd['stages.2.1.transformer.0.attn.qkv_proj.weight'].transpose(2, 3, 1, 0))


def test_layer_grouping():
  meta, overrides, _, _ = _fixture('mobilevit')
  model = registry.create_model(meta['model'], num_classes=5, **overrides)
  names = param_groups.all_names(model_utils.abstract_params(model, 32))
  ids, num_blocks = param_groups.layer_ids(names, family='mobilevit')
  assert num_blocks == 9  # 1 + 2 inverted residuals, then 2 per stage for stages 2-4.
  assert ids['stem/conv/kernel'] == 0 and ids['stages_0/blocks_0/conv1_1x1/conv/kernel'] == 1
  assert ids['stages_2/blocks_1/transformer_0/attn/qkv/kernel'] == 5
  assert ids['final_conv/conv/kernel'] == 10 and ids['head/kernel'] == 10
  assert param_groups.layer_ids(names) == (ids, num_blocks)


def test_init_from_converted_timm_weights_with_a_new_head(tmp_path):
  meta, overrides, _, sd = _fixture('mobilevit')
  out = tmp_path / 'converted'
  convert.convert_file(meta['model'], os.path.join(FIXTURES, 'mobilevit.safetensors'), str(out),
                       model_overrides=overrides)
  model = registry.create_model(meta['model'], num_classes=10, **overrides)
  shapes = model_utils.abstract_variables(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  init = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)
  loaded = finetune.load_variables(str(out), init)
  assert loaded['params']['head']['kernel'].shape == (40, 10)
  np.testing.assert_array_equal(loaded['params']['head']['kernel'], init['params']['head']['kernel'])
  np.testing.assert_allclose(loaded['params']['stages_3']['blocks_1']['transformer_1']['attn']['qkv']['kernel'],
                             sd['stages.3.1.transformer.1.attn.qkv.weight'].T)
  np.testing.assert_allclose(loaded['batch_stats']['final_conv']['bn']['mean'], sd['final_conv.bn.running_mean'])


# -- the main job trains MobileViT v1 and v2 at tiny width on digits -------------------------------------------------

MAIN_OVERRIDES = {  # 16 px digits: stage maps 8, 8, 4, 2, 1, 1 (patch 2: the 1x1 maps are resized).
    'mobilevit_xxs': {'patch_size': 2, 'stem_width': 8, 'widths': (8, 8, 16, 16, 16), 'ir_depths': (1, 1, 1, 1, 1),
                      'transformer_depths': (0, 0, 1, 1, 1), 'transformer_dims': (0, 0, 16, 16, 16),
                      'final_width': 32},
    'mobilevitv2_050': {'patch_size': 2, 'stem_width': 8, 'widths': (8, 8, 16, 16, 16),
                        'ir_depths': (1, 1, 1, 1, 1), 'transformer_depths': (0, 0, 1, 1, 1)},
}


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(MAIN_OVERRIDES))
def test_main_job_trains_mobilevit_on_digits(name, digits_data_dir, tmp_path):
  """`python -m vit_jax.main --config=configs/default.py --config.model.name=...` trains 3 steps; the BatchNorm
  statistics are in the checkpoint."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
         f'--config.dataset.data_dir={digits_data_dir}', '--config.total_steps=3', '--config.batch_size=16',
         '--config.log_every=1', '--config.eval_every=3', '--config.checkpoint_every=3',
         '--config.optimizer.warmup_steps=1', f'--config.model.name={name}',
         *[f'--config.model.{k}={v}' for k, v in MAIN_OVERRIDES[name].items()]]
  env = xla_env.subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)  # 736 s seen at load 30.
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'final_metrics.json') as f:
    final = json.load(f)
  assert final['step'] == 3 and all(np.isfinite(v) for v in final.values())
  assert 0 < final['train_loss'] < 10 and 0 <= final['eval_accuracy'] <= 1
  model = registry.create_model(name, num_classes=10, **MAIN_OVERRIDES[name])
  assert final['num_params'] == model_utils.count_params(model, 16)
  assert b'batch_stats' in (workdir / 'checkpoints' / '3' / 'default' / '_METADATA').read_bytes()
