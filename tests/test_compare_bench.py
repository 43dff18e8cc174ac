"""experiments/benchmarks/compare.py: the load gate, argument checks and README table, and a run without torch."""
import json
import sys

import pytest

from experiments.benchmarks import compare
from vit_jax import models


def test_load_gate_refuses_or_marks():
  assert compare.load_note(2.9, cores=2) is None  # 1.45 per core: below the 1.5 limit.
  assert compare.load_note(3.1, cores=2) == 'LOADED (load 3.1)'
  assert compare.check_load(0.4, 2, allow_load=False) is None
  with pytest.raises(RuntimeError, match='--allow_load'):
    compare.check_load(12.0, 2, allow_load=False)
  assert compare.check_load(12.0, 2, allow_load=True) == 'LOADED (load 12.0)'


def _validate(**overrides):
  args = dict(model_names=['vit_s16'], modes=['infer'], batches=[8], dtype='float32', xla_flags='',
              timm_variants=['eager'], known_models=models.list_models())
  compare.validate_args(**{**args, **overrides})


@pytest.mark.parametrize('overrides, message', [
    (dict(model_names=['vit_nope']), 'not registered'),
    (dict(model_names=[]), 'empty'),
    (dict(modes=['eval']), '--modes'),
    (dict(batches=[8, 0]), '--batches'),
    (dict(dtype='float16'), '--dtype'),
    (dict(timm_variants=['jit']), '--timm'),
    (dict(xla_flags='--xla_a=1 xla_b=2'), "xla_b=2"),
])
def test_bad_arguments_name_the_flag(overrides, message):
  with pytest.raises(ValueError, match=message):
    _validate(**overrides)


def test_good_arguments_pass():
  _validate(model_names=['vit_s16', 'swin_t'], modes=['infer', 'train'], batches=[8, 1], dtype='bfloat16',
            xla_flags='--xla_cpu_use_thunk_runtime=false  --xla_cpu_enable_fast_math=true', timm_variants=[])


def test_cli_rejects_bad_values_before_measuring(capsys):
  for argv in (['--batches', '8,x'], ['--modes', 'infer,eval'], ['--dtype', 'half']):
    with pytest.raises(SystemExit, match='compare: --'):
      compare.main(argv + ['--allow_load'])


def test_xla_flags_after_backend_start_are_refused(monkeypatch):
  import jax  # The test session has started JAX's CPU backend (conftest).
  jax.devices()
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  assert compare.apply_xla_flags('') == '--xla_force_host_platform_device_count=8'
  with pytest.raises(RuntimeError, match='ignored'):
    compare.apply_xla_flags('--xla_cpu_enable_fast_math=true')


def test_markdown_table_rows_ratios_and_load_marks():
  rows = [dict(model='vit_s16', mode='infer', batch_size=8, img_per_s_ours=12.0, img_per_s_timm_eager=20.0,
               img_per_s_timm_compiled=24.0, load=None),
          dict(model='swin_t', mode='train', batch_size=1, img_per_s_ours=3.0, load='LOADED (load 4.2)')]
  lines = compare.markdown_table(rows, ['float32, 224 px']).splitlines()
  assert lines[0] == 'float32, 224 px' and lines[1] == ''
  assert lines[2].startswith('| model | mode | batch | ours img/s | timm eager img/s | timm compiled img/s |')
  assert lines[4] == '| vit_s16 | infer | 8 | 12.0 | 20.0 | 24.0 | 0.60x | 0.50x | idle |'
  assert lines[5] == '| swin_t | train | 1 | 3.0 | - | - | - | - | LOADED (load 4.2) |'


def test_runs_ours_only_without_torch(tmp_path, monkeypatch):
  for module in ('torch', 'timm'):
    monkeypatch.setitem(sys.modules, module, None)  # `import torch` raises ImportError, as on CI.
  table, out = tmp_path / 'table.md', tmp_path / 'result.json'
  # vit_pico (no timm counterpart) keeps the test fast; torch is skipped before any model is built. The batch is
  # split over the test session's 8 CPU devices.
  result = compare.main(['--models', 'vit_pico', '--modes', 'infer', '--batches', '8', '--image_size', '8',
                         '--rounds', '2', '--steps_per_round', '1', '--num_classes', '10', '--allow_load',
                         '--table', str(table), '--json', str(out)])
  (row,) = result['rows']
  assert (row['model'], row['mode'], row['batch_size']) == ('vit_pico', 'infer', 8)
  assert row['img_per_s_ours'] == pytest.approx(8e3 / row['ms_ours'], rel=1e-2)
  assert not any(k.startswith('img_per_s_timm') for k in row) and result['torch_threads'] is None
  assert 'no timm' in result['environment']
  assert json.loads(out.read_text()) == json.loads(json.dumps(result))
  last_row = table.read_text().splitlines()[-1]
  assert last_row.startswith(f"| vit_pico | infer | 8 | {row['img_per_s_ours']:.1f} | - | - |")
  assert (result['load'] is None) == (row['load'] is None)


def test_profile_parses_hlo_and_categorises_ops():
  import jax
  import jax.numpy as jnp

  from experiments.benchmarks import profile_cpu

  def block(x, w):
    h = jax.nn.gelu(x @ w, approximate=False)
    h = jax.nn.softmax(h, axis=-1)
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return ((h - mean) * jax.lax.rsqrt(var + 1e-6)).T
  x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
  hlo = profile_cpu.parse_hlo(jax.jit(block).lower(x, w).compile().as_text())
  categories = {profile_cpu.categorise(name, info) for name, info in hlo.items()}
  assert any(c.startswith('matmul/conv') for c in categories), categories
  assert 'softmax (exp)' in categories, categories
  assert profile_cpu.categorise('ThunkX', None) == 'other (not an HLO instruction)'
  info = lambda *ops, target='': dict(opcode=ops[0], opcodes=set(ops), target=target, shape='f32[2]', scope='')
  assert profile_cpu.categorise('fusion.1', info('fusion', 'transpose', 'parameter')) == 'layout (transpose/copy)'
  assert profile_cpu.categorise('fusion.2', info('fusion', 'erf', 'multiply')) == 'GELU (erf/tanh)'
  assert profile_cpu.categorise('ynn_fusion.3', info('fusion', 'dot', 'exponential', 'reduce', 'divide')) == (
      'attention: dot + softmax fused (YNNPACK)')
  assert profile_cpu.categorise('cc', info('custom-call', target='__onednn$matmul')) == 'matmul/conv (oneDNN)'
  times = {'fusion.1': 3.0, 'fusion.2': 1.0}
  hlo = {'fusion.1': dict(info('fusion', 'transpose'), scope='jit(f)/M/encoderblock_3/Attn/transpose'),
         'fusion.2': dict(info('fusion', 'erf'), scope='jit(f)/M/encoderblock_7/Mlp/gelu')}
  out = profile_cpu.breakdown(times, hlo, steps=2)
  assert [(o['name'], o['share'], o['ms_per_step']) for o in out['ops']] == [('fusion.1', 0.75, 1500.0),
                                                                              ('fusion.2', 0.25, 500.0)]
  assert out['sources'][0]['name'] == 'encoderblock_*/Attn/transpose [layout (transpose/copy)]'
