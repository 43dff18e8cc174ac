"""timm -> flax conversion (vit_jax.convert): logit parity on committed fixtures, and the error paths.

The fixtures under tests/parity/fixtures/ were made by tests/parity/make_fixtures.py (torch + timm); these tests
need neither.
"""
import functools
import json
import os
import re

import jax
import numpy as np
import pytest

from vit_jax import convert
from vit_jax import finetune
from vit_jax import pretrained
from vit_jax.models import create_model
from vit_jax.models import get_model_spec
from vit_jax.models import list_models
from vit_jax.models import vit

FIXTURES = os.path.join(os.path.dirname(__file__), 'parity', 'fixtures')
FAMILIES = ('vit', 'deit', 'mixer', 'swin', 'swinv2', 'hybrid', 'hybrid_ti', 'pvt_v2', 'pvt_v2_li', 'mvitv2')


@functools.lru_cache(maxsize=None)
def _fixture(family):
  base = os.path.join(FIXTURES, family)
  with open(base + '.json') as f:
    meta = json.load(f)
  overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in meta['model_overrides'].items()}
  with np.load(base + '.npz', allow_pickle=False) as data:
    io = {k: data[k] for k in data.files}
  return meta, overrides, io, base + '.safetensors'


def _state_dict(family):
  return convert.load_safetensors(_fixture(family)[3])


def _convert(family, sd=None, **kwargs):
  meta, overrides, _, _ = _fixture(family)
  return convert.timm_to_params(meta['model'], _state_dict(family) if sd is None else sd,
                                model_overrides=overrides, image_size=meta['image_size'], **kwargs)


@pytest.mark.parametrize('family', FAMILIES)
def test_logits_match_timm(family):
  meta, overrides, io, _ = _fixture(family)
  params = _convert(family)
  model = create_model(meta['model'], num_classes=meta['num_classes'], **overrides)
  logits = np.asarray(jax.jit(model.apply)({'params': params}, io['input_nhwc']))
  diff = float(np.abs(logits - io['logits']).max())
  print(f'\n[parity] {family}: max |logit diff| vs timm = {diff:.3e} (|logits| max {np.abs(io["logits"]).max():.3f})')
  assert logits.shape == io['logits'].shape
  assert diff < 1e-4


def test_fixtures_are_small_and_have_no_pickle():
  for family in FAMILIES:
    for ext in ('.safetensors', '.npz', '.json'):
      assert os.path.getsize(os.path.join(FIXTURES, family + ext)) < 300_000


def test_unused_key_raises():
  sd = _state_dict('vit')
  sd['blocks.0.attn.extra.weight'] = np.zeros((3,), np.float32)
  sd['blocks.0.ls1.gamma'] = np.zeros((32,), np.float32)
  with pytest.raises(ValueError, match=r'Unused checkpoint keys \(2\).*blocks\.0\.attn\.extra\.weight'):
    _convert('vit', sd)


def test_missing_param_raises():
  sd = _state_dict('vit')
  del sd['blocks.1.mlp.fc2.bias']
  with pytest.raises(ValueError, match=r'not in the checkpoint \(1\).*encoderblock_1/MlpBlock_0/Dense_1/bias'):
    _convert('vit', sd)


def test_deeper_checkpoint_reports_extra_blocks():
  sd = _state_dict('vit')
  sd.update({k.replace('blocks.1.', 'blocks.2.'): v for k, v in sd.items() if k.startswith('blocks.1.')})
  with pytest.raises(ValueError, match=r"Unused checkpoint keys \(12\): \['blocks\.2\.attn\.proj\.bias'"):
    _convert('vit', sd)


def test_shape_mismatch_names_param_and_shapes():
  sd = _state_dict('vit')
  sd['norm.weight'] = np.ones((31,), np.float32)
  with pytest.raises(ValueError, match=r'Transformer/encoder_norm/scale \(from norm.weight\): '
                                       r'checkpoint gives \(31,\), model expects \(32,\)'):
    _convert('vit', sd)


