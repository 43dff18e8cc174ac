"""LeViT and EfficientViT-M (MSRA): published counts before and after BatchNorm folding, the timm-style API,
timm parity on committed fixtures (random weights and running statistics), deploy folding, conversion with a new
head and init_from, and a few training steps of the main job per family.

Fixtures under tests/parity/fixtures/{levit,efficientvit_m}.* were made by
tests/parity/make_levit_efficientvit_fixtures.py (torch + timm); these tests need neither.
"""
import ast
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from tests import xla_env
from vit_jax import convert
from vit_jax import deploy
from vit_jax import finetune
from vit_jax.models import efficientvit_msra
from vit_jax.models import levit
from vit_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'parity', 'fixtures')
NUM_CLASSES = 3

# timm 1.0.31 counts at 224 px / 1000 classes: (as trained, BatchNorm fused) - REFERENCE.md section 7 for LeViT;
# EfficientViT-M from timm (sum of parameter numel, before and after fusing every ConvNorm / NormLinear).
COUNTS = {
    'levit_128s': (7_777_058, 7_756_466), 'levit_128': (9_213_936, 9_188_864),
    'levit_192': (10_947_069, 10_918_613), 'levit_256': (18_893_876, 18_856_276),
    'levit_384': (39_128_836, 39_074_100),
    'efficientvit_m0': (2_349_436, 2_334_916), 'efficientvit_m1': (2_980_560, 2_964_256),
    'efficientvit_m2': (4_187_554, 4_168_338), 'efficientvit_m3': (6_900_722, 6_875_890),
    'efficientvit_m4': (8_804_228, 8_776_340), 'efficientvit_m5': (12_473_772, 12_436_260),
}
QUICK = ('levit_128s', 'efficientvit_m0')  # The others' folded counts are slow-marked (eval_shape of a full-size model each).

# family: (registry name, tiny overrides, image size, per-stage (stride, width))
TINY = {
    'levit': ('levit_128s', dict(embed_dim=(16, 24), key_dim=8, num_heads=(2, 3), depth=(1, 1), patch_size=8), 32,
              [(8, 16), (16, 24)]),
    # Windows of 2 on maps 4, 2, 1: stage 0 attends in four windows, the others in one.
    'efficientvit_m': ('efficientvit_m0', dict(embed_dim=(8, 16, 16), key_dim=4, num_heads=(2, 2, 2),
                                               depth=(1, 1, 1), window_size=2, kernels=(5, 3), patch_size=8), 32,
                       [(8, 8), (16, 16), (32, 16)]),
}


def _model(family, **kw):
  name, overrides, _, _ = TINY[family]
  return registry.create_model(name, num_classes=NUM_CLASSES, **{**overrides, 'drop_path_rate': 0.0, **kw})


def _random_variables(model, size, seed=0):
  """Random params and positive running variances (so eval-mode BatchNorm and folding are non-trivial)."""
  v = model_utils.random_variables(model, jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32), seed=seed)
  stats = jax.tree_util.tree_map_with_path(
      lambda p, x: 0.5 + jnp.abs(x) if p[-1].key == 'var' else x, v['batch_stats'])
  return {'params': v['params'], 'batch_stats': stats}


