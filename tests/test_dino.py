"""DINO: the head and its counts, position-table interpolation, the loss, the centre and the schedules.

References: REFERENCE.md section 6 (counts, the bicubic ramp), a numpy transcription of the definitions below,
and tests/parity/fixtures/dino.npz written by tests/parity/make_dino_fixtures.py from torch (the official
DINOLoss / DINOHead / interpolate_pos_encoding restated with torch ops).
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.model_utils import abstract_params, count, random_params
from vit_jax.models import dino
from vit_jax.models import registry
from vit_jax.tasks import dino as dino_task

FIXTURE = os.path.join(os.path.dirname(__file__), 'parity', 'fixtures', 'dino.npz')
TINY = dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, out_dim=32, head_hidden_dim=24,
            head_bottleneck_dim=8)


@pytest.fixture(scope='module')
def ref():
  return dict(np.load(FIXTURE, allow_pickle=False))


# ----------------------------------------------------------------------------------------------- the model

@pytest.mark.parametrize('name,backbone,mlp', [('dino_vit_s16', 21_665_664, 5_509_376),
                                               ('dino_vit_b16', 85_798_656, 6_295_808)])
def test_head_and_backbone_counts_equal_official(name, backbone, mlp):
  params = abstract_params(registry.create_model(name, num_classes=0), 224)
  head = params.pop('dino_head')
  assert count(params) == backbone
  assert count(head) == mlp + 16_777_216 == dino.head_param_count(backbone and (384 if 's16' in name else 768))
  assert set(head['last_layer']) == {'kernel'}  # weight_g frozen at 1: not a parameter.
  free_g = registry.create_model(name, num_classes=0, norm_last_layer=False)
  assert count(abstract_params(free_g, 224)['dino_head']) == mlp + 16_777_216 + 65_536


def test_bicubic_ramp_matches_reference():
  ramp = np.arange(14.0) ** 2
  out = np.asarray(dino.bicubic_matrix(14, 6.1 / 14) @ ramp)
  np.testing.assert_allclose(out, [0.332, 8.512, 27.866, 56.496, 95.628, 148.197], atol=5e-4)


def test_torch_bicubic_resize_matches_torch(ref):
  np.testing.assert_allclose(dino.bicubic_matrix(14, 6.1 / 14) @ np.arange(14.0) ** 2, ref['ramp_14_to_6'],
                             rtol=1e-5)
  grid = np.transpose(ref['grid_in'][0], (1, 2, 0))  # (14, 14, 3)
  out = dino.torch_bicubic_resize(jnp.asarray(grid), (4.1 / 14, 7.1 / 14))
  np.testing.assert_allclose(np.asarray(out), np.transpose(ref['grid_4x7'][0], (1, 2, 0)), atol=1e-5)


def test_interpolate_posemb_matches_dino(ref):
  table = jnp.asarray(ref['pos_table'])
  np.testing.assert_allclose(np.asarray(dino.interpolate_posemb(table, True, (6, 6))), ref['pos_6x6'], atol=1e-5)
  assert dino.interpolate_posemb(table, True, (14, 14)) is table
  with pytest.raises(ValueError, match='not a square grid'):
    dino.interpolate_posemb(table[:, :-1], True, (6, 6))


def test_head_matches_torch(ref):
  head = dino.DINOHead(out_dim=10, hidden_dim=12, bottleneck_dim=6)
  params = {f'Dense_{j}': {'kernel': ref[f'head_mlp{i}_weight'].T, 'bias': ref[f'head_mlp{i}_bias']}
            for j, i in enumerate((0, 2, 4))}
  params['last_layer'] = {'kernel': ref['head_weight_v'].T}
  out = head.apply({'params': params}, jnp.asarray(ref['head_x']))
  np.testing.assert_allclose(np.asarray(out), ref['head_y'], atol=1e-5)


@pytest.mark.slow  # ~40 s on the shared 2-core CPU (one jitted program, three applies).
def test_multicrop_forward_groups_crops_by_size():
  """forward_crops runs the 16 px global and 8 px local crops by size; each crop's rows equal it on its own."""
  model = dino.DinoVisionTransformer(num_classes=0, **dict(TINY, num_layers=1))
  params = random_params(model, 16)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 16)
  glob = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  local = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))

  @jax.jit
  def run(params):
    variables = {'params': params}
    return (model.apply(variables, [glob, glob[::-1], local], method=model.forward_crops),
            model.apply(variables, glob[::-1]), model.apply(variables, local))
  together, alone_global, alone_local = run(params)
  assert together.shape == (3, 2, 32)
  np.testing.assert_allclose(np.asarray(together[1]), np.asarray(alone_global), atol=1e-5)
  np.testing.assert_allclose(np.asarray(together[2]), np.asarray(alone_local), atol=1e-5)


