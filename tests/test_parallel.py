"""Scale-out strategies on 8 simulated CPU devices: every mesh trains like one device, FSDP divides the state memory,
gradient accumulation equals the large batch, remat keeps gradients, bfloat16 compute keeps float32 parameters.

Tiny widths and synthetic batches: compile time dominates on CPU.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import config_schema, models, optim, sharding, train
from vit_jax.models import layers

# 8 heads and an MLP width divisible by 8, so tensor=8 splits whole heads.
VIT = dict(name='vit_pico', hidden_size=64, num_heads=8, mlp_dim=128, num_layers=1, patch_size=4)
# One shifted + one clamped window stage, with patch merging; every stage has 8 heads.
SWIN = dict(name='swin_t', embed_dim=32, depths=(2, 1), num_heads=(8, 8), window_size=4, patch_size=2,
            drop_path_rate=0.0)
IMAGE, CLASSES = 16, 10
MESHES = {'data8': (8, 1, 1), 'fsdp8': (1, 8, 1), 'tensor8': (1, 1, 8), '2x2x2': (2, 2, 2)}


def _opt_config(**kw):
  """SGD with momentum for the equality tests: its update is linear in the gradient, so comparing parameters
  compares the sharded gradient computation itself. (Adam divides by sqrt(v): the attention key bias, whose exact
  gradient is 0 by softmax shift invariance, would move by +-lr on rounding noise alone.)"""
  cfg = config_schema.base_config().optimizer  # Every optimizer field, so new fields get their defaults.
  cfg.update(dict(name='sgd', lr=0.1, schedule='cosine', warmup_steps=0, end_lr_factor=0.0, weight_decay=0.05,
                  grad_clip_norm=1.0, b1=0.9, b2=0.999, mu_dtype=None), **kw)
  return cfg


def _model(spec, **kw):
  spec = {**spec, **kw}
  return models.create_model(spec.pop('name'), num_classes=CLASSES, **spec)


def _batches(n, batch_size, seed=0):
  rng = np.random.default_rng(seed)
  return [{'image': rng.normal(size=(batch_size, IMAGE, IMAGE, 3)).astype(np.float32),
           'label': rng.integers(0, CLASSES, size=(batch_size,)).astype(np.int32)} for _ in range(n)]


def _mesh(shape, devices=None):
  return sharding.create_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))), devices=devices)


def _train(model, mesh, batches, *, accum_steps=1, opt=None, steps_total=10):
  """Losses per step and the final params (host numpy) of `train.train_step` on `mesh`."""
  tx, schedule = optim.create_optimizer(opt or _opt_config(), steps_total)
  state, shardings = train.create_train_state(model, tx, image_size=IMAGE, seed=0, mesh=mesh)
  step_fn = functools.partial(train.train_step, dropout_key=jax.random.key(1), schedule=schedule,
                              accum_steps=accum_steps)
  step = jax.jit(sharding.with_activation_sharding(step_fn, mesh, sharding.DEFAULT_RULES),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)), donate_argnums=0)
  losses = []
  for batch in batches:
    state, m = step(state, sharding.shard_batch(batch, mesh))
    losses.append(float(m.compute()['loss']))
  return np.array(losses), jax.device_get(state.params), state


def _assert_same(got, want, what):
  """Losses within rtol 1e-5; each parameter array within 1e-5 relative (L2) error.

  Per array, not per element, and with a floor of 1e-3 per element under the norm: devices sum gradients in another
  order, and an array that is ~0 in both runs is rounding noise (the attention key bias: its exact gradient is 0 by
  softmax shift invariance, so it holds only accumulated noise of ~1e-9).
  """
  losses, params = got[:2]
  np.testing.assert_allclose(losses, want[0], rtol=1e-5, err_msg=f'{what}: losses')
  flat_got = jax.tree_util.tree_flatten_with_path(params)[0]
  worst = 0.0
  for (path, a), b in zip(flat_got, jax.tree.leaves(want[1])):
    b = np.asarray(b, np.float64)
    error = np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-3 * np.sqrt(b.size))
    assert error <= 1e-5, f'{what}: {jax.tree_util.keystr(path)} differs by {error:.2e} (relative L2)'
    worst = max(worst, error)
  return worst


@pytest.mark.slow
@pytest.mark.parametrize('spec', [VIT, SWIN], ids=['vit', 'swin'])
def test_every_mesh_trains_like_one_device(spec, capsys):
  """data=8, fsdp=8, tensor=8 and 2x2x2 give the 1-device losses and params after 3 steps (float32, rtol 1e-5)."""
  model = _model(spec)
  batches = _batches(3, 16)
  reference = _train(model, _mesh((1, 1, 1), jax.devices()[:1]), batches)
  assert np.ptp(reference[0]) > 1e-3  # The steps change the model.
  report = [f'1 device losses {np.array2string(reference[0], precision=6)}']
  for name, shape in MESHES.items():
    got = _train(model, _mesh(shape), batches)
    sample = jax.tree.leaves(got[2].params)[0]
    assert len(sample.sharding.device_set) == 8
    worst = _assert_same(got, reference, f'{spec["name"]} on {name}')
    report.append(f'{name}: max |dloss|/loss {np.max(np.abs(got[0] / reference[0] - 1)):.1e}, '
                  f'max param rel L2 {worst:.1e}')
  with capsys.disabled():
    print(f'\n[meshes] {spec["name"]}: ' + '; '.join(report))


def test_state_is_split_as_the_strategy_says():
  """FSDP splits every parameter and its Adam moments over 'fsdp'; tensor parallel splits heads and MLP hidden."""
  model = _model(VIT)
  tx, _ = optim.create_optimizer(_opt_config(name='adamw'), 10)
  mesh = _mesh((1, 8, 1))
  abstract, shardings = train.abstract_train_state(model, tx, image_size=IMAGE, mesh=mesh)
  specs = sharding.describe(shardings, abstract)
  block = "['Transformer']['encoderblock_0']"
  assert specs[f".params{block}['MlpBlock_0']['Dense_0']['kernel']"] == "(64, 128) -> P('fsdp', 'tensor')"
  assert specs[f".opt_state[1][0].mu{block}['MlpBlock_0']['Dense_0']['kernel']"] == \
      "(64, 128) -> P('fsdp', 'tensor')"
  assert specs[f".params{block}['MultiHeadDotProductAttention_0']['query']['kernel']"] == \
      "(64, 8, 8) -> P('fsdp', 'tensor', None)"
  assert specs[f".params{block}['MultiHeadDotProductAttention_0']['out']['kernel']"] == \
      "(8, 8, 64) -> P('tensor', None, 'fsdp')"
  # Every parameter but the 10-class head bias is split 8 ways.
  unsplit = [k for k, v in specs.items() if k.startswith('.params') and 'fsdp' not in v]
  assert unsplit == [".params['head']['bias']"]


def _state_bytes_per_device(model, mesh, batch_size=16):
  """Per-device bytes of the compiled step's arguments minus the batch: parameters + optimizer state."""
  tx, schedule = optim.create_optimizer(_opt_config(name='adamw', lr=1e-3), 10)
  abstract, shardings = train.abstract_train_state(model, tx, image_size=IMAGE, mesh=mesh)
  step = jax.jit(sharding.with_activation_sharding(
      functools.partial(train.train_step, dropout_key=jax.random.key(1), schedule=schedule), mesh,
      sharding.DEFAULT_RULES), in_shardings=(shardings, sharding.batch_sharding(mesh)), donate_argnums=0)
  batch = {'image': jax.ShapeDtypeStruct((batch_size, IMAGE, IMAGE, 3), jnp.float32),
           'label': jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  memory = step.lower(abstract, batch).compile().memory_analysis()
  batch_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(batch)) // sharding.batch_partitions(mesh)
  return memory.argument_size_in_bytes - batch_bytes