# -- registry ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow) for n in COUNTS])
def test_counts_before_and_after_folding(name):
  """Registered counts (checked by eval_shape in test_vit's registry-wide test) and the deploy form's count =
  timm's fused count."""
  spec = registry.get_model_spec(name)
  assert spec.num_params == COUNTS[name][0] and spec.timm_name.startswith(name) and spec.image_size == 224
  model = registry.create_model(name, num_classes=1000, deploy=True)
  variables = model_utils.abstract_variables(model, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  assert set(variables) == {'params'}  # No BatchNorm left.
  assert model_utils.count(variables['params']) == COUNTS[name][1]


def test_levit_published_shapes():
  kw = registry.get_model_spec('levit_256').kwargs
  assert (kw['embed_dim'], kw['key_dim'], kw['num_heads'], kw['depth']) == ((256, 384, 512), 32, (4, 6, 8),
                                                                              (4, 4, 4))
  model = registry.create_model('levit_128s', num_classes=1000)
  assert (model.patch_size, model.attn_ratio, model.mlp_ratio) == (16, 2.0, 2.0)
  assert model.stage_resolutions(224, 224) == [(14, 14), (7, 7), (4, 4)]


def test_levit_analytic_macs():
  """LeViT-128S: 305 MFLOPs in the paper (multiply-adds at 224 px); the analytic count is within 2% of XLA's in
  test_family_facts."""
  macs = levit.forward_macs(registry.create_model('levit_128s', num_classes=1000), 224)
  assert macs == pytest.approx(305e6, rel=0.02)


def test_attention_bias_index():
  """timm's attention_bias_idxs: |dy| * W + |dx| between (strided) query and key positions."""
  idx = levit.attention_bias_index((2, 2), (2, 2), 1)
  np.testing.assert_array_equal(idx, [[0, 1, 2, 3], [1, 0, 3, 2], [2, 3, 0, 1], [3, 2, 1, 0]])
  down = levit.attention_bias_index((2, 2), (3, 3), 2)  # Queries at (0, 0), (0, 2), (2, 0), (2, 2).
  np.testing.assert_array_equal(down[1], [2, 1, 0, 5, 4, 3, 8, 7, 6])
  np.testing.assert_array_equal(down[3], [8, 7, 6, 5, 4, 3, 2, 1, 0])


# -- the timm-style API ----------------------------------------------------------------------------------------------

@pytest.fixture(scope='module', params=sorted(TINY))
def outputs(request):
  """One jitted program per family: features, head, pre-logits, per-stage maps, remat / 'xla'-attention logits,
  the train-mode output and updated statistics, and the deploy form's logits."""
  family = request.param
  name, overrides, size, _ = TINY[family]
  model, remat = _model(family), _model(family, remat=True)
  xla = _model(family, attention_impl='xla') if family == 'levit' else model  # EfficientViT-M: cascaded only.
  x = model_utils.images(2, size)
  variables = _random_variables(model, size)
  folded_model, folded = deploy.fold_for_inference(name, variables, num_classes=NUM_CLASSES,
                                                   **{**overrides, 'drop_path_rate': 0.0})

  @jax.jit
  def run(v, fv, x):
    feats = model.apply(v, x, method='forward_features')
    train_out, updates = model.apply(v, x, train=True, mutable=['batch_stats'])
    return dict(features=feats, head=model.apply(v, feats, train=False, method='forward_head'),
                pre_logits=model.apply(v, feats, pre_logits=True, method='forward_head'),
                stages=model.apply(v, x, norm=True, method='forward_intermediates'),
                logits=remat.apply(v, x), xla=xla.apply(v, x), train=train_out, stats=updates['batch_stats'],
                folded=folded_model.apply(fv, x))
  return family, model, variables, folded, run(variables, folded, x)


def test_forward_head_and_pre_logits(outputs):
  family, model, _, _, out = outputs
  assert out['logits'].shape == (2, NUM_CLASSES) and out['logits'].dtype == jnp.float32
  np.testing.assert_allclose(out['head'], out['logits'], atol=1e-5)  # Also: remat leaves the logits unchanged.
  assert out['pre_logits'].shape == (2, model.num_features)
  np.testing.assert_allclose(out['pre_logits'], np.asarray(out['features']).mean(axis=(1, 2)), atol=1e-5)
  if family == 'levit':  # Two heads: train mode returns both (distillation), eval their mean.
    assert isinstance(out['train'], tuple) and len(out['train']) == 2


def test_per_stage_features(outputs):
  family, model, _, _, out = outputs
  _, _, size, stages = TINY[family]
  assert [m.shape for m in out['stages']] == [(2, size // s, size // s, c) for s, c in stages]
  assert model.num_features == stages[-1][1]
  np.testing.assert_allclose(out['features'], out['stages'][-1], atol=1e-6)


def test_attention_kernel_choice_keeps_logits(outputs):
  _, _, _, _, out = outputs
  np.testing.assert_allclose(out['xla'], out['logits'], atol=1e-5)


def test_training_updates_batch_stats(outputs):
  _, _, variables, _, out = outputs
  before, after = jax.tree.leaves(variables['batch_stats']), jax.tree.leaves(out['stats'])
  assert len(before) == len(after) and all(a.shape == b.shape for a, b in zip(after, before))
  assert all(not np.allclose(a, b) for a, b in zip(after, before))


def test_folded_logits_match(outputs):
  """Deploy form (every BatchNorm folded) gives the same logits, with no BatchNorm left."""
  _, _, variables, folded, out = outputs
  assert set(folded) == {'params'}
  assert model_utils.count(folded['params']) < model_utils.count(variables['params'])
  np.testing.assert_allclose(out['folded'], out['head'], atol=1e-5, rtol=1e-5)


def test_efficientvit_window_partition_round_trip():
  """A 5x4 map zero-padded at the bottom/right to 6x6 (four 3x3 windows per image) and cropped back."""
  x = jnp.arange(1, 1 + 2 * 5 * 4 * 2, dtype=jnp.float32).reshape(2, 5, 4, 2)
  windows, padded = efficientvit_msra.window_partition(x, 3)
  assert windows.shape == (8, 3, 3, 2) and padded == (6, 6)
  np.testing.assert_array_equal(windows[0], x[0, :3, :3])
  np.testing.assert_array_equal(windows[1][:, :1], x[0, :3, 3:])
  np.testing.assert_array_equal(windows[2][:2], x[0, 3:, :3])
  assert float(windows.sum()) == float(x.sum()) and int((windows == 0).sum()) == 2 * (36 - 20) * 2
  np.testing.assert_array_equal(efficientvit_msra.window_reverse(windows, 3, padded, (5, 4)), x)


def test_deploy_form_refuses_training_and_missing_statistics():
  model = _model('levit', deploy=True)
  x = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match='inference'):
    jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=True))
  variables = _random_variables(_model('levit'), 32)
  with pytest.raises(ValueError, match='batch_stats'):
    levit.fold({}, {'params': variables['params']})


