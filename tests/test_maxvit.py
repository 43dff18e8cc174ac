"""MaxViT: exact timm counts, timm layout, partitions, relative-position bias, TF SAME padding, BatchNorm, resizing.

Parity with timm's logits (both numerics, BatchNorm running statistics included) runs on the committed fixtures of
tests/parity/make_maxvit_fixtures.py; full-size models only through jax.eval_shape.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tests import main_job
from tests import model_utils
from vit_jax import convert
from vit_jax import param_groups
from vit_jax import train
from vit_jax.models import maxvit
from vit_jax.models import registry

FIXTURES = os.path.join(os.path.dirname(__file__), 'parity', 'fixtures')
# The fixtures' architecture: 32 px, 2x2 partitions, stem map 16, stage maps 8 and 4; stage 0 keeps the stem width
# (pool-only strided shortcut), stage 1 widens and has an unstrided second block; head dim 8 -> 2 and 3 heads;
# pre-logits width 20 != last width 24.
TINY = dict(num_classes=5, embed_dim=(16, 24), depths=(1, 2), stem_width=16, head_hidden_size=20, dim_head=8,
            window_size=2, drop_path_rate=0.0)
TINY_SIZE = 32


def _flat_shapes(model, size):
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  return {c: {k: v.shape for k, v in traverse_util.flatten_dict(t, sep='/').items()} for c, t in shapes.items()}


# -- counts, registry, layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('size,expected,reference_m', [
    ('t', 30_916_528, 30.92), ('s', 68_927_956, 68.93), ('b', 119_467_708, 119.47)])
def test_param_counts(size, expected, reference_m):
  """timm 1.0.31: sum(p.numel()) of maxvit_{tiny,small,base}_tf_224; the PyTorch-numerics build has the same
  count (equal table sizes). tests/test_vit.py::test_registered_param_counts counts the models themselves."""
  for name in (f'maxvit_{size}', f'maxvit_{size}_tf_224'):
    assert registry.get_model_spec(name).num_params == expected
  assert abs(expected / 1e6 - reference_m) <= 0.005  # REFERENCE.md section 1 (timm rounding).


def test_registry_metadata():
  assert set(registry.list_models('maxvit*')) == {'maxvit_t', 'maxvit_s', 'maxvit_b', 'maxvit_t_tf_224',
                                                  'maxvit_s_tf_224', 'maxvit_b_tf_224'}
  assert registry.get_model_spec('maxvit_b_tf_224').timm_name == 'maxvit_base_tf_224.in1k'
  assert registry.get_model_spec('maxvit_t').timm_name is None  # timm registers no PyTorch-numerics MaxViT-T.
  tf, pt = registry.create_model('maxvit_s_tf_224', num_classes=10), registry.create_model('maxvit_s', num_classes=10)
  assert (tf.padding, tf.bn_eps, tf.ln_eps, tf.gelu_approximate, tf.head_first, tf.rel_pos_type) == (
      'same', 1e-3, 1e-5, True, False, 'bias_tf')
  assert (pt.padding, pt.bn_eps, pt.ln_eps, pt.gelu_approximate, pt.head_first, pt.rel_pos_type) == (
      'torch', 1e-5, 1e-6, False, True, 'bias')
  assert pt.num_features == 768 and pt.partition == (7, 7) and pt.drop_path_rate == 0.3


def test_timm_layout_full_size():
  """Names and shapes of timm's maxvit_tiny_tf_224 state dict, converted (OIHW -> HWIO, Linear transposed)."""
  flat = _flat_shapes(registry.create_model('maxvit_t_tf_224', num_classes=1000), 224)
  p, stats = flat['params'], flat['batch_stats']
  assert p['stem/conv1/kernel'] == (3, 3, 3, 64) and p['stem/conv1/bias'] == (64,)
  assert stats['stem/norm1/mean'] == (64,) and stats['stem/norm1/var'] == (64,)
  b = 'stages_1/blocks_0/'
  assert p[b + 'conv/shortcut_expand/kernel'] == (1, 1, 64, 128)  # Widening: pool + 1x1 conv with bias.
  assert 'stages_0/blocks_0/conv/shortcut_expand/kernel' not in p  # Stem width = stage 0 width: pool only.
  assert p[b + 'conv/conv1_1x1/kernel'] == (1, 1, 64, 512) and b + 'conv/conv1_1x1/bias' not in p
  assert p[b + 'conv/conv2_kxk/kernel'] == (3, 3, 1, 512) and b + 'conv/conv2_kxk/bias' not in p
  assert p[b + 'conv/se/fc1/kernel'] == (1, 1, 512, 32) and p[b + 'conv/se/fc2/kernel'] == (1, 1, 32, 512)
  assert p[b + 'conv/conv3_1x1/kernel'] == (1, 1, 512, 128) and p[b + 'conv/conv3_1x1/bias'] == (128,)
  assert stats[b + 'conv/pre_norm/mean'] == (64,) and stats[b + 'conv/norm2/var'] == (512,)
  for kind in ('block', 'grid'):
    a = f'{b}attn_{kind}/'
    assert p[a + 'attn/qkv/kernel'] == (128, 384) and p[a + 'attn/proj/kernel'] == (128, 128)
    assert p[a + 'attn/rel_pos/relative_position_bias_table'] == (4, 13, 13)  # (heads, 2P-1, 2P-1), P = 7.
    assert p[a + 'mlp/fc1/kernel'] == (128, 512) and p[a + 'norm1/scale'] == (128,)
  assert p['norm/scale'] == (512,) and p['pre_logits/kernel'] == (512, 512) and p['head/kernel'] == (512, 1000)
  torch_style = _flat_shapes(maxvit.MaxViT(**{**TINY, 'window_size': None, 'img_size': 224}), 224)['params']
  assert torch_style['stages_1/blocks_0/attn_grid/attn/rel_pos/relative_position_bias_table'] == (169, 3)


