"""ConvNeXt, CaiT and BEiT: published parameter counts, the timm-style API, timm parity on committed fixtures,
layer grouping, analytic FLOPs, BEiT's table resizing, and a few training steps of the main job per family.

Fixtures under tests/parity/fixtures/{convnext,cait,beit}.* were made by tests/parity/make_fixtures.py (torch +
timm); these tests need neither.
"""
import ast
import functools
import json
import os
import re
import subprocess
import sys

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from tests import xla_env
from vit_jax import convert
from vit_jax import flops
from vit_jax import optim
from vit_jax import param_groups
from vit_jax import pretrained
from vit_jax.config_schema import base_config
from vit_jax.models import beit
from vit_jax.models import cait
from vit_jax.models import convnext
from vit_jax.models import facts
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import resize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'parity', 'fixtures')
NUM_CLASSES = 3

# REFERENCE.md section 7: timm's counts at 224 px with 1000 classes.
PUBLISHED = {
    'convnext_t': (28_589_128, 'convnext_tiny'), 'convnext_s': (50_223_688, 'convnext_small'),
    'convnext_b': (88_591_464, 'convnext_base'), 'convnext_l': (197_767_336, 'convnext_large'),
    'cait_xxs24': (11_956_264, 'cait_xxs24_224'), 'cait_xxs36': (17_299_720, 'cait_xxs36_224'),
    'cait_s24': (46_916_200, 'cait_s24_224'),
    'beit_b16': (86_530_984, 'beit_base_patch16_224'), 'beit_l16': (304_430_568, 'beit_large_patch16_224'),
}

# family: (registry name, tiny overrides, image size, per-stage (stride, width))
TINY = {
    'convnext': ('convnext_t', dict(depths=(1, 1, 1), dims=(8, 8, 16)), 32, [(4, 8), (8, 8), (16, 16)]),
    'cait': ('cait_xxs24', dict(patch_size=4, embed_dim=16, depth=1, num_heads=2, depth_token_only=1), 16,
             [(4, 16)]),
    'beit': ('beit_b16', dict(patch_size=4, embed_dim=16, depth=1, num_heads=2), 16, [(4, 16)]),
}


def _model(family, **kw):
  name, overrides, _, _ = TINY[family]
  return registry.create_model(name, num_classes=NUM_CLASSES, **{**overrides, 'drop_path_rate': 0.0, **kw})


# -- registry -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(PUBLISHED))
def test_registered_counts_and_timm_names(name):
  spec = registry.get_model_spec(name)
  count, timm_name = PUBLISHED[name]
  assert spec.num_params == count and spec.timm_name == timm_name and spec.image_size == 224
  assert spec.family == name.split('_')[0]  # The eval_shape count is test_vit's registry-wide count test.


def test_family_hyperparameters():
  """The published shapes behind the counts: layer-scale inits and depths/widths (timm's constructors)."""
  kw = lambda n: registry.get_model_spec(n).kwargs
  assert kw('convnext_b')['dims'] == (128, 256, 512, 1024) and kw('convnext_s')['depths'] == (3, 3, 27, 3)
  assert convnext.ConvNeXt().layer_scale_init == 1e-6
  assert [kw(n)['layer_scale_init'] for n in ('cait_xxs24', 'cait_s24', 'beit_b16', 'beit_l16')] == [
      1e-5, 1e-5, 0.1, 1e-5]
  assert kw('cait_xxs36')['depth'] == 36 and cait.CaiT().depth_token_only == 2


# -- the timm-style API -------------------------------------------------------------------------------------------

@pytest.fixture(scope='module', params=sorted(TINY))
def outputs(request):
  """One jitted program per family (CPU compiles dominate): features, head, pre-logits, per-stage maps, and the
  logits of the remat and 'xla'-attention variants."""
  family = request.param
  size = TINY[family][2]
  model = _model(family)
  remat = _model(family, remat=True)
  xla = _model(family, attention_impl='xla') if family != 'convnext' else model
  x = model_utils.images(2, size)
  params = model_utils.random_variables(model, x)['params']

  @jax.jit
  def run(params, x):
    v = {'params': params}
    feats = model.apply(v, x, method='forward_features')
    return dict(features=feats, head=model.apply(v, feats, train=False, method='forward_head'),
                pre_logits=model.apply(v, feats, pre_logits=True, method='forward_head'),
                stages=model.apply(v, x, norm=True, method='forward_intermediates'),
                logits=remat.apply(v, x), xla=xla.apply(v, x))
  return family, model, params, run(params, x)