# -- timm parity, conversion, init_from ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _fixture(family):
  base = os.path.join(FIXTURES, family)
  with open(base + '.json') as f:
    meta = json.load(f)
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
  with np.load(base + '.npz', allow_pickle=False) as data:
    io = {k: data[k] for k in data.files}
  return meta, overrides, io, convert.load_safetensors(base + '.safetensors')


@pytest.mark.parametrize('family', sorted(TINY))
def test_logits_match_timm_and_fold(family):
  """Converted timm weights (with running statistics) reproduce timm's float32 eval logits within 1e-5, and so
  does the folded deploy form."""
  meta, overrides, io, sd = _fixture(family)
  variables = convert.timm_to_params(meta['model'], sd, model_overrides=overrides, image_size=meta['image_size'])
  assert set(variables) == {'params', 'batch_stats'}
  model = registry.create_model(meta['model'], num_classes=meta['num_classes'], **overrides)
  folded_model, folded = deploy.fold_for_inference(meta['model'], variables, num_classes=meta['num_classes'],
                                                   **overrides)
  logits = np.asarray(jax.jit(model.apply)(variables, io['input_nhwc']))
  folded_logits = np.asarray(jax.jit(folded_model.apply)(folded, io['input_nhwc']))
  diff = float(np.abs(logits - io['logits']).max())
  fdiff = float(np.abs(folded_logits - io['logits']).max())
  print(f'\n[parity] {family}: max |logit diff| vs timm = {diff:.3e}, folded {fdiff:.3e} '
        f'(|logits| max {np.abs(io["logits"]).max():.3f})')
  assert logits.shape == io['logits'].shape and diff <= 1e-5 and fdiff <= 1e-5


