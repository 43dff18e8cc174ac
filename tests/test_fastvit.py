"""FastViT: exact timm counts (train and re-parameterised forms), timm layout, parity with BatchNorm running
statistics, deploy-time folding, the model API, layer grouping, init_from and the main job.

Parity with timm's logits runs on the committed fixture of tests/parity/make_mobilevit_fastvit_fixtures.py (a tiny
timm FastVit with random weights and statistics, and timm's reparameterize_model of it); full-size models only
through jax.eval_shape.
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
from vit_jax.models import fastvit
from vit_jax.models import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'parity', 'fixtures')
NAMES = ('fastvit_t8', 'fastvit_t12', 'fastvit_s12', 'fastvit_sa12', 'fastvit_sa24')


def _fixture():
  base = os.path.join(FIXTURES, 'fastvit')
  with open(base + '.json') as f:
    meta = json.load(f)
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
  with np.load(base + '.npz') as data:
    io = {k: data[k] for k in data.files}
  return meta, overrides, io


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# -- counts, registry, layout ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', [pytest.param(n, marks=() if n == 'fastvit_t8' else pytest.mark.slow)
                                  for n in NAMES])
def test_deploy_form_counts_equal_timm_reparameterized(name):
  """inference_mode=True has exactly timm's count after reparameterize_model (timm 1.0.31); the train form's count
  is the registry's (checked for every model by tests/test_vit.py::test_registered_param_counts)."""
  spec = registry.get_model_spec(name)
  model = registry.create_model(name, num_classes=1000, inference_mode=True)
  assert model_utils.count_params(model, 64) == fastvit.FUSED_COUNTS[name]  # Counts do not depend on the size.
  assert spec.num_params - fastvit.FUSED_COUNTS[name] > 0


def test_registry_metadata():
  assert set(registry.list_models('fastvit*')) == set(NAMES)
  assert {registry.get_model_spec(n).num_params for n in NAMES} == {
      4_026_232, 7_553_704, 9_473_576, 11_580_968, 21_554_216}
  for name in NAMES:
    spec = registry.get_model_spec(name)
    assert spec.timm_name == name + '.apple_in1k' and spec.image_size == 256 and spec.family == 'fastvit'
  sa = registry.create_model('fastvit_sa12', num_classes=10)
  assert sa.token_mixers[-1] == 'attention' and sa.pos_embs == (False, False, False, True)
  assert sa.num_features == 1024


def test_timm_layout_full_size():
  """Names and shapes of timm's fastvit_sa12 state dict (OIHW -> HWIO; grouped convs keep in/groups inputs)."""
  model = registry.create_model('fastvit_sa12', num_classes=1000)
  flat = {c: {k: v.shape for k, v in traverse_util.flatten_dict(t, sep='/').items()}
          for c, t in model_utils.abstract_variables(model, jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)).items()}
  p, stats = flat['params'], flat['batch_stats']
  assert p['stem_0/conv_kxk_0/conv/kernel'] == (3, 3, 3, 64) and p['stem_0/conv_scale/conv/kernel'] == (1, 1, 3, 64)
  assert p['stem_1/conv_kxk_0/conv/kernel'] == (3, 3, 1, 64) and 'stem_1/identity/scale' not in p  # Stride 2.
  assert p['stem_2/identity/scale'] == (64,) and 'stem_2/conv_scale/conv/kernel' not in p  # 1x1: no scale branch.
  d = 'stages_1/downsample/'
  assert p[d + 'proj_0/large_conv/conv/kernel'] == (7, 7, 1, 128)  # Grouped by the input width (64 groups).
  assert p[d + 'proj_0/small_conv/conv/kernel'] == (3, 3, 1, 128) and p[d + 'proj_1/identity/scale'] == (128,)
  assert 'stages_0/downsample/proj_0/large_conv/conv/kernel' not in p
  t = 'stages_0/blocks_0/token_mixer/'
  assert set(k.split('/')[4] for k in p if k.startswith(t + 'norm/')) == {'identity'}
  assert p[t + 'mixer/conv_kxk_0/conv/kernel'] == (3, 3, 1, 64) and p[t + 'layer_scale/gamma'] == (64,)
  assert p['stages_0/blocks_0/mlp/conv/conv/kernel'] == (7, 7, 1, 64) and p['stages_0/blocks_0/mlp/fc1/kernel'] == (
      1, 1, 64, 256)
  a = 'stages_3/blocks_0/'
  assert p['stages_3/pos_emb/pos_enc/kernel'] == (7, 7, 1, 512)
  assert p[a + 'token_mixer/qkv/kernel'] == (512, 1536) and a + 'token_mixer/qkv/bias' not in p
  assert stats[a + 'norm/mean'] == (512,) and p[a + 'layer_scale_2/gamma'] == (512,)
  assert p['final_conv/conv_kxk_0/conv/kernel'] == (3, 3, 1, 1024) and p['final_conv/se/fc1/kernel'] == (
      1, 1, 1024, 64)
  assert p['head/kernel'] == (1024, 1000)