def test_forward_head_and_pre_logits(outputs):
  """__call__ == forward_head(forward_features); pre-logits are each family's pooling (timm's forward_head)."""
  family, model, params, out = outputs
  assert out['logits'].shape == (2, NUM_CLASSES) and out['logits'].dtype == jnp.float32
  np.testing.assert_allclose(out['head'], out['logits'], atol=1e-6)  # Also: remat leaves the outputs unchanged.
  assert out['pre_logits'].shape == (2, model.num_features)
  feats = np.asarray(out['features'])
  if family == 'convnext':  # NHWC map; the head norm comes after the mean over H, W.
    pooled, norm = feats.mean(axis=(1, 2)), params['head_norm']
  elif family == 'beit':  # Tokens [cls, patches]; mean of the patch tokens, then fc_norm.
    pooled, norm = feats[:, 1:].mean(axis=1), params['fc_norm']
  else:  # CaiT: the (final-normed) class token.
    pooled, norm = feats[:, 0], None
  if norm is not None:
    mu, var = pooled.mean(-1, keepdims=True), pooled.var(-1, keepdims=True)
    pooled = (pooled - mu) / np.sqrt(var + 1e-6) * np.asarray(norm['scale']) + np.asarray(norm['bias'])
  np.testing.assert_allclose(out['pre_logits'], pooled, atol=1e-5)


def test_per_stage_features(outputs):
  family, model, _, out = outputs
  _, _, size, stages = TINY[family]
  assert [m.shape for m in out['stages']] == [(2, size // s, size // s, c) for s, c in stages]
  assert model.num_features == stages[-1][1]
  feats = out['features']
  last = out['stages'][-1]
  if family == 'convnext':  # forward_features is the last stage map (timm's norm_pre is the identity).
    np.testing.assert_allclose(feats, last, atol=1e-6)
  else:  # norm=True: the final-normed patch tokens (BEiT has no final norm: the last block's patch tokens).
    np.testing.assert_allclose(feats[:, 1:].reshape(last.shape), last, atol=1e-6)


def test_attention_kernel_choice_keeps_logits(outputs):
  """attention_impl='xla' (jax.nn.dot_product_attention) gives the einsum path's logits (CaiT: class attention)."""
  _, _, _, out = outputs
  np.testing.assert_allclose(out['xla'], out['logits'], atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(TINY))
def test_every_parameter_gets_a_gradient(family):
  model = _model(family)
  x = model_utils.images(2, TINY[family][2])
  params = model_utils.random_variables(model, x)['params']
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)))(params)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
  assert not dead, dead


def _trace(model, size):
  """Traces a training forward (nothing runs): every LayerNorm / Conv / DropPath module called, and the jaxpr."""
  seen = []

  def record(f, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, (nn.LayerNorm, nn.Conv, layers.DropPath)):
      seen.append(('/'.join(context.module.path), context.module))
    return f(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = model_utils.abstract_variables(model, x)
  with nn.intercept_methods(record):
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, rngs={'dropout': jax.random.key(0)}))(
        variables, x)
  return seen, str(jaxpr)


