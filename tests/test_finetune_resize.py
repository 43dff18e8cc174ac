"""Fine-tuning at a new resolution: posemb interpolation (ViT, DeiT), Swin v1 bias-table interpolation (torch
bicubic, as the reference) and SwinV2's continuous bias at a new window, through the loading paths
(`vit_jax.pretrained.load_pretrained`, used by config.init_from, and `vit_jax.convert.timm_to_params`)."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests import model_utils
from vit_jax import convert
from vit_jax import pretrained
from vit_jax.models import deit
from vit_jax.models import swin

FIXTURES = os.path.join(os.path.dirname(__file__), 'parity', 'fixtures')
SWIN_TINY = dict(num_classes=3, embed_dim=8, depths=(2, 2), num_heads=(1, 2), drop_path_rate=0.0)


@pytest.fixture(scope='module')
def resize_reference():
  with np.load(os.path.join(FIXTURES, 'resize.npz'), allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def _save(params, tmp_path, name='params.npz'):
  path = str(tmp_path / name)
  convert.save_params_npz(params, path)
  return path


# -- the interpolation itself ----------------------------------------------------------------------------------------

def test_torch_bicubic_matrix_properties():
  np.testing.assert_allclose(pretrained.torch_bicubic_matrix(5, 5), np.eye(5), atol=1e-12)
  for n_in, n_out in ((5, 9), (9, 5), (13, 23)):
    np.testing.assert_allclose(pretrained.torch_bicubic_matrix(n_in, n_out).sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize('case', ['table_3_to_5', 'table_5_to_3'])
def test_rel_table_resize_matches_torch_bicubic(resize_reference, case):
  """Values from the official Swin loader's F.interpolate(mode='bicubic'), hard-coded in tests/parity/fixtures."""
  table, want = resize_reference[case + '_in'], resize_reference[case + '_out']
  got = pretrained.resize_rel_pos_bias_table(table, want.shape[0])
  assert got.shape == want.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, want, atol=1e-5)
  # jax.image.resize's bicubic (Keys a=-0.5) is a different kernel: it would not pass.
  side = int(np.sqrt(want.shape[0]))
  other = jax.image.resize(table.reshape(int(np.sqrt(len(table))), -1, 2), (side, side, 2), 'bicubic')
  assert np.abs(np.asarray(other).reshape(want.shape) - want).max() > 1e-3
  with pytest.raises(ValueError, match='square window'):
    pretrained.resize_rel_pos_bias_table(table, 50)


def test_posemb_bicubic_matches_timm(resize_reference):
  """timm's resample_abs_pos_embed (torch bicubic, antialias=True) == jax.image.resize bicubic when upsampling."""
  grid, want = resize_reference['posemb_4_to_6_in'], resize_reference['posemb_4_to_6_out']
  pe = np.concatenate([np.full((1, 2, 8), 7.0, np.float32), grid.reshape(1, 16, 8)], axis=1)
  got = pretrained.resize_posemb(pe, 2 + 36, num_prefix_tokens=2, method='bicubic')
  np.testing.assert_array_equal(got[:, :2], pe[:, :2])
  np.testing.assert_allclose(got[:, 2:], want.reshape(1, 36, 8), atol=1e-5)


# -- ViT / DeiT position embeddings ---------------------------------------------------------------------------------

def test_deit_posemb_keeps_cls_and_dist_rows_on_load(tmp_path):
  model = deit.DistilledVisionTransformer(num_classes=3, patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
                                          mlp_dim=32)
  params = model_utils.random_params(model, size=16)  # 4x4 grid + cls + dist = 18 rows.
  pe = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
  loaded = pretrained.load_pretrained(_save(params, tmp_path), model_utils.abstract_params(model, 24),
                                      posemb_interpolation='bicubic_torch')
  got = np.asarray(loaded['Transformer']['posembed_input']['pos_embedding'])
  assert got.shape == (1, 2 + 36, 16)
  np.testing.assert_array_equal(got[:, :2], pe[:, :2])  # Both token rows kept, not interpolated.
  np.testing.assert_allclose(got[:, 2:], pretrained.resize_posemb(pe[:, 2:], 36, has_cls=False,
                                                                  method='bicubic_torch'), atol=1e-6)
  assert jax.eval_shape(model.apply, {'params': loaded}, model_utils.images(1, 24)).shape == (1, 3)


@pytest.mark.parametrize('family', ['vit', 'deit'])
def test_timm_conversion_at_a_new_image_size(family):
  with open(os.path.join(FIXTURES, family + '.json')) as f:
    meta = json.load(f)
  sd = convert.load_safetensors(os.path.join(FIXTURES, family + '.safetensors'))
  params = convert.timm_to_params(meta['model'], sd, model_overrides=meta['model_overrides'], image_size=48)
  prefix = 2 if family == 'deit' else 1
  got = params['Transformer']['posembed_input']['pos_embedding']
  assert got.shape == (1, prefix + 144, 32)  # 48 px / patch 4 -> 12x12 (from 8x8).
  np.testing.assert_array_equal(got[:, :prefix], sd['pos_embed'][:, :prefix])
  np.testing.assert_allclose(got[:, prefix:], pretrained.resize_posemb(
      sd['pos_embed'][:, prefix:], 144, has_cls=False, method='bicubic'), atol=1e-6)