def test_counts_grow_with_resolution():
  """The bias tables follow the partition img_size // 32 (timm's sizing): 64 -> 128 px takes every table from
  3x3 to 7x7 offsets (2 + 3 + 3 heads per attention, block and grid)."""
  small = maxvit.MaxViT(**{**TINY, 'window_size': None, 'img_size': 64})
  big = maxvit.MaxViT(**{**TINY, 'window_size': None, 'img_size': 128})
  assert small.partition == (2, 2) and big.partition == (4, 4)
  grown = 2 * (2 + 3 + 3) * (7 * 7 - 3 * 3)
  assert model_utils.count_params(big, 128) == model_utils.count_params(small, 64) + grown


# -- geometry --------------------------------------------------------------------------------------------------------

def test_partitions_by_hand():
  x = jnp.arange(4 * 6, dtype=jnp.float32).reshape(1, 4, 6, 1)  # value = 6 * row + col
  windows = maxvit.window_partition(x, (2, 3))
  assert windows.shape == (4, 6, 1)
  np.testing.assert_array_equal(windows[1, :, 0], [3, 4, 5, 9, 10, 11])  # Window (0, 1): rows 0-1, cols 3-5.
  grid = maxvit.grid_partition(x, (2, 3))
  assert grid.shape == (4, 6, 1)
  # Group (0, 1): the 2x3 tokens at rows 0 + 2i, cols 1 + 2j (strides H/2 = 2, W/3 = 2).
  np.testing.assert_array_equal(grid[1, :, 0], [1, 3, 5, 13, 15, 17])
  np.testing.assert_array_equal(maxvit.window_reverse(windows, (2, 3), (4, 6)), x)
  np.testing.assert_array_equal(maxvit.grid_reverse(grid, (2, 3), (4, 6)), x)


def test_rel_pos_bias_by_hand():
  # Swin / timm RelPosBias index (REFERENCE.md section 3): query - key offsets.
  np.testing.assert_array_equal(maxvit.rel_pos_index((2, 2)), [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3],
                                                                [8, 7, 5, 4]])
  rng = np.random.default_rng(0)
  p, heads = (2, 3), 2
  swin = rng.standard_normal((3 * 5, heads)).astype(np.float32)
  tf = rng.standard_normal((heads, 3, 5)).astype(np.float32)
  got_swin = np.asarray(maxvit.rel_pos_bias(jnp.asarray(swin), p, 'bias'))
  got_tf = np.asarray(maxvit.rel_pos_bias(jnp.asarray(tf), p, 'bias_tf'))
  tokens = [(r, c) for r in range(p[0]) for c in range(p[1])]
  for i, (qr, qc) in enumerate(tokens):
    for j, (kr, kc) in enumerate(tokens):
      np.testing.assert_array_equal(got_swin[:, i, j], swin[(qr - kr + 1) * 5 + qc - kc + 2])
      np.testing.assert_array_equal(got_tf[:, i, j], tf[:, kr - qr + 1, kc - qc + 2])  # TF: key - query.