def test_known_buffers_are_ignored_and_unsupported_layout_raises():
  sd = _state_dict('swin')
  sd['layers.0.blocks.0.attn.relative_position_index'] = np.zeros((16, 16), np.int64)
  sd['layers.0.blocks.1.attn_mask'] = np.zeros((4, 16, 16), np.float32)
  params = _convert('swin', sd)
  assert params['layers_2']['blocks_0']['attn']['relative_position_bias_table'].shape == (49, 4)
  with pytest.raises(ValueError, match="family 'vit' has no conversion table for layout 'nope'"):
    convert.timm_to_params('vit_ti16', {}, layout='nope')


def test_num_classes_drop_or_new_head():
  params = _convert('vit', num_classes=0)
  assert 'head' not in params
  params = _convert('vit', num_classes=3)
  assert params['head']['kernel'].shape == (32, 3) and not params['head']['kernel'].any()


def test_pickled_checkpoint_refused(tmp_path):
  path = tmp_path / 'weights.pth'
  path.write_bytes(b'not read')
  with pytest.raises(ValueError, match=r"(?s)pickled.*safetensors.*weights_only=True.*'model'"):
    convert.load_safetensors(str(path))


def test_unreadable_safetensors_errors_name_the_file(tmp_path):
  """A truncated or foreign file and a missing path: the error names the file (safetensors' own does not)."""
  path = tmp_path / 'weights.safetensors'
  path.write_bytes(b'garbage' * 3)
  with pytest.raises(ValueError, match=f'{path} is not a readable safetensors file'):
    convert.load_safetensors(str(path))
  with pytest.raises(FileNotFoundError, match=f'{tmp_path / "missing.safetensors"}: no such safetensors file'):
    convert.load_safetensors(str(tmp_path / 'missing.safetensors'))


def test_cli_writes_npz_loadable_by_load_pretrained_and_refuses_non_empty_out(tmp_path):
  meta, overrides, io, src = _fixture('vit')
  out = tmp_path / 'converted'
  argv = ['convert', f'--model={meta["model"]}', f'--src={src}', f'--out={out}',
          f'--model_overrides={json.dumps(meta["model_overrides"])}']
  path = convert.main(argv)
  assert sorted(os.listdir(out)) == ['convert.json', 'params.npz']
  # config.init_from goes through load_pretrained: the flat npz must load into the model's structure.
  model = create_model(meta['model'], num_classes=meta['num_classes'], **overrides)
  loaded = pretrained.load_pretrained(path, _zeros_like_params(model, io['input_nhwc'][:1]))
  logits = np.asarray(model.apply({'params': loaded}, io['input_nhwc']))
  assert np.abs(logits - io['logits']).max() < 1e-4
  with pytest.raises(ValueError, match='refusing to overwrite'):
    convert.main(argv)
  # convert.json records the options that reproduce timm; a fine-tuning config without them is warned about.
  assert json.loads((out / 'convert.json').read_text())['timm_numerics'] == {'gelu_approximate': False}
  [line] = finetune.warn_about_numerics(out, create_model(meta['model'], num_classes=3))
  assert 'config.model.gelu_approximate=True' in line
  assert finetune.warn_about_numerics(out, model) == []
  assert convert.timm_numerics('r50_vit_b16') == {'gelu_approximate': False, 'resnet_norm_style': 'timm'}
  assert convert.timm_numerics('swin_t') == {}


def test_swin_npz_loads_through_load_pretrained(tmp_path):
  meta, overrides, io, _ = _fixture('swinv2')
  params = _convert('swinv2')
  path = str(tmp_path / 'params.npz')
  convert.save_params_npz(params, path)
  model = create_model(meta['model'], num_classes=meta['num_classes'], **overrides)
  loaded = pretrained.load_pretrained(path, _zeros_like_params(model, io['input_nhwc'][:1]))
  flat = jax.tree_util.tree_leaves_with_path(loaded)
  assert all(np.array_equal(v, _get(params, p)) for p, v in flat)