# -- Swin v1 relative-position bias tables ---------------------------------------------------------------------------

def test_swin_v1_tables_resized_when_loading_another_window(tmp_path):
  small = swin.SwinTransformer(window_size=4, **SWIN_TINY)  # 32 px: stage maps 8 (w4), 4 (w4, unshifted).
  big = swin.SwinTransformer(window_size=8, **SWIN_TINY)  # 64 px: maps 16 (w8), 8 (w8).
  params = model_utils.random_params(small, size=32)
  loaded = pretrained.load_pretrained(_save(params, tmp_path), model_utils.abstract_params(big, 64))
  for stage, block in (('layers_0', 'blocks_0'), ('layers_1', 'blocks_1')):
    old = np.asarray(params[stage][block]['attn']['relative_position_bias_table'])
    new = np.asarray(loaded[stage][block]['attn']['relative_position_bias_table'])
    assert old.shape == (49, 1 if stage == 'layers_0' else 2) and new.shape == (225, old.shape[1])
    np.testing.assert_allclose(new, pretrained.resize_rel_pos_bias_table(old, 225), atol=1e-6)
    np.testing.assert_allclose(new.reshape(15, 15, -1)[7, 7], old.reshape(7, 7, -1)[3, 3], atol=1e-6)  # Centre.
  np.testing.assert_array_equal(loaded['layers_0']['blocks_0']['mlp']['fc1']['kernel'],
                                params['layers_0']['blocks_0']['mlp']['fc1']['kernel'])
  assert jax.eval_shape(big.apply, {'params': loaded}, model_utils.images(1, 64)).shape == (1, 3)


def test_swin_timm_conversion_to_another_window():
  with open(os.path.join(FIXTURES, 'swin.json')) as f:
    meta = json.load(f)
  sd = convert.load_safetensors(os.path.join(FIXTURES, 'swin.safetensors'))
  overrides = {**meta['model_overrides'], 'window_size': 8}
  params = convert.timm_to_params(meta['model'], sd, model_overrides=overrides, image_size=64)
  key = 'layers.0.blocks.1.attn.relative_position_bias_table'  # timm window 4 (7x7) -> ours 8 (15x15).
  np.testing.assert_allclose(params['layers_0']['blocks_1']['attn']['relative_position_bias_table'],
                             pretrained.resize_rel_pos_bias_table(sd[key], 225), atol=1e-6)


# -- SwinV2 continuous position bias at a new window ----------------------------------------------------------------

def _timm_log_coords(window, pretrained_window):
  """timm SwinTransformerV2 WindowAttention: relative_coords_table, written out independently of swin.py."""
  h = np.arange(-(window - 1), window, dtype=np.float32)
  table = np.stack(np.meshgrid(h, h, indexing='ij'), axis=-1)
  table /= (pretrained_window - 1) if pretrained_window > 0 else (window - 1)
  table *= 8
  return np.sign(table) * np.log2(np.abs(table) + 1.0) / np.log2(8)


def _cpb_inputs(model, params, x):
  seen = []

  def record(f, args, kwargs, context):
    if isinstance(context.module, swin.CpbMlp) and context.method_name == '__call__':
      seen.append(np.asarray(args[0]))
    return f(*args, **kwargs)

  with nn.intercept_methods(record):
    logits = model.apply({'params': params}, x)
  return logits, seen


def test_swinv2_window8_checkpoint_into_window16_model(tmp_path):
  """As swinv2_*_window12to16 in timm / official: same params, CPB coordinates normalised by the old window."""
  v2 = dict(SWIN_TINY, depths=(2,), num_heads=(2,))
  small = swin.SwinTransformerV2(window_size=8, **v2)
  params = model_utils.random_params(small, size=32)  # 8x8 map: one window-8 window.
  big = swin.SwinTransformerV2(window_size=16, pretrained_window_size=8, **v2)
  loaded = pretrained.load_pretrained(_save(params, tmp_path), model_utils.abstract_params(big, 64))
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))  # Nothing to resize.
  x = model_utils.images(1, 64)
  logits, coords = _cpb_inputs(big, loaded, x)
  assert logits.shape == (1, 3) and np.isfinite(np.asarray(logits)).all()
  assert len(coords) == 2 and coords[0].shape == (31, 31, 2)
  np.testing.assert_allclose(coords[0], _timm_log_coords(16, 8), atol=1e-6)
  np.testing.assert_allclose(coords[0][-1, -1, 0], np.log2(15 / 7 * 8 + 1) / 3, rtol=1e-6)  # Beyond the old +-1.
  # Without pretrained_window_size the coordinates are normalised by the new window, a different model.
  plain = swin.SwinTransformerV2(window_size=16, **v2)
  plain_logits, plain_coords = _cpb_inputs(plain, loaded, x)
  np.testing.assert_allclose(plain_coords[0], _timm_log_coords(16, 0), atol=1e-6)
  assert np.abs(np.asarray(plain_logits) - np.asarray(logits)).max() > 1e-4