def test_fsdp_divides_state_memory(capsys):
  """fsdp=8: per-device params + optimizer state <= replicated / 8 + 10% (compiled memory analysis)."""
  model = _model(VIT)
  replicated = _state_bytes_per_device(model, _mesh((8, 1, 1)))
  fsdp = _state_bytes_per_device(model, _mesh((1, 8, 1)))
  with capsys.disabled():
    print(f'\n[memory] params+opt state per device: replicated {replicated} B, fsdp=8 {fsdp} B '
          f'(ratio {replicated / fsdp:.2f}x)')
  assert fsdp <= replicated / 8 * 1.1, (replicated, fsdp)


def test_accumulation_equals_large_batch():
  """accum_steps=4 over a batch of 32 gives the same update as one pass over the 32 (8 devices, fsdp=2)."""
  model = _model(VIT, drop_path_rate=0.0)
  batches = _batches(2, 32, seed=3)
  mesh = _mesh((4, 2, 1))
  whole = _train(model, mesh, batches)
  accumulated = _train(model, mesh, batches, accum_steps=4)
  _assert_same(accumulated, whole, 'accum_steps=4')


def test_accumulation_batch_must_split():
  mesh = _mesh((8, 1, 1))
  sharding.check_global_batch(64, mesh, accum_steps=4)
  with pytest.raises(ValueError, match='batch_size=48.*4 micro-batch'):
    sharding.check_global_batch(48, mesh, accum_steps=4)