def _zeros_like_params(model, x):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))['params']
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def _get(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


# Registry entries without a timm counterpart, and why.
NO_TIMM_EQUIVALENT = {
    'vit_pico': 'project-only tiny model for the digits config and tests',
    'swinv2_l': "timm has no window-8 256 px Swin-V2-L (its 256 px large model uses window 16)",
    **{f'maxvit_{s}': 'timm registers the paper MaxViT only with TF numerics (maxvit_*_tf_224); the PyTorch-numerics '
                      'build is timm MaxxVit with MaxxVitCfg defaults' for s in 'tsb'},
    'cvt_13': 'CvT is not in timm (Hugging Face microsoft/cvt-13; layout hf)',
    'cvt_21': 'CvT is not in timm (Hugging Face microsoft/cvt-21; layout hf)',
    'cvt_w24': 'CvT is not in timm (Hugging Face microsoft/cvt-w24-384-22k; layout hf)',
    **{f'dino_vit_{v}': 'timm keeps the DINO backbone only (vit_*_224.dino), not the DINO head'
       for v in ('s16', 'b16', 's8', 'b8')},
    # timm declined video (its issue #466) and has no AST; these convert from Hugging Face (layout 'hf').
    **{name: 'video/audio model: not in timm (Hugging Face transformers or scenic layout)'
       for name in ('vivit_b16x2_st', 'vivit_b16x2_fe', 'vivit_b16x2_fsa', 'vivit_pico', 'timesformer_b16',
                    'timesformer_pico', 'ast_b16', 'ast_pico')},
    'vit_frames_pico': 'project-only frame-averaged image ViT (the video baseline)',
}


@pytest.mark.parametrize('name', list_models())
def test_every_registry_entry_records_its_timm_name(name):
  """timm_name names the timm architecture (optionally '.pretrained_tag') with the same patch/window/size."""
  spec = get_model_spec(name)
  if name in NO_TIMM_EQUIVALENT:
    assert spec.timm_name is None
    return
  assert isinstance(spec.timm_name, str) and re.fullmatch(r'[a-z0-9_]+(\.[a-z0-9_]+)?', spec.timm_name), name
  arch, kw = spec.timm_name.split('.')[0], spec.kwargs
  assert spec.family in convert.supported_families()
  if spec.family in ('vit', 'deit') and kw.get('resnet') is None:
    assert f'patch{kw["patch_size"]}_{spec.image_size}' in arch
    assert ('distilled' in arch) == (spec.builder is not vit.VisionTransformer)
  elif spec.family == 'vit' and kw['resnet']:  # Hybrid: timm names the total stride (stem x patch) and size.
    stride = kw['patch_size'] * 4 * 2 ** (len(kw['resnet']) - 1)
    assert arch.endswith(f'_r{2 + 3 * sum(kw["resnet"]) if len(kw["resnet"]) == 4 else 50}_s{stride}_224'), arch
  elif spec.family == 'vit':  # Root-only stem (R+Ti/16): timm keeps the paper's '/16' label and names the patch.
    assert arch.endswith(f'_r_s16_p{kw["patch_size"]}_{spec.image_size}'), arch
  elif spec.family == 'mixer':
    assert arch == f'mixer_{name.split("_")[1]}_{spec.image_size}' and name.endswith(str(kw['patch_size']))
  elif spec.family in ('swin', 'swinv2'):
    assert f'window{kw["window_size"]}' in arch and arch.endswith(str(spec.image_size))
  elif spec.family == 'pvt_v2':
    assert arch == name
  elif spec.family == 'xcit':
    assert arch == f'xcit_{dict(t12="tiny_12", s12="small_12", m24="medium_24")[name.split("_")[1]]}_' \
        f'p{kw["patch_size"]}_{spec.image_size}'
  elif spec.family == 'mvitv2':
    assert arch == {'mvitv2_t': 'mvitv2_tiny', 'mvitv2_s': 'mvitv2_small', 'mvitv2_b': 'mvitv2_base'}[name]
  elif spec.family == 'maxvit':
    size = {'t': 'tiny', 's': 'small', 'b': 'base'}[name.split('_')[1]]
    assert arch == f'maxvit_{size}_tf_{spec.image_size}' and kw['padding'] == 'same'