def test_conv_pads():
  """PyTorch pads symmetrically; TF SAME puts the odd pixel at the end (stride-2 3x3 on even maps, 2x2 pools on
  odd maps)."""
  assert maxvit.conv_pads((224, 224), 3, 2, 'torch') == ((1, 1), (1, 1))
  assert maxvit.conv_pads((224, 112), 3, 2, 'same') == ((0, 1), (0, 1))
  assert maxvit.conv_pads((7, 7), 3, 1, 'same') == ((1, 1), (1, 1))
  assert maxvit.conv_pads((7, 8), 2, 2, 'same') == ((0, 1), (0, 0))
  x = jnp.ones((1, 3, 3, 1))
  np.testing.assert_allclose(maxvit.avg_pool2(x, 'same')[0, :, :, 0], [[1, 0.5], [0.5, 0.25]])  # Zeros counted.
  assert maxvit.avg_pool2(x, 'torch').shape == (1, 1, 1, 1)
  assert maxvit.make_divisible(24 * 4) == 96 and maxvit.make_divisible(20) == 24


def test_input_size_errors():
  model = maxvit.MaxViT(**TINY)
  with pytest.raises(ValueError, match='multiples of 16'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 40, 40, 3)))
  with pytest.raises(ValueError, match='padding'):
    jax.eval_shape(maxvit.MaxViT(**{**TINY, 'padding': 'SAME'}).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='at least 32'):
    jax.eval_shape(maxvit.MaxViT(**{**TINY, 'window_size': None, 'img_size': 16}).init, jax.random.key(0),
                   jnp.zeros((1, 32, 32, 3)))


# -- BatchNorm, forwards ----------------------------------------------------------------------------------------------

def _fixture(name):
  """(timm state dict, input, timm logits, our model name, our overrides) of a committed parity fixture."""
  with open(os.path.join(FIXTURES, name + '.json')) as f:
    meta = json.load(f)
  io = np.load(os.path.join(FIXTURES, name + '.npz'))
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
  sd = convert.load_safetensors(os.path.join(FIXTURES, name + '.safetensors'))
  return sd, io['input_nhwc'], io['logits'], meta['model'], overrides


@pytest.fixture(scope='module')
def tiny():
  """The PyTorch-numerics fixture converted through timm_to_params; one jitted program gives its eval logits,
  features and pre-logits, and a train-mode forward with the updated BatchNorm statistics."""
  sd, x, logits, name, overrides = _fixture('maxvit')
  model = registry.create_model(name, num_classes=5, **overrides)
  variables = convert.timm_to_params(name, sd, model_overrides=overrides)

  @jax.jit
  def run(variables, x):
    train, updated = model.apply(variables, x, train=True, mutable=['batch_stats'],
                                 rngs={'dropout': jax.random.key(1)})
    feats = model.apply(variables, x, method='forward_features')
    return dict(eval=model.apply(variables, x), train=train, stats=updated['batch_stats'], features=feats,
                pre_logits=model.apply(variables, feats, pre_logits=True, method='forward_head'))
  return model, variables, x, logits, run(variables, jnp.asarray(x))


def test_timm_parity_pytorch_numerics(tiny):
  """maxvit_t numerics (symmetric pads, BN eps 1e-5, exact GELU, per-head qkv, Swin-style table) in eval mode with
  the checkpoint's BatchNorm running statistics."""
  _, _, _, logits, out = tiny
  assert np.abs(np.asarray(out['eval']) - logits).max() <= 1e-5


def test_timm_parity_tf_numerics():
  """maxvit_*_tf_224 numerics (TF SAME pads, BN eps 1e-3, LN eps 1e-5, tanh GELU, [q|k|v], TF table)."""
  sd, x, logits, name, overrides = _fixture('maxvit_tf')
  variables = convert.timm_to_params(name, sd, model_overrides=overrides)
  assert set(variables) == {'params', 'batch_stats'}
  model = registry.create_model(name, num_classes=5, **overrides)
  got = jax.jit(model.apply)(variables, x)
  assert np.abs(np.asarray(got) - logits).max() <= 1e-5