@pytest.mark.parametrize('spec', [VIT, SWIN], ids=['vit', 'swin'])
def test_remat_policies_same_gradients(spec):
  x = jnp.asarray(_batches(1, 2)[0]['image'])
  base = _model(spec)
  params = base.init(jax.random.key(0), x)['params']

  def grads(model):
    return jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x, train=False) ** 2)))(params)

  want = grads(base)
  for policy in ('full', 'dots_with_no_batch_dims_saveable')[spec is SWIN:]:  # (Swin's bool remat: test_swin.py.)
    got = grads(_model(spec, remat=policy))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=policy)
  with pytest.raises(ValueError, match='Unknown remat policy'):
    _model(spec, remat='dots_sometimes').init(jax.random.key(0), x)


def test_bfloat16_compute_float32_numerics():
  """dtype=bfloat16: params and optimizer moments in float32 (mu in mu_dtype), float32 logits and softmax, and the
  loss after a few steps close to float32's."""
  batches = _batches(3, 16, seed=5)
  mesh = _mesh((1, 1, 1), jax.devices()[:1])
  adam = _opt_config(name='adamw', lr=1e-3)
  f32 = _train(_model(VIT), mesh, batches, opt=adam)
  bf16 = _train(_model(VIT, dtype=jnp.bfloat16), mesh, batches, opt=_opt_config(name='adamw', lr=1e-3,
                                                                                 mu_dtype='bfloat16'))
  state = bf16[2]
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
  adam = state.opt_state[1][0]
  assert {x.dtype for x in jax.tree.leaves(adam.mu)} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in jax.tree.leaves(adam.nu)} == {jnp.dtype(jnp.float32)}
  np.testing.assert_allclose(bf16[0], f32[0], rtol=3e-2)
  # The compute really is bfloat16: matmuls in bf16, the softmax's exp and the logits in float32.
  model = _model(VIT, dtype=jnp.bfloat16)
  x = jnp.asarray(batches[0]['image'][:2])
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({'params': p}, x))(state.params))
  assert 'bf16[2,17,64]' in jaxpr and 'exp' in jaxpr
  assert model.apply({'params': state.params}, x).dtype == jnp.float32
  exps = [line for line in jaxpr.splitlines() if ' exp ' in line or '= exp' in line]
  assert exps and all('f32' in line.split('=')[0] for line in exps), exps