def test_dino_model_rejects_non_token_classifier():
  with pytest.raises(ValueError, match="classifier must be 'token'"):
    dino.DinoVisionTransformer(num_classes=0, classifier='gap', **TINY).init(jax.random.key(0),
                                                                              jnp.zeros((1, 16, 16, 3)))


# ------------------------------------------------------------------------------------------------ the loss

def _loss_numpy(student, teacher, center, student_temp, teacher_temp, momentum):
  """The definition: mean over pairs (i, v != i) of mean_b CE(softmax((t_i - c)/Tt), log_softmax(s_v/Ts))."""
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  total, terms = 0.0, 0
  for i in range(2):
    q = np.exp(log_softmax((teacher[i] - center.reshape(1, -1)) / teacher_temp))
    for v in range(student.shape[0]):
      if v != i:
        total += np.mean(np.sum(-q * log_softmax(student[v] / student_temp), axis=-1))
        terms += 1
  new_center = momentum * center + (1 - momentum) * teacher.reshape(-1, teacher.shape[-1]).mean(0).reshape(
      center.shape)
  return total / terms, new_center


@pytest.mark.parametrize('center_shape', [(16,), (1, 16)])
def test_loss_matches_definition(center_shape):
  rng = np.random.default_rng(0)
  student, teacher = rng.normal(size=(6, 3, 16)) * 2, rng.normal(size=(2, 3, 16)) * 2
  center = rng.normal(size=center_shape)
  loss, new_center = dino_task.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(center),
                                         student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
  want_loss, want_center = _loss_numpy(student, teacher, center, 0.1, 0.04, 0.9)
  np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
  assert new_center.shape == center_shape
  np.testing.assert_allclose(np.asarray(new_center), want_center, rtol=1e-5, atol=1e-6)


def test_loss_matches_official_dinoloss(ref):
  batch = 4
  student = ref['loss_student'].reshape(-1, batch, ref['loss_student'].shape[-1])
  teacher = ref['loss_teacher'].reshape(2, batch, -1)
  loss, center = dino_task.dino_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(ref['loss_center_in']),
                                     student_temp=0.1, teacher_temp=0.05, center_momentum=0.9)
  np.testing.assert_allclose(float(loss), float(ref['loss_value']), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(center), ref['loss_center_out'], atol=1e-6)


def test_loss_gradient_reaches_student_only():
  rng = np.random.default_rng(1)
  student, teacher = jnp.asarray(rng.normal(size=(4, 2, 8))), jnp.asarray(rng.normal(size=(2, 2, 8)))
  grad_fn = jax.grad(lambda s, t: dino_task.dino_loss(s, t, jnp.zeros(8), student_temp=0.1, teacher_temp=0.04,
                                                      center_momentum=0.9)[0], argnums=(0, 1))
  g_student, g_teacher = grad_fn(student, teacher)
  assert float(jnp.abs(g_student).sum()) > 0 and float(jnp.abs(g_teacher).sum()) == 0


def test_loss_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r'\(2, B, K\)'):
    dino_task.dino_loss(jnp.zeros((4, 2, 8)), jnp.zeros((3, 2, 8)), jnp.zeros(8), student_temp=0.1,
                        teacher_temp=0.04, center_momentum=0.9)
  with pytest.raises(ValueError, match='center'):
    dino_task.dino_loss(jnp.zeros((4, 2, 8)), jnp.zeros((2, 2, 8)), jnp.zeros(7), student_temp=0.1,
                        teacher_temp=0.04, center_momentum=0.9)


# ------------------------------------------------------------------------------------------- the schedules

