"""XCiT and CvT: parameter counts, the timm-style API, BatchNorm statistics, cross-covariance attention, logit
parity of converted reference weights, and layer grouping.

References: timm's `xcit.py` (XCiT) and transformers' `CvtForImageClassification` (CvT). Counts are the
references' at 224 px / 1000 classes; parity fixtures (random weights and random BatchNorm running statistics,
tiny configurations) are written by tests/parity/make_zoo_b_fixtures.py, which needs torch; these tests do not.
"""
import ast
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
from vit_jax import param_groups
from vit_jax.models import cvt
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import xcit

# timm `sum(p.numel() for p in model.parameters())` and transformers' CvtForImageClassification(CvtConfig(...))
# at 1000 classes (BatchNorm running statistics are buffers, not counted).
COUNTS = {
    'xcit_t12_p16': 6_716_272, 'xcit_s12_p16': 26_253_304, 'xcit_m24_p16': 84_395_752,
    'xcit_t12_p8': 6_706_504, 'xcit_s12_p8': 26_213_032, 'xcit_m24_p8': 84_323_624,
    'cvt_13': 19_997_480, 'cvt_21': 31_622_696, 'cvt_w24': 277_196_392,
}
TIMM_NAMES = {'xcit_t12_p16': 'xcit_tiny_12_p16_224', 'xcit_s12_p16': 'xcit_small_12_p16_224',
              'xcit_m24_p16': 'xcit_medium_24_p16_224', 'xcit_t12_p8': 'xcit_tiny_12_p8_224',
              'xcit_s12_p8': 'xcit_small_12_p8_224', 'xcit_m24_p8': 'xcit_medium_24_p8_224'}

NUM_CLASSES = 3
SIZE = 32
# family: (registry name, tiny overrides, per-stage (stride, width) of forward_intermediates)
TINY = {
    'xcit': ('xcit_t12_p8', dict(embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, cls_attn_layers=1),
             [(8, 16), (8, 16)]),
    'cvt': ('cvt_13', dict(embed_dims=(8, 16, 24), depths=(1, 1, 2), num_heads=(1, 2, 3), mlp_ratio=2.0),
            [(4, 8), (8, 16), (16, 24)]),
}


def _tiny(family, **kw):
  name, overrides, _ = TINY[family]
  return registry.create_model(name, num_classes=NUM_CLASSES, **{**overrides, 'drop_path_rate': 0.0, **kw})


# -- registry -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(COUNTS))
def test_registered_param_counts(name):
  spec = registry.get_model_spec(name)
  assert spec.num_params == COUNTS[name] and spec.image_size == 224
  assert spec.family == name.split('_')[0]
  assert spec.timm_name == TIMM_NAMES.get(name)  # CvT is not in timm (Hugging Face ids in cvt.py).
  # The model's own count (eval_shape at 224 px) is checked against spec.num_params for every registered model by
  # the registry-wide test_vit.py::test_registered_param_counts.


def test_registered_configs():
  m24 = registry.create_model('xcit_m24_p8', num_classes=10)
  assert (m24.patch_size, m24.embed_dim, m24.depth, m24.num_heads, m24.eta) == (8, 512, 24, 8, 1e-5)
  assert registry.create_model('xcit_t12_p16', num_classes=10).eta == 1.0
  assert registry.create_model('cvt_21', num_classes=10).depths == (1, 4, 16)
  assert registry.create_model('cvt_w24', num_classes=10).num_features == 1024


# -- the timm-style API (one jitted program per family) ------------------------------------------------------------

def _variables(model, x):
  """Random params and random (positive-variance) BatchNorm statistics."""
  variables = model_utils.random_variables(model, x)
  stats = jax.tree.map(lambda v: jnp.abs(v) + 0.5, variables['batch_stats'])
  return {'params': variables['params'], 'batch_stats': stats}


