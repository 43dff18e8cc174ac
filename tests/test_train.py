"""End to end: a short run, resume, data parallelism equal to one device, and bad-input errors."""
import functools
import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vit_jax import checkpoint, input_pipeline, optim, sharding, train
from vit_jax.config_schema import base_config

from tests import xla_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tiny_config(data_dir, **overrides):
  """The default digits job, shrunk to seconds: a 1-layer width-32 ViT for 20 steps."""
  sys.path.insert(0, str(ROOT))
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.dataset.data_dir = data_dir
  config.model.hidden_size = 32
  config.model.mlp_dim = 64
  config.model.num_layers = 1
  config.batch_size = 32
  config.total_steps = 20
  config.log_every = 5
  config.eval_every = 10
  config.checkpoint_every = 10
  config.optimizer.warmup_steps = 5
  for key, value in overrides.items():
    section = config
    *parents, leaf = key.split('.')
    for p in parents:
      section = section[p]
    section[leaf] = value
  return config


def test_short_run_writes_workdir(digits_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  final = train.train_and_evaluate(tiny_config(digits_data_dir), str(workdir))
  on_disk = json.loads((workdir / 'final_metrics.json').read_text())
  assert on_disk == final
  for key in ('step', 'train_loss', 'train_accuracy', 'eval_loss', 'eval_accuracy', 'eval_top5_accuracy'):
    assert key in final, key
  assert final['step'] == 20 and final['resumed_from_step'] == 0
  assert all(np.isfinite(v) for v in final.values())
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [10, 20]
  assert list(workdir.glob('events.out.tfevents.*')), 'TensorBoard events missing'
  assert (workdir / 'config.json').exists()
  # At each eval (steps 10 and 20) TensorBoard gets the attention rollout of the first eval image as a PNG.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tests.test_attention_image import event_summaries  # pylint: disable=g-import-not-at-top
  images = event_summaries(workdir)['attention_rollout']
  assert [step for step, _ in images] == [10, 20]
  png = tf.make_ndarray(images[-1][1].tensor)[2]  # tf.summary.image stores (width, height, PNG bytes).
  assert tuple(tf.io.decode_png(png).shape) == (16, 16, 3)


def test_data_parallel_loss_matches_single_device(digits_data_dir):
  """The default config's loss after 10 steps is the same on 8 devices as on 1 (float32 tolerance)."""
  sys.path.insert(0, str(ROOT))
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.dataset.data_dir = digits_data_dir
  info = input_pipeline.get_dataset_info(config.dataset)
  batches = input_pipeline.create_train_iterator(config.dataset, global_batch_size=config.batch_size, seed=0)
  batches = [next(batches) for _ in range(10)]

  def losses_on(devices):
    mesh = sharding.create_mesh(config.mesh, devices=devices)
    model = train.build_model(config, info.num_classes)
    tx, schedule = optim.create_optimizer(config.optimizer, config.total_steps)
    state, shardings = train.create_train_state(model, tx, image_size=config.dataset.image_size,
                                                seed=config.seed, mesh=mesh)
    step = jax.jit(functools.partial(train.train_step, dropout_key=jax.random.key(1), schedule=schedule),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)))
    out = []
    for batch in batches:
      state, m = step(state, sharding.shard_batch(batch, mesh))
      out.append(float(m.compute()['loss']))
    return np.array(out)

  one, eight = losses_on(jax.devices()[:1]), losses_on(jax.devices())
  assert len(jax.devices()) == 8
  np.testing.assert_allclose(eight, one, rtol=2e-5, atol=1e-6)
  assert one[-1] < one[0]


@pytest.mark.parametrize('overrides,error,match', [
    ({'model.name': 'vit_b15'}, ValueError, r"Unknown model 'vit_b15'.*vit_b16"),
    ({'dataset.name': 'no_such_dataset'}, Exception, 'no_such_dataset'),
    ({'batch_size': 12}, ValueError, 'batch_size=12'),
    ({'dataset.image_size': 9}, ValueError, 'divisible'),
])
def test_bad_input_names_the_problem(digits_data_dir, tmp_path, overrides, error, match):
  with pytest.raises(error, match=match):
    train.train_and_evaluate(tiny_config(digits_data_dir, **overrides), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists(), 'a config that fails must not claim the workdir'


def test_other_config_never_overwrites_workdir(digits_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  train.train_and_evaluate(tiny_config(digits_data_dir, total_steps=10), str(workdir))
  snapshot = {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  with pytest.raises(checkpoint.WorkdirConflictError, match='total_steps: 10 -> 20'):
    train.train_and_evaluate(tiny_config(digits_data_dir, total_steps=20), str(workdir))
  assert {p: p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == snapshot


def _main_cmd(workdir, data_dir, *flags):
  return [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
          f'--config.dataset.data_dir={data_dir}', *flags]


def test_cli_model_override_and_unknown_keys(tmp_path, digits_data_dir):
  proc = subprocess.run(_main_cmd(tmp_path / 'w', digits_data_dir, '--config.model.num_layerz=1'),
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode != 0 and "no option(s) ['num_layerz']" in proc.stderr
  assert not (tmp_path / 'w').exists()


def test_cli_rejects_unknown_override(tmp_path, digits_data_dir):
  proc = subprocess.run(_main_cmd(tmp_path / 'w', digits_data_dir, '--config.optimizer.lrr=0.1'),
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode != 0
  assert 'Unknown config key(s): optimizer.lrr' in proc.stderr
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_cli_killed_run_resumes(tmp_path, digits_data_dir):
  """kill -9 mid-run, rerun the same command: it resumes from its last checkpoint and finishes."""
  workdir = tmp_path / 'w'
  cmd = _main_cmd(workdir, digits_data_dir, '--config.total_steps=400', '--config.checkpoint_every=40',
                  '--config.eval_every=0', '--config.model.num_layers=1')
  env = xla_env.subprocess_env()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 240
  ckpts = workdir / 'checkpoints'
  while time.time() < deadline and proc.poll() is None:
    if ckpts.exists() and any(p.name.isdigit() and int(p.name) >= 80 for p in ckpts.iterdir()):
      break
    time.sleep(0.2)
  assert proc.poll() is None, 'run ended before it could be killed: ' + proc.stderr.read().decode()[-2000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (workdir / 'final_metrics.json').exists()
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 400
  assert final['resumed_from_step'] >= 40


def test_init_from_official_npz(digits_data_dir, tmp_path):
  """Fine-tuning start: weights from an official-format .npz with another class count; the head is re-initialised."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from vit_jax import models, pretrained  # pylint: disable=g-import-not-at-top
  config = tiny_config(digits_data_dir, total_steps=1, log_every=1, eval_every=0, checkpoint_every=1)
  config.optimizer.lr = 1e-9
  config.optimizer.warmup_steps = 0
  overrides = {k: v for k, v in config.model.items() if k != 'name'}
  source = models.create_model(config.model.name, num_classes=3, **overrides)
  params = source.init(jax.random.key(42), np.zeros((1, 16, 16, 3), np.float32))['params']
  npz = tmp_path / 'pretrained.npz'
  pretrained.save_npz_official(params, str(npz))
  config.init_from = str(npz)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, str(workdir))
  restored = ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / '1' / 'default')['params']
  np.testing.assert_allclose(restored['embedding']['kernel'], params['embedding']['kernel'], atol=1e-6)
  assert restored['head']['kernel'].shape[-1] == 10  # digits has 10 classes; the 3-class head was dropped.