def _cosine_scheduler(base, final, total, warmup=0, start=0.0):
  """utils.cosine_scheduler's definition, in numpy, over every step."""
  warm = np.linspace(start, base, warmup) if warmup else np.array([])
  iters = np.arange(total - warmup)
  return np.concatenate([warm, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


@pytest.mark.parametrize('base,final,total,warmup', [(0.996, 1.0, 50, 0), (0.04, 0.4, 37, 0),
                                                     (5e-4, 1e-6, 40, 10), (1.0, 0.0, 12, 1)])
def test_cosine_schedule_matches_dino(base, final, total, warmup):
  steps = jnp.arange(total)
  got = jax.vmap(lambda s: dino_task.cosine_schedule(s, base=base, final=final, total_steps=total,
                                                     warmup_steps=warmup))(steps)
  np.testing.assert_allclose(np.asarray(got), _cosine_scheduler(base, final, total, warmup), rtol=1e-6, atol=1e-7)


def test_teacher_temperature_warmup_per_epoch():
  per_epoch, warm, epochs = 3, 4, 6
  want = np.concatenate([np.linspace(0.04, 0.07, warm), np.full(epochs - warm, 0.07)])
  got = [float(dino_task.teacher_temperature(s, steps_per_epoch=per_epoch, warmup_temp=0.04, temp=0.07,
                                             warmup_epochs=warm)) for s in range(per_epoch * epochs)]
  np.testing.assert_allclose(got, np.repeat(want, per_epoch), rtol=1e-6)
  assert float(dino_task.teacher_temperature(100, steps_per_epoch=3, warmup_temp=0.04, temp=0.07,
                                             warmup_epochs=0)) == pytest.approx(0.07)


def test_weight_decay_follows_the_cosine_per_step():
  """optimizer.weight_decay_end: update = -lr * wd(t) * p for a zero gradient, with DINO's cosine wd(t)."""
  from vit_jax import optim
  from vit_jax.config_schema import base_config
  opt = base_config().optimizer
  opt.update(name='sgd', b1=0.0, lr=1.0, schedule='constant', warmup_steps=0, grad_clip_norm=0.0,
             weight_decay=0.04, weight_decay_end=0.4)
  total = 6
  tx, _ = optim.create_optimizer(opt, total_steps=total)
  params = {'kernel': jnp.ones((2,)), 'bias': jnp.ones((2,))}
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  want = _cosine_scheduler(0.04, 0.4, total)
  for step in range(total):
    updates, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(np.asarray(updates['kernel']), -want[step], rtol=1e-6)
    assert float(jnp.abs(updates['bias']).max()) == 0.0  # No decay on biases.


# ------------------------------------------------------------------------------------- official checkpoints

_OFFICIAL_TINY = dict(patch_size=4, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, out_dim=32,
                      head_hidden_dim=24, head_bottleneck_dim=8)


def test_official_layout_converts_and_matches_torch_on_global_and_local_crops(ref):
  """The official MultiCropWrapper state dict (backbone.* + head.*) converts; a 16 px global and an 8 px local crop
  (posemb interpolated as DINO) give torch's outputs."""
  from vit_jax import convert
  sd = convert.load_safetensors(FIXTURE.replace('.npz', '.safetensors'))
  params = convert.timm_to_params('dino_vit_s16', sd, layout='dino', model_overrides=_OFFICIAL_TINY)
  assert set(params['dino_head']['last_layer']) == {'kernel'}
  model = registry.create_model('dino_vit_s16', num_classes=0, **_OFFICIAL_TINY)

  @jax.jit
  def run(params, glob, local):
    return model.apply({'params': params}, glob), model.apply({'params': params}, local)
  out_global, out_local = run(params, ref['model_global_in'], ref['model_local_in'])
  np.testing.assert_allclose(np.asarray(out_global), ref['model_global_out'], atol=1e-5)
  np.testing.assert_allclose(np.asarray(out_local), ref['model_local_out'], atol=1e-5)
  sd['head.last_layer.weight_g'] = sd['head.last_layer.weight_g'] * 2
  with pytest.raises(ValueError, match='norm_last_layer=False'):
    convert.timm_to_params('dino_vit_s16', sd, layout='dino', model_overrides=_OFFICIAL_TINY)
  free_g = convert.timm_to_params('dino_vit_s16', sd, layout='dino',
                                  model_overrides=dict(_OFFICIAL_TINY, norm_last_layer=False))
  np.testing.assert_array_equal(free_g['dino_head']['last_layer']['scale'], 2.0)