@pytest.fixture(scope='module', params=sorted(TINY))
def outputs(request):
  family = request.param
  model, remat = _tiny(family), _tiny(family, remat=True)
  x = model_utils.images(2, SIZE)
  variables = _variables(model, x)

  @jax.jit
  def run(variables, x):  # Four forward passes: features, per-stage maps, remat logits, training.
    feats = model.apply(variables, x, method='forward_features')
    stages = model.apply(variables, x, method='forward_intermediates')
    train_logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return dict(
        features=feats, head=model.apply(variables, feats, method='forward_head'),
        pre_logits=model.apply(variables, feats, pre_logits=True, method='forward_head'),
        stages=stages, normed_last=model.apply(variables, stages[-1], method=lambda m, y: m.norm(y)),
        logits=remat.apply(variables, x), train_logits=train_logits, updated_stats=updates['batch_stats'])
  return family, model, variables, run(variables, x)


def test_forward_features_and_head(outputs):
  """__call__ (remat) == forward_head(forward_features); pre-logits = the final-normed class token."""
  family, model, _, out = outputs
  assert out['logits'].shape == (2, NUM_CLASSES) and out['logits'].dtype == jnp.float32
  np.testing.assert_allclose(out['head'], out['logits'], atol=1e-5)
  last = out['stages'][-1]
  assert out['features'].shape == (2, 1 + last.shape[1] * last.shape[2], model.num_features)
  np.testing.assert_allclose(out['pre_logits'], out['features'][:, 0], atol=1e-6)
  if family == 'cvt':  # The last stage's tokens are the last map, final-normed.
    np.testing.assert_allclose(out['features'][:, 1:], out['normed_last'].reshape(2, -1, 24), atol=1e-5)


def test_per_stage_features(outputs):
  family, model, _, out = outputs
  expected = [(2, SIZE // s, SIZE // s, c) for s, c in TINY[family][2]]
  assert [m.shape for m in out['stages']] == expected
  assert model.num_features == expected[-1][-1]


def test_train_mode_uses_and_updates_batch_statistics(outputs):
  """Training normalises with the batch's statistics and moves the running averages by torch's momentum 0.1."""
  _, _, variables, out = outputs
  assert not np.allclose(out['train_logits'], out['logits'], atol=1e-3)
  old = jax.tree.leaves(variables['batch_stats'])
  new = jax.tree.leaves(out['updated_stats'])
  assert len(old) == len(new) > 0
  assert all(not np.allclose(a, b) for a, b in zip(old, new))


def test_batch_norm_matches_torch_definition():
  """torch BatchNorm2d: train y = (x - mean) / sqrt(biased var + 1e-5); running = 0.9 old + 0.1 batch (unbiased var)."""
  x = np.random.default_rng(0).standard_normal((4, 3, 3, 2)).astype(np.float32)
  bn = layers.torch_batch_norm('bn', train=True, dtype=jnp.float32)
  variables = bn.init(jax.random.key(0), x)
  y, updates = bn.apply(variables, x, mutable=['batch_stats'])
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), atol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.1 * mean, atol=1e-6)
  # flax keeps the biased variance in its running average (torch the unbiased one); with converted statistics
  # evaluation is identical, and training differs by n / (n - 1) in the running variance only.
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 + 0.1 * var, atol=1e-6)


def test_drop_path_rates():
  """XCiT: constant over the XCA blocks, none in the class blocks (timm). CvT: 0 in stages 0-1, a 0..r ramp over
  the last stage (the official [0, 0, r])."""
  x = model_utils.images(1, SIZE)
  xm = _tiny('xcit', drop_path_rate=0.3)
  assert [b.drop_path_rate for b in xm.bind(_variables(xm, x)).blocks] == [0.3, 0.3]
  cm = _tiny('cvt', drop_path_rate=0.4)
  stages = cm.bind(_variables(cm, x)).stages
  assert [s.drop_path_rates for s in stages] == [(), (), (0.0, 0.4)]


# -- cross-covariance attention ------------------------------------------------------------------------------------