def test_levit_new_head_and_init_from(tmp_path):
  """A new class count zero-initialises only the two classifiers (head, head_dist), keeping their BatchNorms;
  init_from a converted params.npz loads every variable but the (fresh) classifiers."""
  meta, overrides, _, sd = _fixture('levit')
  variables = convert.timm_to_params(meta['model'], sd, model_overrides=overrides, num_classes=7)
  params = variables['params']
  assert params['head']['kernel'].shape == (24, 7) and not params['head']['kernel'].any()
  assert not params['head_dist']['kernel'].any()
  np.testing.assert_array_equal(params['head_norm']['scale'], sd['head.bn.weight'])
  np.testing.assert_array_equal(variables['batch_stats']['head_dist_norm']['var'], sd['head_dist.bn.running_var'])

  out = tmp_path / 'converted'
  path = convert.convert_file(meta['model'], os.path.join(FIXTURES, 'levit.safetensors'), str(out),
                              model_overrides=overrides)
  model = registry.create_model(meta['model'], num_classes=7, **overrides)
  init = jax.device_get(_random_variables(model, 32, seed=1))
  loaded = finetune.load_variables(path, init, model=model)
  np.testing.assert_array_equal(loaded['params']['head']['kernel'], init['params']['head']['kernel'])
  np.testing.assert_array_equal(loaded['params']['head_dist']['bias'], init['params']['head_dist']['bias'])
  np.testing.assert_allclose(loaded['params']['stages_1']['blocks_0']['attn']['attention_biases'],
                             sd['stages.1.blocks.0.attn.attention_biases'])
  np.testing.assert_allclose(loaded['batch_stats']['stem']['conv1']['bn']['mean'], sd['stem.conv1.bn.running_mean'])


def test_levit_bias_tables_resize_to_a_new_resolution():
  """A 32 px checkpoint converted for 48 px: each head's bias grid resized bicubic (antialiased, as timm)."""
  meta, overrides, _, sd = _fixture('levit')
  variables = convert.timm_to_params(meta['model'], sd, model_overrides=overrides, image_size=48)
  table = variables['params']['stages_0']['blocks_0']['attn']['attention_biases']
  assert table.shape == (2, 36)
  src = sd['stages.0.blocks.0.attn.attention_biases'].reshape(2, 4, 4).transpose(1, 2, 0)
  want = np.asarray(jax.image.resize(src, (6, 6, 2), 'bicubic')).transpose(2, 0, 1).reshape(2, 36)
  np.testing.assert_allclose(table, want, atol=1e-6)
  with pytest.raises(ValueError, match='head counts'):
    levit.resize_bias_table(np.zeros((2, 16)), (3, 36))


# -- the main job trains each family at tiny width on digits -------------------------------------------------------

MAIN_OVERRIDES = {  # On the default config's 16 px digits; model.patch_size (4) is the stem stride: maps 4, 2.
    'levit': ['--config.model.name=levit_128s', '--config.model.embed_dim=(8, 16)', '--config.model.key_dim=4',
              '--config.model.num_heads=(2, 2)', '--config.model.depth=(1, 1)'],
    'efficientvit_m': ['--config.model.name=efficientvit_m0', '--config.model.embed_dim=(8, 16)',
                       '--config.model.key_dim=4', '--config.model.num_heads=(2, 2)', '--config.model.depth=(1, 1)',
                       '--config.model.window_size=2', '--config.model.kernels=(3, 3)'],
}


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(MAIN_OVERRIDES))
def test_main_job_trains_family_on_digits(family, digits_data_dir, tmp_path):
  """`python -m vit_jax.main --config=configs/default.py --config.model.name=...` trains 3 steps end to end."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
         f'--config.dataset.data_dir={digits_data_dir}', '--config.total_steps=3', '--config.batch_size=16',
         '--config.log_every=1', '--config.eval_every=3', '--config.checkpoint_every=3',
         '--config.optimizer.warmup_steps=1', *MAIN_OVERRIDES[family]]
  env = xla_env.subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 3 and all(np.isfinite(v) for v in final.values())
  assert 0 < final['train_loss'] < 10 and 0 <= final['eval_accuracy'] <= 1
  overrides = {a.split('=')[0].rsplit('.', 1)[1]: a.split('=', 1)[1] for a in MAIN_OVERRIDES[family][1:]}
  overrides = {k: ast.literal_eval(v) for k, v in overrides.items()}
  model = registry.create_model(MAIN_OVERRIDES[family][0].split('=')[1], num_classes=10, patch_size=4, **overrides)
  assert final['num_params'] == model_utils.count_params(model, 16)
