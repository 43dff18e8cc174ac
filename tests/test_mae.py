"""MAE (vit_jax/models/mae.py): masking, patchify, loss and position-table contracts against their definitions
(REFERENCE.md section 6), official parameter counts, and parity with the official forward on committed fixtures
(made by tests/parity/make_mae_fixtures.py)."""
import json
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import model_utils
from vit_jax import convert
from vit_jax.models import mae
from vit_jax.models import registry
from vit_jax.models import vit

FIXTURES = os.path.join(os.path.dirname(__file__), 'parity', 'fixtures')
TINY = dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, decoder_hidden_size=8,
            decoder_num_layers=1, decoder_num_heads=2, decoder_mlp_dim=16)


def _tiny(**kw):
  return registry.create_model('mae_vit_b16', num_classes=0, **{**TINY, **kw})


def test_random_masking_reference_example():
  noise = jnp.asarray([[.9, .1, .5, .3, .7, .2, .8, .4]])
  ids_keep, mask, ids_restore = mae.random_masking(noise, 0.75)
  np.testing.assert_array_equal(ids_keep, [[1, 5]])
  np.testing.assert_array_equal(mask, [[1, 0, 1, 1, 1, 0, 1, 1]])
  np.testing.assert_array_equal(ids_restore, [[7, 0, 4, 2, 5, 1, 6, 3]])


def test_random_masking_is_per_example_and_keeps_the_smallest_noise():
  noise = jax.random.uniform(jax.random.key(0), (5, 49))
  ids_keep, mask, ids_restore = mae.random_masking(noise, 0.75)
  assert ids_keep.shape == (5, 12) and bool((mask.sum(axis=1) == 37).all())
  for n, keep, m in zip(np.asarray(noise), np.asarray(ids_keep), np.asarray(mask)):
    np.testing.assert_array_equal(np.sort(keep), np.sort(np.argsort(n)[:12]))
    np.testing.assert_array_equal(m, np.isin(np.arange(49), keep, invert=True))
  assert len({tuple(k) for k in np.asarray(ids_keep)}) == 5
  # ids_restore undoes the shuffle: [kept, removed] in noise order, gathered back, is the identity.
  order = np.argsort(np.asarray(noise), axis=1)
  np.testing.assert_array_equal(np.take_along_axis(order, np.asarray(ids_restore), 1), np.tile(np.arange(49), (5, 1)))


def test_patchify_order_reference_example():
  images_nchw = np.arange(48, dtype=np.float32).reshape(1, 3, 4, 4)
  patches = mae.patchify(jnp.asarray(images_nchw.transpose(0, 2, 3, 1)), 2)
  assert patches.shape == (1, 4, 12)
  np.testing.assert_array_equal(patches[0, 0], [0, 16, 32, 1, 17, 33, 4, 20, 36, 5, 21, 37])
  np.testing.assert_array_equal(mae.unpatchify(patches, 2, (2, 2)), images_nchw.transpose(0, 2, 3, 1))


def test_norm_pix_loss_reference_numbers():
  """Target [1, 2, 3, 4] normalises with the unbiased variance: +-1.1619, +-0.3873; the loss averages the
  squared error over each patch, then over removed patches only."""
  images = jnp.asarray([1., 2., 3., 4.]).reshape(1, 2, 2, 1)  # One 2x2 patch of one channel.
  mask = jnp.ones((1, 1))
  got = mae.reconstruction_loss(images, jnp.zeros((1, 1, 4)), mask, patch_size=2, norm_pix_loss=True)
  want = np.asarray([-1.1619, -0.3873, 0.3873, 1.1619])
  np.testing.assert_allclose(got, np.mean(want ** 2), atol=1e-4)
  pred = jnp.asarray(want, jnp.float32).reshape(1, 1, 4)
  assert float(mae.reconstruction_loss(images, pred, mask, patch_size=2, norm_pix_loss=True)) < 1e-7
  # Plain pixels; only the removed patch (mask 1) counts.
  images = jnp.arange(8.).reshape(1, 2, 4, 1)  # Patches [0, 1, 4, 5] and [2, 3, 6, 7].
  loss = mae.reconstruction_loss(images, jnp.zeros((1, 2, 4)), jnp.asarray([[0., 1.]]), patch_size=2,
                                 norm_pix_loss=False)
  np.testing.assert_allclose(loss, np.mean(np.square([2, 3, 6, 7])))
  per_example = mae.reconstruction_loss(jnp.concatenate([images, 2 * images]), jnp.zeros((2, 2, 4)),
                                        jnp.asarray([[0., 1.], [1., 0.]]), patch_size=2, norm_pix_loss=False,
                                        per_example=True)
  np.testing.assert_allclose(per_example, [np.mean(np.square([2, 3, 6, 7])), np.mean(np.square([0, 2, 8, 10]))])