def test_scan_layers_matches_unrolled_and_loads_official_npz(tmp_path):
  """scan_layers: one scanned block, params stacked on a leading layer axis; same outputs as the unrolled model,
  and an official-layout .npz loads into it."""
  from vit_jax import pretrained  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(_batches(1, 2)[0]['image'])
  unrolled = _model(VIT, num_layers=3)
  scanned = _model(VIT, num_layers=3, scan_layers=True)
  params = unrolled.init(jax.random.key(0), x)['params']
  shapes = jax.eval_shape(scanned.init, jax.random.key(0), x)['params']
  assert 'encoderblock' in shapes['Transformer'] and 'encoderblock_0' not in shapes['Transformer']
  assert shapes['Transformer']['encoderblock']['MlpBlock_0']['Dense_0']['kernel'].shape == (3, 64, 128)
  npz = tmp_path / 'official.npz'
  pretrained.save_npz_official(params, str(npz))
  loaded = pretrained.load_pretrained(str(npz), jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
  np.testing.assert_allclose(scanned.apply({'params': loaded}, x), unrolled.apply({'params': params}, x),
                             rtol=1e-5, atol=1e-6)
  # Sharded on a 2x2x2 mesh the stacked layer axis stays whole.
  tx, _ = optim.create_optimizer(_opt_config(), 10)
  abstract, shardings = train.abstract_train_state(scanned, tx, image_size=IMAGE, mesh=_mesh((2, 2, 2)))
  specs = sharding.describe(shardings, abstract)
  assert specs[".params['Transformer']['encoderblock']['MlpBlock_0']['Dense_0']['kernel']"] == \
      "(3, 64, 128) -> P(None, 'fsdp', 'tensor')"


def test_model_fields_come_from_the_config():
  from vit_jax.config_schema import base_config  # pylint: disable=g-import-not-at-top
  config = base_config()
  config.model.name = 'swin_t'
  config.dtype, config.remat = 'bfloat16', 'dots_with_no_batch_dims_saveable'
  model = train.build_model(config, 10)
  assert model.dtype == jnp.bfloat16 and model.remat == 'dots_with_no_batch_dims_saveable'
  config.scan_layers = True
  with pytest.raises(ValueError, match="no 'scan_layers' option"):
    train.build_model(config, 10)
  config = base_config()
  config.model.dtype = 'bfloat16'
  with pytest.raises(ValueError, match='Set config.dtype, not config.model.dtype'):
    train.build_model(config, 10)


def test_logical_names_only_inside_rules():
  """Outside `logical_partitioning()` `model.init` gives plain arrays (the official tree); inside, logical boxes."""
  model = _model(VIT)
  x = jnp.zeros((1, IMAGE, IMAGE, 3))
  plain = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  assert not any(isinstance(v, nn.Partitioned) for v in jax.tree.leaves(
      plain, is_leaf=lambda v: isinstance(v, nn.Partitioned)))
  with nn.logical_axis_rules(sharding.DEFAULT_RULES):  # Rules alone do not box.
    assert jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0), x)['params']) == \
        jax.tree.structure(plain)
  with layers.logical_partitioning():
    boxed = jax.eval_shape(model.init, jax.random.key(0), x)['params']
  assert boxed['head']['kernel'].names == ('embed', 'classes')
  assert jax.tree.structure(nn.meta.unbox(boxed)) == jax.tree.structure(plain)
  sw = _model(SWIN)
  with layers.logical_partitioning():
    boxed = jax.eval_shape(sw.init, jax.random.key(0), x)['params']
  attn = boxed['layers_0']['blocks_1']['attn']
  assert attn['qkv']['kernel'].names == ('embed', 'heads')
  assert attn['relative_position_bias_table'].names == (None, 'heads')
  assert boxed['layers_0']['blocks_1']['mlp']['fc1']['kernel'].names == ('embed', 'mlp')


def test_bad_sharding_rules_are_named():
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    sharding.logical_rules((('embed', 'model'),))
  with pytest.raises(ValueError, match='each rule is'):
    sharding.logical_rules((('embed',),))
  assert sharding.logical_rules(None) == sharding.DEFAULT_RULES