def test_bad_options_are_named():
  with pytest.raises(ValueError, match='token mixer'):
    jax.eval_shape(registry.create_model('fastvit_t8', num_classes=2, token_mixers=('repmixer',) * 3 + ('x',)).init,
                   jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='one entry per stage'):
    jax.eval_shape(registry.create_model('fastvit_t8', num_classes=2, depths=(1, 1)).init, jax.random.key(0),
                   jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='patch_size'):
    jax.eval_shape(registry.create_model('fastvit_t8', num_classes=2, patch_size=8).init, jax.random.key(0),
                   jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match='multiple of the input width'):
    jax.eval_shape(registry.create_model('fastvit_t8', num_classes=2, embed_dims=(8, 12, 24, 48)).init,
                   jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# -- parity, folding, BatchNorm, API (one jitted program on the fixture) -----------------------------------------------

@pytest.fixture(scope='module')
def tiny():
  meta, overrides, io = _fixture()
  name = meta['model']
  sd = convert.load_safetensors(os.path.join(FIXTURES, 'fastvit.safetensors'))
  variables = convert.timm_to_params(name, sd, model_overrides=overrides)
  model = registry.create_model(name, num_classes=5, **overrides)
  folded_model, folded = deploy.fold_for_inference(name, variables, num_classes=5, **overrides)
  reparam_sd = convert.load_safetensors(os.path.join(FIXTURES, 'fastvit_reparam.safetensors'))
  timm_folded = convert.timm_to_params(name, reparam_sd, model_overrides={**overrides, 'inference_mode': True})

  x = jnp.asarray(io['input_nhwc'])
  apply_folded = jax.jit(folded_model.apply)  # One compile for both deploy-form variable sets.

  @jax.jit
  def run(variables, x):
    train, updated = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return dict(eval=model.apply(variables, x), train=train, stats=updated['batch_stats'],
                features=model.apply(variables, x, method='forward_features'))
  out = dict(run(variables, x), folded=apply_folded(folded, x), timm_folded=apply_folded(timm_folded, x))
  return dict(model=model, variables=variables, folded_model=folded_model, folded=folded, io=io, out=out,
              overrides=overrides, name=name)


def test_timm_parity(tiny):
  """Eval mode with the checkpoint's BatchNorm running statistics: every branch, RepMixer, the positional
  encoding, attention and the SE final conv, at odd stage sizes."""
  assert np.abs(np.asarray(tiny['out']['eval']) - tiny['io']['logits']).max() <= 1e-5


def test_folded_model_matches_unfolded_and_timm_deploy_form(tiny):
  """fold_for_inference: single convs (inference_mode=True) with the same logits; the same as converting timm's
  reparameterize_model state dict; timm's fused parameter count."""
  out, io = tiny['out'], tiny['io']
  assert tiny['folded_model'].inference_mode
  assert np.abs(np.asarray(out['folded']) - np.asarray(out['eval'])).max() <= 1e-5
  assert np.abs(np.asarray(out['folded']) - io['logits_reparam']).max() <= 1e-5
  assert np.abs(np.asarray(out['timm_folded']) - io['logits_reparam']).max() <= 1e-5
  assert _count(tiny['folded']['params']) == int(io['num_params_reparam']) < _count(tiny['variables']['params'])
  flat = traverse_util.flatten_dict(tiny['folded']['params'], sep='/')
  assert flat['stages_0/blocks_0/token_mixer/reparam_conv/kernel'].shape == (3, 3, 1, 8)
  assert not any('conv_kxk' in k or 'identity' in k or 'pos_enc' in k for k in flat)
  # The BatchNorms timm keeps (ConvMlp, attention norm) keep their statistics; the folded ones are gone.
  stats = traverse_util.flatten_dict(tiny['folded']['batch_stats'], sep='/')
  assert {k.rsplit('/', 2)[-2] for k in stats} == {'bn', 'norm'}
  assert all('/mlp/conv/bn/' in k or k.endswith(('norm/mean', 'norm/var')) for k in stats)
  # Folding a deploy form is the identity; train-form params without statistics are refused.
  options, again = fastvit.fold({'inference_mode': True}, tiny['folded'])
  assert options == {'inference_mode': True} and again['params'] is tiny['folded']['params']
  with pytest.raises(ValueError, match='running statistics'):
    fastvit.fold({}, {'params': tiny['variables']['params']})


def test_features_pre_logits_and_stages(tiny):
  """forward_features is final_conv's map; the logits are the head on its mean (the pre-logits); one map per
  stage at strides 4, 8, 16, 32 (48 px: odd sizes round up, as PyTorch's padded strided convs)."""
  out, model, variables = tiny['out'], tiny['model'], tiny['variables']
  assert out['features'].shape == (2, 2, 2, 128) and model.num_features == 128  # 2 x the last width.
  pre_logits = np.asarray(out['features']).mean(axis=(1, 2))
  p = variables['params']['head']
  np.testing.assert_allclose(out['eval'], pre_logits @ p['kernel'] + p['bias'], atol=1e-5)
  head = jax.eval_shape(lambda f: model.apply(variables, f, pre_logits=True, method='forward_head'),
                        out['features'])
  assert head.shape == (2, 128)
  stages = jax.eval_shape(lambda x: model.apply(variables, x, method='forward_intermediates'),
                          tiny['io']['input_nhwc'])
  assert [s.shape for s in stages] == [(2, 12, 12, 8), (2, 6, 6, 16), (2, 3, 3, 32), (2, 2, 2, 64)]


def test_batch_norm_statistics(tiny):
  """Train mode normalises by the batch and moves every statistic by 0.1 (momentum 0.9 in flax)."""
  out, variables = tiny['out'], tiny['variables']
  assert not np.allclose(out['train'], out['eval'], atol=1e-3)
  assert jax.tree.structure(out['stats']) == jax.tree.structure(variables['batch_stats'])
  old = variables['batch_stats']['stem_0']['conv_kxk_0']['bn']
  new = out['stats']['stem_0']['conv_kxk_0']['bn']
  x = tiny['io']['input_nhwc']
  kernel = variables['params']['stem_0']['conv_kxk_0']['conv']['kernel']
  conv = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(new['mean'], 0.9 * old['mean'] + 0.1 * np.asarray(conv).mean(axis=(0, 1, 2)),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # Three more compiles (~30 s on a loaded 2-core CPU).
def test_remat_and_drop_path_options(tiny):
  """Per-block remat leaves the logits unchanged; drop_path_rate reaches the blocks (train-mode outputs move)."""
  x = jnp.asarray(tiny['io']['input_nhwc'][:1])
  remat = registry.create_model(tiny['name'], num_classes=5, **{**tiny['overrides'], 'remat': True})
  dropped = registry.create_model(tiny['name'], num_classes=5, **{**tiny['overrides'], 'drop_path_rate': 0.5})

  @jax.jit
  def run(v):
    rng = {'dropout': jax.random.key(3)}
    return (remat.apply(v, x), dropped.apply(v, x, train=True, mutable=['batch_stats'], rngs=rng)[0],
            tiny['model'].apply(v, x, train=True, mutable=['batch_stats'], rngs=rng)[0])
  logits, dropped_out, kept_out = run(tiny['variables'])
  np.testing.assert_allclose(logits, tiny['out']['eval'][:1], atol=1e-5)
  assert not np.allclose(dropped_out, kept_out, atol=1e-4)


# -- facts: heads, layer grouping, conversion errors ---------------------------------------------------------------

def test_new_class_count_reinitialises_only_the_classifier():
  meta, overrides, _ = _fixture()
  sd = convert.load_safetensors(os.path.join(FIXTURES, 'fastvit.safetensors'))
  variables = convert.timm_to_params(meta['model'], sd, num_classes=3, model_overrides=overrides)
  params = variables['params']
  assert params['head']['kernel'].shape == (128, 3) and not np.any(params['head']['kernel'])
  np.testing.assert_array_equal(params['stages_0']['blocks_0']['layer_scale']['gamma'],
                                sd['stages.0.blocks.0.layer_scale.gamma'].reshape(-1))
  with pytest.raises(ValueError, match='does not match model'):  # A deploy-form checkpoint needs inference_mode.
    convert.timm_to_params(meta['model'], convert.load_safetensors(
        os.path.join(FIXTURES, 'fastvit_reparam.safetensors')), model_overrides=overrides)


def test_layer_grouping():
  """Stem = 0; downsampling and positional encoding with their stage's first block; final_conv and head last."""
  meta, overrides, _ = _fixture()
  model = registry.create_model(meta['model'], num_classes=5, **overrides)
  names = param_groups.all_names(model_utils.abstract_params(model, 32))
  ids, num_blocks = param_groups.layer_ids(names, family='fastvit')
  assert num_blocks == 4
  assert ids['stem_1/conv_kxk_0/conv/kernel'] == 0
  assert ids['stages_0/blocks_0/mlp/fc1/kernel'] == 1
  assert ids['stages_1/downsample/proj_0/large_conv/conv/kernel'] == 2
  assert ids['stages_3/pos_emb/pos_enc/kernel'] == 4 and ids['stages_3/blocks_0/token_mixer/qkv/kernel'] == 4
  assert ids['final_conv/se/fc1/kernel'] == 5 and ids['head/kernel'] == 5
  assert param_groups.layer_ids(names) == (ids, num_blocks)


def test_init_from_converted_timm_weights_with_a_new_head(tmp_path):
  """convert_file -> init_from: every backbone weight and statistic loads, the 10-class head is the model's own."""
  meta, overrides, _ = _fixture()
  out = tmp_path / 'converted'
  convert.convert_file(meta['model'], os.path.join(FIXTURES, 'fastvit.safetensors'), str(out),
                       model_overrides=overrides)
  model = registry.create_model(meta['model'], num_classes=10, **overrides)
  shapes = model_utils.abstract_variables(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  init = jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes)
  loaded = finetune.load_variables(str(out), init)
  sd = convert.load_safetensors(os.path.join(FIXTURES, 'fastvit.safetensors'))
  assert loaded['params']['head']['kernel'].shape == (128, 10)
  np.testing.assert_array_equal(loaded['params']['head']['kernel'], init['params']['head']['kernel'])
  np.testing.assert_allclose(loaded['params']['stages_3']['blocks_0']['token_mixer']['proj']['kernel'],
                             sd['stages.3.blocks.0.token_mixer.proj.weight'].T)
  np.testing.assert_allclose(loaded['batch_stats']['final_conv']['conv_kxk_0']['bn']['var'],
                             sd['final_conv.conv_kxk_0.bn.running_var'.replace('kxk_0', 'kxk.0')])


# -- the main job trains FastViT at tiny width on digits -----------------------------------------------------------

# The config's model.patch_size (4, for its ViT) is FastViT's stem stride: 2 keeps more of the 16 px digits.
MAIN_OVERRIDES = {'patch_size': 2, 'depths': (1, 1, 1, 1), 'embed_dims': (8, 16, 32, 32), 'mlp_ratios': 2.0}


@pytest.mark.slow
def test_main_job_trains_fastvit_on_digits(digits_data_dir, tmp_path):
  """`python -m vit_jax.main --config=configs/default.py --config.model.name=fastvit_sa12 ...` trains 3 steps at
  tiny width (16 px digits, stem stride 2: stage maps 8, 4, 2, 1; the attention stage has one head); BatchNorm
  statistics are in the checkpoint."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
         f'--config.dataset.data_dir={digits_data_dir}', '--config.total_steps=3', '--config.batch_size=16',
         '--config.log_every=1', '--config.eval_every=3', '--config.checkpoint_every=3',
         '--config.optimizer.warmup_steps=1', '--config.model.name=fastvit_sa12',
         *[f'--config.model.{k}={v}' for k, v in MAIN_OVERRIDES.items()]]
  env = xla_env.subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)  # 736 s seen at load 30.
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / 'final_metrics.json') as f:
    final = json.load(f)
  assert final['step'] == 3 and all(np.isfinite(v) for v in final.values())
  assert 0 < final['train_loss'] < 10 and 0 <= final['eval_accuracy'] <= 1
  model = registry.create_model('fastvit_sa12', num_classes=10, **MAIN_OVERRIDES)
  assert final['num_params'] == model_utils.count_params(model, 16)
  assert b'batch_stats' in (workdir / 'checkpoints' / '3' / 'default' / '_METADATA').read_bytes()