def _xca_reference(x, params, heads):
  """The XCiT paper's XCA in numpy: per head, softmax_rows(temperature * q_hat^T k_hat) applied to v's channels."""
  b, n, c = x.shape
  qkv = x @ np.asarray(params['qkv']['kernel']) + np.asarray(params['qkv']['bias'])
  qkv = qkv.reshape(b, n, 3, heads, c // heads)
  out = np.zeros((b, n, heads, c // heads), np.float32)
  for i in range(b):
    for h in range(heads):
      q, k, v = (qkv[i, :, j, h] for j in range(3))  # (N, Ch)
      q = q / np.linalg.norm(q, axis=0, keepdims=True)
      k = k / np.linalg.norm(k, axis=0, keepdims=True)
      logits = np.asarray(params['temperature'])[h, 0, 0] * (q.T @ k)  # (Ch, Ch)
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[i, :, h] = (w @ v.T).T
  return out.reshape(b, n, c) @ np.asarray(params['proj']['kernel']) + np.asarray(params['proj']['bias'])


@pytest.mark.parametrize('impl', ['einsum', 'xla'])
def test_cross_covariance_attention_definition(impl):
  x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
  attn = xcit.CrossCovarianceAttention(num_heads=2, attention_impl=impl)
  params = model_utils.random_variables(attn, jnp.asarray(x))['params']
  params['temperature'] = jnp.asarray([[[0.7]], [[1.9]]])
  np.testing.assert_allclose(attn.apply({'params': params}, x), _xca_reference(x, params, 2), atol=1e-5)


def test_bad_inputs_name_the_fix():
  x = jnp.zeros((1, 36, 36, 3))
  with pytest.raises(ValueError, match='divisible by patch_size=8'):
    jax.eval_shape(_tiny('xcit').init, jax.random.key(0), x)
  with pytest.raises(ValueError, match='patch_size must be 8 or 16'):
    jax.eval_shape(_tiny('xcit', patch_size=4).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='3 stages'):
    jax.eval_shape(_tiny('cvt', depths=(1, 1)).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='too small for CvT'):
    jax.eval_shape(cvt.CvT(num_classes=2).init, jax.random.key(0), jnp.zeros((1, 2, 2, 3)))


# -- conversion: logit parity with the references -----------------------------------------------------------------

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'parity', 'fixtures')
LAYOUTS = {'xcit_p16': 'timm', 'xcit_p8': 'timm', 'cvt': 'hf'}


@pytest.mark.parametrize('fixture', sorted(LAYOUTS))
def test_converted_logits_match_reference(fixture):
  """Every reference tensor converts (none left over, none missing), running statistics land in batch_stats, and
  eval-mode logits match the reference's within 1e-5 in float32."""
  with open(os.path.join(FIXTURES, fixture + '.json')) as f:
    meta = json.load(f)
  sd = convert.load_safetensors(os.path.join(FIXTURES, fixture + '.safetensors'))
  data = np.load(os.path.join(FIXTURES, fixture + '.npz'))
  variables = convert.timm_to_params(meta['model'], sd, layout=LAYOUTS[fixture],
                                     model_overrides=meta['model_overrides'])
  assert set(variables) == {'params', 'batch_stats'}
  stats = jax.tree.leaves(variables['batch_stats'])
  assert len(stats) == 2 * sum(k.endswith('running_mean') for k in sd)
  model = registry.create_model(meta['model'], num_classes=meta['num_classes'], **meta['model_overrides'])
  logits = jax.jit(model.apply)(variables, data['input_nhwc'])
  diff = float(np.abs(np.asarray(logits) - data['logits']).max())
  print(f'{fixture}: max |logit diff| {diff:.1e}')
  assert diff <= 1e-5


def test_cvt_has_only_the_hf_layout():
  sd = convert.load_safetensors(os.path.join(FIXTURES, 'cvt.safetensors'))
  with pytest.raises(ValueError, match="no conversion table for layout 'timm'.*'hf'"):
    convert.timm_to_params('cvt_13', sd)


# -- layer grouping: layer-wise lr decay and freezing --------------------------------------------------------------

def _names(family):
  model = _tiny(family)
  return param_groups.all_names(model_utils.abstract_params(model, SIZE))


def test_xcit_layer_ids():
  """Stem (conv patch embedding, Fourier projection, class token) 0; XCA blocks 1..L; class blocks, norm, head L+1."""
  ids, n = param_groups.layer_ids(_names('xcit'), family='xcit')
  assert n == 2
  assert {ids[k] for k in ids if k.startswith(('patch_embed/', 'pos_embed/', 'cls_token'))} == {0}
  assert ids['blocks_0/attn/temperature'] == 1 and ids['blocks_1/local_mp/conv2/kernel'] == 2
  assert {ids[k] for k in ids if k.startswith(('cls_attn_blocks_', 'norm/', 'head/'))} == {3}
  mults = param_groups.lr_multipliers(model_utils.abstract_params(_tiny('xcit'), SIZE), layer_decay=0.5,
                                      family='xcit')
  assert mults['patch_embed']['proj_0_conv']['kernel'] == 0.5 ** 3 and mults['head']['kernel'] == 1.0


def test_cvt_layer_ids():
  """Stage 0's embedding is the stem; blocks numbered over the stages; a later stage's embedding and class token
  join its first block."""
  ids, n = param_groups.layer_ids(_names('cvt'), family='cvt')
  assert n == 4  # depths (1, 1, 2)
  assert {ids[k] for k in ids if k.startswith('stages_0/embedding/')} == {0}
  assert ids['stages_0/layers_0/attention/conv_proj_q/normalization/scale'] == 1
  assert ids['stages_1/embedding/projection/kernel'] == ids['stages_1/layers_0/fc1/kernel'] == 2
  assert ids['stages_2/cls_token'] == ids['stages_2/layers_0/fc2/bias'] == 3
  assert ids['stages_2/layers_1/layernorm_after/scale'] == 4
  assert ids['norm/scale'] == ids['head/kernel'] == 5


def test_freezing_by_regex():
  params = model_utils.abstract_params(_tiny('cvt'), SIZE)
  labels = param_groups.frozen_labels(params, r'^stages_[01]/')
  flat = dict(zip(param_groups.all_names(params), jax.tree.leaves(labels)))
  assert flat['stages_0/embedding/projection/kernel'] == 'frozen' and flat['head/kernel'] == 'trainable'


# -- the main job trains each family at tiny width on digits (BatchNorm statistics in the train state) -----------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN_OVERRIDES = {  # On the default config's 16 px digits: XCiT patch 8 (a 2x2 grid); CvT stride 4 (maps 4, 2, 1).
    'xcit': ['--config.model.name=xcit_t12_p8', '--config.model.patch_size=8', '--config.model.embed_dim=16',
             '--config.model.depth=1', '--config.model.num_heads=2', '--config.model.cls_attn_layers=1'],
    'cvt': ['--config.model.name=cvt_13', '--config.model.embed_dims=(8, 16, 24)', '--config.model.depths=(1, 1, 1)',
            '--config.model.num_heads=(1, 2, 3)'],
}


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(MAIN_OVERRIDES))
def test_main_job_trains_family_on_digits(family, digits_data_dir, tmp_path):
  """`python -m vit_jax.main --config=configs/default.py --config.model.name=...` trains a few steps end to end."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
         f'--config.dataset.data_dir={digits_data_dir}', '--config.total_steps=3', '--config.batch_size=16',
         '--config.log_every=1', '--config.eval_every=3', '--config.checkpoint_every=3',
         '--config.optimizer.warmup_steps=1', *MAIN_OVERRIDES[family]]
  env = xla_env.subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 3 and all(np.isfinite(v) for v in final.values())
  assert 0 < final['train_loss'] < 10 and 0 <= final['eval_accuracy'] <= 1
  overrides = {a.split('=')[0].rsplit('.', 1)[1]: a.split('=', 1)[1] for a in MAIN_OVERRIDES[family][1:]}
  overrides = {k: ast.literal_eval(v) for k, v in overrides.items()}
  model = registry.create_model(MAIN_OVERRIDES[family][0].split('=')[1], num_classes=10, **overrides)
  assert final['num_params'] == model_utils.count_params(model, 16)
  assert b'batch_stats' in (workdir / 'checkpoints' / '3' / 'default' / '_METADATA').read_bytes()