def test_sincos_table_definition():
  """Column index in the first D/2 channels, row in the last; frequencies 10000^(-i/(D/4)); zero class row."""
  table = mae.posemb_sincos_2d_mae(3, 5, 8)
  assert table.shape == (1, 16, 8) and table.dtype == np.float32
  np.testing.assert_array_equal(table[0, 0], 0)
  omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
  for r in range(3):
    for c in range(5):
      want = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
      np.testing.assert_allclose(table[0, 1 + r * 5 + c], want, atol=1e-7)
  with pytest.raises(ValueError, match='divisible by 4'):
    mae.posemb_sincos_2d_mae(2, 2, 6)


def test_sincos_table_differs_from_big_vision():
  ours = mae.posemb_sincos_2d_mae(14, 14, 768, cls_token=False)
  big_vision = vit.posemb_sincos_2d(14, 14, 768)
  assert 0.01 < np.abs(ours - big_vision).max() < 0.03


@pytest.mark.parametrize('name,encoder,decoder,tables', [
    ('mae_vit_b16', 85_647_360, 26_008_320, 252_160),
    ('mae_vit_l16', 303_099_904, 26_139_392, 302_592),
    ('mae_vit_h14', 630_435_840, 26_178_124, 460_544)])
def test_official_counts(name, encoder, decoder, tables):
  model = registry.create_model(name, num_classes=0, scan_layers=True)  # Scanned blocks trace faster.
  params = model_utils.abstract_params(model, 224)
  enc = model_utils.count({k: v for k, v in params.items() if k in ('embedding', 'cls', 'Transformer')})
  assert (enc, model_utils.count(params) - enc) == (encoder, decoder)
  assert registry.get_model_spec(name).num_params == encoder + decoder
  grid = 224 // model.patch_size
  fixed = [mae.posemb_sincos_2d_mae(grid, grid, w) for w in (model.hidden_size, model.decoder_hidden_size)]
  assert sum(t.size for t in fixed) == tables
  assert (model.decoder_hidden_size, model.decoder_num_layers, model.decoder_num_heads, model.decoder_mlp_dim,
          model.mask_ratio) == (512, 8, 16, 2048, 0.75)


def _patch_moved(x, index, amount):
  """`x` with example 0's patch `index` (4x4 patches on a 4x4 grid) shifted by `amount`."""
  r, c = divmod(index, 4)
  return x.at[0, 4 * r:4 * r + 4, 4 * c:4 * c + 4].add(amount)


@pytest.fixture(scope='module')
def tiny_run():
  """Every output the tests below read, from one compiled program (CPU compiles dominate)."""
  model = _tiny()
  x = model_utils.images(3, 16)
  params = model_utils.random_params(model, 16)
  noise = jax.random.uniform(jax.random.key(1), (3, 16))
  mask = np.asarray(mae.random_masking(noise, 0.75)[1])
  removed, kept = int(np.argmax(mask[0])), int(np.argmin(mask[0]))
  classifier = registry.create_model('vit_b16', num_classes=0, gelu_approximate=False,
                                     **{k: TINY[k] for k in ('patch_size', 'hidden_size', 'num_layers', 'num_heads',
                                                             'mlp_dim')})
  backbone = model.backbone_params(params, 16)

  @jax.jit
  def run(params, backbone, x, noise):
    v = {'params': params}
    # The original batch, then example 0 with a removed / a kept patch moved: one forward (per-example outputs).
    variants = jnp.concatenate([x, _patch_moved(x, removed, 5.0)[:1], _patch_moved(x, kept, 5.0)[:1]])
    pred = model.apply(v, variants, noise=jnp.concatenate([noise, noise[:1], noise[:1]]))['pred']
    feats = model.apply(v, x, method='forward_features')
    return dict(
        out=model.apply(v, x, noise=noise), removed_moved=pred[3], kept_moved=pred[4],
        rng_a=model.apply(v, x, rngs={'mask': jax.random.key(3)})['mask'],
        rng_c=model.apply(v, x, rngs={'mask': jax.random.key(4)})['mask'],
        features=feats, head=model.apply(v, feats, method='forward_head'),
        classifier_features=classifier.apply({'params': backbone}, x, method='forward_features'))
  return model, classifier, x, params, noise, backbone, run(params, backbone, x, noise)


def test_forward_contract(tiny_run):
  model, _, x, _, noise, _, res = tiny_run
  out = res['out']
  assert set(out) == {'loss', 'pred', 'mask'}
  assert out['loss'].shape == () and out['pred'].shape == (3, 16, 48) and out['mask'].shape == (3, 16)
  np.testing.assert_array_equal(out['mask'], mae.random_masking(noise, 0.75)[1])
  want = mae.reconstruction_loss(x, out['pred'], out['mask'], patch_size=4, norm_pix_loss=False)
  np.testing.assert_allclose(out['loss'], want, rtol=1e-6)


def test_visible_patches_only_reach_the_encoder(tiny_run):
  """Changing the pixels of a removed patch changes no prediction (the encoder never sees it); a kept one does."""
  res = tiny_run[-1]
  np.testing.assert_allclose(res['removed_moved'], res['out']['pred'][0], atol=1e-6)
  assert np.abs(res['kept_moved'] - res['out']['pred'][0]).max() > 1e-3