@pytest.mark.parametrize('family', sorted(TINY))
def test_drop_path_eps_gelu_and_padding(family):
  """drop_path_rate reaches every residual branch (linear in depth; constant in CaiT's self-attention blocks and
  none in its class-attention blocks); LayerNorm eps 1e-6; exact GELU; PyTorch conv padding."""
  modules, jaxpr = _trace(_model(family, drop_path_rate=0.4), TINY[family][2])
  rates = [(p, m.rate) for p, m in modules if isinstance(m, layers.DropPath)]
  overrides = TINY[family][1]
  if family == 'convnext':
    assert [r for _, r in rates] == pytest.approx(list(np.linspace(0, 0.4, sum(overrides['depths']))))
  elif family == 'beit':
    assert [r for _, r in rates] == pytest.approx(list(np.repeat(np.linspace(0, 0.4, overrides['depth']), 2)))
  else:
    assert [r for _, r in rates] == [0.4] * (2 * overrides['depth'])
    assert not any('token_only' in p for p, _ in rates)
  norms = [(p, m.epsilon) for p, m in modules if isinstance(m, nn.LayerNorm)]
  assert norms and all(eps == 1e-6 for _, eps in norms), norms
  assert re.search(r'\berfc?\b', jaxpr) and not re.search(r'\btanh\b', jaxpr)
  for path, m in modules:
    if isinstance(m, nn.Conv):
      kernel = tuple(m.kernel_size)
      patchify = m.padding == 'VALID' and tuple(m.strides) == kernel
      assert patchify or m.padding == tuple((k // 2, k // 2) for k in kernel), (path, m.padding)


@pytest.mark.parametrize('family', sorted(TINY))
def test_bfloat16_compute_keeps_float32_params_and_logits(family):
  model = _model(family, dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((2, TINY[family][2], TINY[family][2], 3), jnp.float32)
  variables = model_utils.abstract_variables(model, x)
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  out = jax.eval_shape(model.apply, variables, x)
  assert out.shape == (2, NUM_CLASSES) and out.dtype == jnp.float32


@pytest.mark.parametrize('family, size, match', [
    ('convnext', 8, 'too small'), ('cait', 18, 'multiple of patch_size'), ('beit', 18, 'multiple of patch_size')])
def test_bad_input_size_names_the_fix(family, size, match):
  with pytest.raises(ValueError, match=match):
    model_utils.abstract_params(_model(family), size)


def test_parameters_follow_the_grid_and_refuse_another():
  """CaiT's pos_embed and BEiT's bias tables are sized by the patch grid; other sizes are refused by name."""
  for family, what in (('cait', 'pos_embed'), ('beit', 'relative_position_bias_table')):
    model = _model(family)
    params = model_utils.random_params(model, 16)
    with pytest.raises(ValueError, match=what):
      jax.eval_shape(functools.partial(model.apply, {'params': params}), jnp.zeros((1, 24, 24, 3)))


def test_beit_relative_position_index():
  """timm's gen_relative_position_index for a 2x2 grid: offsets (dy + 1) * 3 + (dx + 1), then the class rows."""
  index = beit.relative_position_index((2, 2))
  assert index.shape == (5, 5) and beit.table_rows((2, 2)) == 12
  np.testing.assert_array_equal(index[1:, 1:], [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
  assert (index[0, 1:] == 9).all() and (index[1:, 0] == 10).all() and index[0, 0] == 11


# -- the main job trains each family at tiny width on digits -----------------------------------------------------

MAIN_OVERRIDES = {  # Tiny widths on the default config's 16 px digits (patch / stem stride 4 from the config).
    'convnext': ['--config.model.name=convnext_t', '--config.model.depths=(1, 1)', '--config.model.dims=(8, 16)'],
    'cait': ['--config.model.name=cait_xxs24', '--config.model.embed_dim=16', '--config.model.depth=1',
             '--config.model.num_heads=2', '--config.model.depth_token_only=1'],
    'beit': ['--config.model.name=beit_b16', '--config.model.embed_dim=16', '--config.model.depth=1',
             '--config.model.num_heads=2'],
}


@pytest.mark.slow
@pytest.mark.parametrize('family', sorted(MAIN_OVERRIDES))
def test_main_job_trains_family_on_digits(family, digits_data_dir, tmp_path):
  """`python -m vit_jax.main --config=configs/default.py --config.model.name=...` runs a few steps end to end."""
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


# -- timm parity and conversion ----------------------------------------------------------------------------------

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
def test_logits_match_timm(family):
  """Converted timm weights (image size read off the checkpoint) reproduce timm's float32 logits within 1e-5."""
  meta, overrides, io, sd = _fixture(family)
  params = convert.timm_to_params(meta['model'], sd, model_overrides=overrides)
  model = registry.create_model(meta['model'], num_classes=meta['num_classes'], **overrides)
  logits = np.asarray(jax.jit(model.apply)({'params': params}, io['input_nhwc']))
  diff = float(np.abs(logits - io['logits']).max())
  print(f'\n[parity] {family}: max |logit diff| vs timm = {diff:.3e} (|logits| max {np.abs(io["logits"]).max():.3f})')
  assert logits.shape == io['logits'].shape and diff <= 1e-5
  assert convert.timm_numerics(meta['model']) == {}  # PyTorch-born: exact GELU and timm's epsilons by default.


def test_new_class_count_keeps_convnext_head_norm():
  """A new class count re-initialises only the classifier (timm's head.fc), not ConvNeXt's head.norm."""
  meta, overrides, _, sd = _fixture('convnext')
  params = convert.timm_to_params(meta['model'], sd, model_overrides=overrides, num_classes=7)
  assert params['head']['kernel'].shape == (24, 7) and not params['head']['kernel'].any()
  np.testing.assert_array_equal(params['head_norm']['scale'], sd['head.norm.weight'])


def test_beit_table_resize_keeps_class_rows():
  """The (2g-1)^2 offsets are resized as Swin's tables (PyTorch bicubic); the 3 class-token rows are kept."""
  table = np.random.default_rng(0).standard_normal((beit.table_rows((4, 4)), 2)).astype(np.float32)
  out = beit.resize_table(table, beit.table_rows((6, 6)))
  assert out.shape == (124, 2) and out.dtype == np.float32
  np.testing.assert_array_equal(out[-3:], table[-3:])
  np.testing.assert_allclose(out[:-3], resize.resize_rel_pos_bias_table(table[:-3], 121), atol=1e-6)
  with pytest.raises(ValueError, match='square'):
    beit.resize_table(table, 10 * 11 + 3)


def test_finetune_at_new_resolution_through_convert():
  """Converting the 32 px fixtures for 48 px models fits BEiT's bias tables and CaiT's pos_embed (their image size
  is read off the checkpoint); the result has the 48 px model's shapes and applies to 48 px images, and loading the
  32 px params into the 48 px model (init_from) fits them alike."""
  for family, path in (('beit', 'blocks_1/attn/relative_position_bias_table'), ('cait', 'pos_embed')):
    meta, overrides, _, sd = _fixture(family)
    assert facts.get_family(family).infer_image_size(sd, {**registry.get_model_spec(meta['model']).kwargs,
                                                             **overrides}) == 32
    params = convert.timm_to_params(meta['model'], sd, model_overrides=overrides, image_size=48)
    flat = {'/'.join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
    model = registry.create_model(meta['model'], num_classes=meta['num_classes'], **overrides)
    want = model_utils.abstract_params(model, 48)
    assert flax.traverse_util.flatten_dict(jax.tree.map(lambda a: a.shape, params)) == \
        flax.traverse_util.flatten_dict(jax.tree.map(lambda a: a.shape, want))
    logits = jax.eval_shape(functools.partial(model.apply, {'params': params}), jnp.zeros((1, 48, 48, 3)))
    assert logits.shape == (1, meta['num_classes'])
    # init_from's path (pretrained.load_pretrained with the model): the same fit from the 32 px params.
    at_32 = convert.timm_to_params(meta['model'], sd, model_overrides=overrides)
    loaded = pretrained.load_pretrained(at_32, jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), want),
                                        model=model, image_size=48, posemb_interpolation='bicubic')
    assert jax.tree.all(jax.tree.map(np.array_equal, loaded, params))
    source = sd[path.replace('blocks_1/', 'blocks.1.').replace('/', '.')]
    if family == 'beit':
      np.testing.assert_allclose(flat[path], beit.resize_table(source, beit.table_rows((12, 12))))
    else:
      np.testing.assert_allclose(flat[path], resize.resize_posemb(source, 144, num_prefix_tokens=0,
                                                                  method='bicubic'))


# -- layer decay and freezing through the family's grouping ------------------------------------------------------

EXPECTED_LAYERS = {  # Tiny models (TINY): parameter-path prefix -> layer id (0 stem, blocks 1..L, then L + 1).
    'convnext': ({'stem/': 0, 'stages_0/blocks_0/': 1, 'stages_1/downsample/': 2, 'stages_1/blocks_0/': 2,
                  'stages_2/downsample/': 3, 'stages_2/blocks_0/': 3, 'head_norm/': 4, 'head/': 4}, 3),
    'cait': ({'patch_embed/': 0, 'cls_token': 0, 'pos_embed': 0, 'blocks_0/': 1, 'blocks_token_only_0/': 2,
              'norm/': 2, 'head/': 2}, 1),
    'beit': ({'patch_embed/': 0, 'cls_token': 0, 'blocks_0/': 1, 'fc_norm/': 2, 'head/': 2}, 1),
}


@pytest.mark.parametrize('family', sorted(TINY))
def test_layer_ids_follow_the_family_grouping(family):
  params = model_utils.abstract_params(_model(family), TINY[family][2])
  names = param_groups.all_names(params)
  expected, depth = EXPECTED_LAYERS[family]
  for found in (param_groups.layer_ids(names, family), param_groups.layer_ids(names)):  # Named, and detected.
    ids, num_blocks = found
    assert num_blocks == depth
    for name in names:
      [want] = {v for k, v in expected.items() if name.startswith(k)}
      assert ids[name] == want, (name, ids[name], want)


def test_layer_decay_and_freezing_in_the_optimizer():
  """create_optimizer with layer_decay and a freeze regex on ConvNeXt: frozen stem/stage-0 params get zero updates;
  the rest are scaled by decay ** (L + 1 - layer id)."""
  model = _model('convnext')
  params = model_utils.random_params(model, 32)
  opt_config = base_config().optimizer
  opt_config.name, opt_config.lr, opt_config.warmup_steps, opt_config.weight_decay = 'sgd', 1.0, 0, 0.0
  opt_config.grad_clip_norm, opt_config.layer_decay, opt_config.freeze = 0.0, 0.5, r'^(stem|stages_0)/'
  opt_config.schedule = 'constant'
  tx, _ = optim.create_optimizer(opt_config, total_steps=10, family='convnext')
  ones = jax.tree.map(jnp.ones_like, params)
  updates, _ = jax.jit(tx.update)(ones, tx.init(params), params)
  flat = {param_groups.path_name(p): np.asarray(u) for p, u in jax.tree_util.tree_leaves_with_path(updates)}
  ids, num_blocks = param_groups.layer_ids(list(flat), 'convnext')
  for name, update in flat.items():
    if re.match(r'(stem|stages_0)/', name):
      assert not update.any(), name
    else:
      np.testing.assert_allclose(np.abs(update), 0.5 ** (num_blocks + 1 - ids[name]), rtol=1e-6, err_msg=name)


# -- analytic FLOPs ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name, published_gmacs', [
    ('convnext_t', 4.5), ('convnext_s', 8.7), ('convnext_b', 15.4), ('convnext_l', 34.4)])
def test_convnext_macs(name, published_gmacs):
  """Analytic MACs match the paper's GFLOPs (rounded to 0.1 G). That they equal XLA's count of the program's
  matmuls and convolutions is test_family_facts' registry-wide check."""
  model = registry.create_model(name, num_classes=1000)
  fwd, method = flops.model_forward_flops(model, 224)
  assert method == 'analytic' and fwd / 2e9 == pytest.approx(published_gmacs, abs=0.05)


def test_cait_and_beit_flops_use_xla_cost_analysis():
  for family in ('cait', 'beit'):
    assert facts.get_family(family).forward_macs is None
    assert flops.model_forward_flops(_model(family), 16)[1] == 'xla'
