"""The benchmark's JSON contract, its MFU arithmetic, device prefetch, and that the real loop compiles its step once."""
import collections
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import benchmark, sharding, train
from tests import xla_env
from tests.test_train import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cli_last_line_is_json(tmp_path):
  env = {**os.environ, 'PYTHONPATH': f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}',
         'XLA_FLAGS': xla_env.xla_flags(device_count=2)}
  cmd = [sys.executable, '-m', 'vit_jax.benchmark', '--model', 'vit_pico', '--batch_size', '4', '--image_size', '8',
         '--mode', 'train', '--steps', '2', '--warmup', '1']
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
  result = json.loads(out.strip().splitlines()[-1])
  for key in ('model', 'mode', 'batch_size', 'image_size', 'dtype', 'img_per_s', 'step_ms_median',
              'gflops_per_img', 'mfu'):
    assert key in result, key
  assert (result['model'], result['mode'], result['batch_size'], result['num_devices']) == ('vit_pico', 'train', 4, 2)
  assert result['mfu'] is None  # CPU: no peak known.
  assert result['img_per_s'] == pytest.approx(4 / (result['step_ms_median'] / 1e3), rel=1e-3)
  # vit_pico at 8 px: 16 patches + cls, width 64, 4 layers, mlp 128, 1000 classes; training = 3 x 2 x MACs.
  n, d = 17, 64
  macs = 16 * 4 * 3 * d + 4 * (4 * n * d * d + 2 * n * d * 128 + 2 * n * n * d) + d * 1000
  assert result['gflops_per_img'] == pytest.approx(6 * macs / 1e9, abs=1e-4)
  assert result['compiled_memory_bytes'] > 0


@pytest.mark.slow
def test_gpu_script_path_needs_no_training_stack(tmp_path):
  """gpu_vit.sh runs on an image with jax, flax and optax but no TensorFlow, tfds, clu or ml_collections: the
  benchmark CLI and the profiler run with those imports blocked."""
  code = (
      'import sys, json\n'
      'for m in ("tensorflow", "tensorflow_datasets", "clu", "ml_collections"):\n'
      '  sys.modules[m] = None\n'
      'from vit_jax import benchmark\n'
      'from experiments.benchmarks import profile_cpu\n'
      'args = ["--model", "vit_pico", "--batch_size", "8", "--image_size", "8", "--dtype", "bfloat16"]\n'
      'r = benchmark.main(args + ["--mode", "train", "--steps", "1", "--warmup", "1", "--attention_impl", "xla"])\n'
      f'p = profile_cpu.main(args + ["--steps", "1", "--trace_dir", {str(tmp_path)!r}])\n'
      'print(json.dumps(dict(img_per_s=r["img_per_s"], shares=sum(c["share"] for c in p["categories"]),\n'
      '                      cats=[c["name"] for c in p["categories"]])))\n')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['img_per_s'] > 0 and result['shares'] == pytest.approx(1.0)
  assert any(c.startswith('matmul/conv') for c in result['cats']), result['cats']


def test_bf16_infer_step_and_mfu_with_given_peak():
  result = benchmark.benchmark_step(model_name='vit_pico', batch_size=8, image_size=8, dtype='bfloat16',
                                    mode='infer', steps=2, warmup=1, peak=1e-3, attention_impl='xla')
  assert result['dtype'] == 'bfloat16' and result['attention_impl'] == 'xla'
  expected = result['gflops_per_img'] * 1e9 * 8 / (result['step_ms_median'] / 1e3) / (1e-3 * 1e12 * 8)
  assert result['mfu'] == pytest.approx(expected, rel=1e-2)


def test_peak_table():
  fake = collections.namedtuple('Device', 'device_kind')
  assert benchmark.peak_tflops(fake('NVIDIA H100 80GB HBM3'), 'bfloat16') == 989.0
  assert benchmark.peak_tflops(fake('NVIDIA H100 PCIe'), 'bfloat16') == 756.0
  assert benchmark.peak_tflops(fake('TPU v5 lite'), 'bfloat16') == 197.0
  assert benchmark.peak_tflops(fake('NVIDIA H200'), 'bfloat16') == 989.0
  assert benchmark.peak_tflops(fake('cpu'), 'float32') is None
  assert benchmark.mfu(1e15, 1.0, 1000.0, 2) == 0.5


def test_prefetch_to_device_keeps_order_and_shards():
  mesh = sharding.create_mesh(tiny_config('/unused').mesh)
  local = [{'x': np.full((8, 2), i, np.float32)} for i in range(5)]
  out = list(sharding.prefetch_to_device(iter(local), mesh, size=2))
  assert [int(b['x'][0, 0]) for b in out] == list(range(5))
  assert out[0]['x'].sharding == sharding.batch_sharding(mesh)


@pytest.mark.slow
def test_loop_compiles_train_and_eval_step_once(digits_data_dir, tmp_path):
  """Fixed shapes: over a real run with two evals (the last eval batch padded), each step compiles exactly once."""
  compiled = collections.Counter()

  def listener(event, duration, **kwargs):
    del duration
    if event == '/jax/core/compile/backend_compile_duration':
      compiled[kwargs.get('fun_name')] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    config = tiny_config(digits_data_dir, total_steps=6, log_every=2, eval_every=3, checkpoint_every=6,
                         batch_size=64)
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiled['jit(train_step)'] == 1, compiled
  assert compiled['jit(eval_step)'] == 1, compiled


@pytest.mark.slow  # A registry-size conv model's two compiles: ~30 s on the 2-core CPU.
def test_build_step_runs_a_batchnorm_family_in_both_modes():
  """Conv families keep BatchNorm statistics outside 'params': inference reads them, training updates them."""
  for mode in ('infer', 'train'):
    run, _, _ = benchmark.build_step(model_name='mobilevit_xxs', batch_size=2, image_size=64, mode=mode,
                                     num_classes=10, devices=jax.local_devices()[:1])
    out = run()
    leaves = jax.tree.leaves(out)
    assert leaves and all(np.isfinite(np.asarray(x, np.float32)).all() for x in leaves)