def test_noise_from_the_mask_rng(tiny_run):
  model, _, x, params, _, _, res = tiny_run
  again = jax.jit(lambda p: model.apply({'params': p}, x, rngs={'mask': jax.random.key(3)})['mask'])(params)
  np.testing.assert_array_equal(res['rng_a'], again)
  assert not np.array_equal(res['rng_a'], res['rng_c'])
  assert bool((res['rng_a'].sum(axis=1) == 12).all())
  with pytest.raises(ValueError, match="rngs={'mask'"):
    jax.eval_shape(lambda p: model.apply({'params': p}, x), params)
  with pytest.raises(ValueError, match='num_patches'):
    jax.eval_shape(lambda p: model.apply({'params': p}, x, noise=jnp.zeros((3, 5))), params)


def test_bad_mask_ratio_is_an_error():
  for ratio in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match='mask_ratio'):
      model_utils.abstract_params(_tiny(mask_ratio=ratio), 16)


def test_features_and_backbone_params_give_the_vit_encoder(tiny_run):
  """forward_features is the encoder on every patch; backbone_params load into a vit_* classifier that
  computes the same features (its learned posemb = MAE's table)."""
  model, classifier, _, _, _, backbone, res = tiny_run
  feats = res['features']
  assert feats.shape == (3, 17, 16) and model.num_features == 16
  np.testing.assert_array_equal(res['head'], feats[:, 0])
  shapes = traverse_util.flatten_dict(model_utils.abstract_params(classifier, 16), sep='/')
  flat = traverse_util.flatten_dict(backbone, sep='/')
  assert {k: tuple(v.shape) for k, v in shapes.items()} == {k: tuple(np.shape(v)) for k, v in flat.items()}
  np.testing.assert_allclose(res['classifier_features'], feats, atol=1e-5)


def _fixture(name):
  with open(os.path.join(FIXTURES, f'{name}.json')) as f:
    meta = json.load(f)
  return meta, dict(np.load(os.path.join(FIXTURES, f'{name}.npz'))), os.path.join(FIXTURES, f'{name}.safetensors')


def test_official_forward_parity():
  """The official models_mae.py state dict converts through vit_jax.convert, and the forward with the same noise
  gives the official loss (with and without norm_pix_loss), pred and mask; the fixed tables equal the official."""
  meta, ref, path = _fixture('mae')
  params = convert.timm_to_params('mae_vit_b16', convert.load_safetensors(path), model_overrides=meta['overrides'])
  assert meta['image_size'] == 16 and meta['mask_ratio'] == 0.75
  models = [registry.create_model('mae_vit_b16', num_classes=0, norm_pix_loss=npl, **meta['overrides'])
            for npl in (False, True)]
  out, out_npl = jax.jit(lambda p, x, n: [m.apply({'params': p}, x, noise=n) for m in models])(
      params, ref['input_nhwc'], ref['noise'])
  np.testing.assert_allclose(out['pred'], ref['pred'], atol=1e-5)
  np.testing.assert_array_equal(out['mask'], ref['mask'])
  np.testing.assert_allclose(out['loss'], ref['loss'], atol=1e-5)
  np.testing.assert_allclose(out_npl['loss'], ref['loss_norm_pix'], atol=1e-5)
  np.testing.assert_allclose(mae.posemb_sincos_2d_mae(4, 4, 16), ref['pos_embed'], atol=1e-7)
  np.testing.assert_allclose(mae.posemb_sincos_2d_mae(4, 4, 12), ref['decoder_pos_embed'], atol=1e-7)


def test_convert_cli_writes_the_official_layout(tmp_path):
  meta, _, path = _fixture('mae')
  out = convert.main(['convert', '--model', 'mae_vit_b16', '--src', path, '--out', str(tmp_path / 'out'),
                      '--model_overrides', json.dumps(meta['overrides'])])
  with np.load(out, allow_pickle=False) as data:
    keys = set(data.files)
  assert {'cls', 'mask_token', 'embedding/kernel', 'decoder_pred/kernel', 'Decoder/encoder_norm/scale',
          'Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel'} <= keys
  assert not any('pos' in k for k in keys)  # The fixed tables are recomputed, not stored.
  assert convert.conversion_table('mae', 'mae') is convert.conversion_table('mae', 'timm')


def test_layer_decay_grouping():
  """Layer 0: patch embedding and class token; blocks 1..L; everything after (final norm, decoder) L + 1."""
  from vit_jax import param_groups  # pylint: disable=g-import-not-at-top
  names = param_groups.all_names(model_utils.abstract_params(_tiny(), 16))
  ids, depth = param_groups.layer_ids(names, family='mae')
  assert depth == 2
  assert ids['embedding/kernel'] == ids['cls'] == 0
  assert ids['Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel'] == 2
  assert ids['Transformer/encoder_norm/scale'] == ids['Decoder/decoderblock_0/LayerNorm_0/scale'] == 3
  assert ids['mask_token'] == ids['decoder_pred/kernel'] == 3
  assert param_groups.layer_ids(names) == (ids, depth)  # The names alone find the same numbering.