def test_head_is_timm_norm_mlp_head(tiny):
  """pre-logits = tanh(Linear(LayerNorm(mean over H, W))) of the unnormed last map (timm NormMlpClassifierHead)."""
  _, variables, _, _, out = tiny
  p = variables['params']
  pooled = np.asarray(out['features'], np.float64).mean(axis=(1, 2))
  normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True) + 1e-6)
  normed = normed * p['norm']['scale'] + p['norm']['bias']
  want = np.tanh(normed @ p['pre_logits']['kernel'] + p['pre_logits']['bias'])
  assert out['features'].shape == (2, 4, 4, 24) and out['pre_logits'].shape == (2, 20)
  np.testing.assert_allclose(out['pre_logits'], want, atol=1e-5)
  np.testing.assert_allclose(out['eval'], np.asarray(out['pre_logits']) @ p['head']['kernel'] + p['head']['bias'],
                             atol=1e-5)


def test_batch_norm_statistics(tiny):
  """Eval uses the running statistics; train mode normalises by the batch and moves the statistics by 0.1."""
  model, variables, _, _, out = tiny
  assert not np.allclose(out['train'], out['eval'], atol=1e-3)
  old = variables['batch_stats']['stem']['norm1']
  new = out['stats']['stem']['norm1']
  conv1 = _stem_conv1(variables['params']['stem']['conv1'], tiny[2], model.padding)
  batch_mean = np.asarray(conv1).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(new['mean'], 0.9 * np.asarray(old['mean']) + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(out['stats']) == jax.tree.structure(variables['batch_stats'])


def _stem_conv1(conv, x, padding):
  """The stem's first conv, by lax (the input of the first BatchNorm)."""
  pads = maxvit.conv_pads(x.shape[1:3], 3, 2, padding)
  y = jax.lax.conv_general_dilated(x, conv['kernel'], (2, 2), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return y + conv['bias']


@pytest.mark.slow  # Compiling the backward pass takes ~20 s or more on a 2-core CPU.
def test_every_param_gets_gradient(tiny):
  """Train mode (BatchNorm on batch statistics): every parameter receives a non-zero gradient."""
  model, variables, x, _, _ = tiny

  def loss(params):
    out, _ = model.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'],
                         rngs={'dropout': jax.random.key(1)})
    return jnp.sum(out ** 2)
  grads = jax.jit(jax.grad(loss))(variables['params'])
  dead = [k for k, g in traverse_util.flatten_dict(grads, sep='/').items() if not np.any(np.asarray(g))]
  assert not dead, dead


def test_fixture_architecture_is_the_tiny_config():
  """The committed fixtures are built from TINY (so the parity tests below exercise these shapes)."""
  for name in ('maxvit', 'maxvit_tf'):
    with open(os.path.join(FIXTURES, name + '.json')) as f:
      meta = json.load(f)
    ours = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
    assert {**ours, 'num_classes': meta['num_classes']} == TINY


# -- facts: heads, resizing, layer grouping --------------------------------------------------------------------------

def test_new_class_count_reinitialises_only_the_classifier():
  sd, _, _, name, overrides = _fixture('maxvit_tf')
  variables = convert.timm_to_params(name, sd, num_classes=3, model_overrides=overrides)
  params = variables['params']
  assert params['head']['kernel'].shape == (20, 3) and not np.any(params['head']['kernel'])
  np.testing.assert_array_equal(params['pre_logits']['kernel'], sd['head.pre_logits.fc.weight'].T)
  np.testing.assert_array_equal(params['norm']['scale'], sd['head.norm.weight'])


def test_resolution_change_resizes_the_bias_tables():
  """A checkpoint of 2x2 partitions loaded into a model of 4x4 partitions (the 64 px build of the same
  architecture): every table is resized per head with PyTorch's bicubic; everything else is copied."""
  sd, _, _, name, overrides = _fixture('maxvit_tf')
  big = {**overrides, 'window_size': 4}
  assert maxvit.FACTS.infer_image_size(sd, big) == 128  # The input size that fits the target's partitions.
  params = convert.timm_to_params(name, sd, model_overrides=big)['params']
  key = 'stages.1.blocks.1.attn_grid.attn.rel_pos.relative_position_bias_table'
  table = params['stages_1']['blocks_1']['attn_grid']['attn']['rel_pos']['relative_position_bias_table']
  assert sd[key].shape == (3, 3, 3) and table.shape == (3, 7, 7)
  np.testing.assert_allclose(table, maxvit.resize_rel_table(sd[key], (3, 7, 7)), rtol=1e-6)
  np.testing.assert_array_equal(params['stages_1']['blocks_1']['attn_grid']['attn']['qkv']['bias'],
                                sd['stages.1.blocks.1.attn_grid.attn.qkv.bias'])
  with pytest.raises(ValueError, match='head counts'):
    maxvit.resize_rel_table(sd[key], (4, 7, 7))


def test_table_resize_matches_torch_bicubic():
  """resize.npz (make_fixtures.py): torch F.interpolate bicubic of (2P-1)^2 x heads tables, up and down; the
  TF layout (heads, 2P-1, 2P-1) is the same resize per head."""
  ref = np.load(os.path.join(FIXTURES, 'resize.npz'))
  for name in ('table_3_to_5', 'table_5_to_3'):
    table, want = ref[name + '_in'], ref[name + '_out']
    np.testing.assert_allclose(maxvit.resize_rel_table(table, want.shape), want, atol=1e-5)
    side_in, side_out = int(np.sqrt(table.shape[0])), int(np.sqrt(want.shape[0]))
    tf = maxvit.resize_rel_table(table.T.reshape(-1, side_in, side_in), (table.shape[1], side_out, side_out))
    np.testing.assert_allclose(tf.reshape(table.shape[1], -1).T, want, atol=1e-5)
  assert maxvit.FACTS.resize('stages_0/blocks_0/conv/conv1_1x1/kernel', np.zeros(2), (3,), None) is None


def test_layer_grouping_decay_and_freezing():
  """Stem = layer 0, blocks 1..3 in forward order (MBConv + both attentions of a block together), head = 4."""
  params = model_utils.abstract_params(maxvit.MaxViT(**TINY), TINY_SIZE)
  names = param_groups.all_names(params)
  ids, num_blocks = param_groups.layer_ids(names, family='maxvit')
  assert num_blocks == 3
  assert ids['stem/conv1/kernel'] == 0 and ids['stem/norm1/scale'] == 0
  assert ids['stages_0/blocks_0/conv/conv1_1x1/kernel'] == 1
  assert ids['stages_1/blocks_0/conv/shortcut_expand/kernel'] == 2
  assert ids['stages_1/blocks_1/attn_grid/attn/rel_pos/relative_position_bias_table'] == 3
  assert {ids[n] for n in names if n.split('/')[0] in ('norm', 'pre_logits', 'head')} == {4}
  assert param_groups.layer_ids(names) == (ids, num_blocks)  # Detected from the names alone, too.
  mults = traverse_util.flatten_dict(param_groups.lr_multipliers(params, layer_decay=0.5, family='maxvit'),
                                     sep='/')
  assert mults['stem/conv1/kernel'] == 0.5 ** 4 and mults['stages_1/blocks_0/attn_block/mlp/fc1/kernel'] == 0.25
  assert mults['head/kernel'] == 1.0
  frozen = traverse_util.flatten_dict(param_groups.frozen_labels(params, '^(stem|stages_0)/'), sep='/')
  assert {n for n, v in frozen.items() if v == 'frozen'} == {n for n in names if ids[n] <= 1}


# -- the main job trains MaxViT at tiny width on digits --------------------------------------------------------------

# The default config's 16 px digits: stem map 8, two stages (maps 4 and 2) with 2x2 partitions. The config's
# model.patch_size (4, for its ViT) is MaxViT's stem stride: set back to the paper's 2.
MAIN_OVERRIDES = {'patch_size': 2, 'embed_dim': (8, 16), 'depths': (1, 1), 'stem_width': 8, 'dim_head': 8,
                  'window_size': 2}


@pytest.mark.slow
def test_main_job_trains_maxvit_on_digits(digits_data_dir, tmp_path):
  """The main job's config (configs/default.py, model.name=maxvit_t) trains 3 steps; the BatchNorm statistics are in
  the train state's checkpoint."""
  workdir = tmp_path / 'run'
  train.train_and_evaluate(main_job.short_run_config(digits_data_dir, 'maxvit_t', **MAIN_OVERRIDES), str(workdir))
  with open(workdir / 'final_metrics.json') as f:
    final = json.load(f)
  assert final['step'] == 3 and all(np.isfinite(v) for v in final.values())
  assert 0 < final['train_loss'] < 10 and 0 <= final['eval_accuracy'] <= 1
  model = registry.create_model('maxvit_t', num_classes=10, **MAIN_OVERRIDES)
  assert final['num_params'] == model_utils.count_params(model, 16)
  assert b'batch_stats' in (workdir / 'checkpoints' / '3' / 'default' / '_METADATA').read_bytes()
