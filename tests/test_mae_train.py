"""The MAE task in the one loop: config checks before compiling, a short run through `python -m vit_jax.main`,
exact resume after preemption, and init_from an MAE workdir into a ViT classifier."""
import json
import os
import signal
import subprocess
import sys

from flax import traverse_util
import jax
import ml_collections
import numpy as np
import pytest

from tests import model_utils
from tests import xla_env
from tests.test_reliability import _assert_bitwise_equal, _hook_iterator, _params, _same_metrics
from tests.test_train import ROOT
from vit_jax import config_schema, finetune, train
from vit_jax.models import registry

MODEL = dict(patch_size=4, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, decoder_hidden_size=8,
             decoder_num_layers=1, decoder_num_heads=2, decoder_mlp_dim=16)


def mae_config(data_dir=None, **overrides):
  """configs/mae_digits.py shrunk to seconds: a width-16 one-block MAE for 6 steps."""
  sys.path.insert(0, str(ROOT))
  from configs import mae_digits  # pylint: disable=g-import-not-at-top
  config = mae_digits.get_config()
  config.dataset.data_dir = data_dir
  config.model.update(MODEL)
  config.update(dict(batch_size=32, total_steps=6, log_every=3, eval_every=6, checkpoint_every=3))
  config.optimizer.warmup_steps = 2
  for key, value in overrides.items():
    section = config
    *parents, leaf = key.split('.')
    for p in parents:
      section = section[p]
    section[leaf] = value
  return config


@pytest.mark.parametrize('overrides,match', [
    ({'model.name': 'vit_pico'}, r"config.model.name='vit_pico' is not one.*mae_vit_b16"),
    ({'model.mask_ratio': 1.0}, r'config.model.mask_ratio=1.0 must be in \(0, 1\)'),
    ({'model.mask_ratio': 0.0}, r'config.model.mask_ratio=0.0 must be in \(0, 1\)'),
    ({'mixup.mixup_alpha': 0.8}, r'config.mixup.mixup_alpha=0.8 has no effect on MAE'),
    ({'label_smoothing': 0.1}, r'config.label_smoothing=0.1 has no effect on MAE'),
])
def test_bad_mae_configs_fail_before_compiling(overrides, match):
  config = mae_config(**overrides)
  if overrides.get('model.name') == 'vit_pico':  # Only the model's name: the MAE options are not ViT options.
    config.model = ml_collections.ConfigDict({'name': 'vit_pico'})
  with pytest.raises(ValueError, match=match):
    config_schema.validate_config(config)


@pytest.fixture(scope='module')
def mae_reference(digits_data_dir, tmp_path_factory):
  """An uninterrupted 6-step MAE run (checkpoints at 3 and 6): its workdir and final metrics."""
  workdir = tmp_path_factory.mktemp('mae_reference') / 'run'
  final = train.train_and_evaluate(mae_config(digits_data_dir), str(workdir))
  return workdir, final


@pytest.mark.slow
def test_mae_run_reports_reconstruction_losses(mae_reference):
  workdir, final = mae_reference
  assert final['step'] == 6 and final['num_params'] == model_utils.count(
      model_utils.abstract_params(registry.create_model('mae_vit_b16', num_classes=0, **MODEL), 16))
  for key in ('train_loss', 'eval_loss', 'train_grad_norm'):
    assert np.isfinite(final[key]), key
  assert 'eval_accuracy' not in final and 'train_accuracy' not in final
  assert json.loads((workdir / 'config.json').read_text())['task']['name'] == 'mae'


@pytest.mark.slow
def test_mae_run_resumes_exactly(digits_data_dir, mae_reference, tmp_path, monkeypatch):
  """SIGTERM at step 4: checkpoint 4; the rerun (same masks: they come from seed and step) equals the
  uninterrupted run bitwise, with the same final metrics."""
  ref_dir, ref_final = mae_reference
  workdir = tmp_path / 'run'

  def sigterm_at_4(n, batch):
    if n == 4:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  _hook_iterator(monkeypatch, sigterm_at_4)
  assert train.train_and_evaluate(mae_config(digits_data_dir), str(workdir)) == {'preempted_at_step': 4}
  monkeypatch.undo()
  final = train.train_and_evaluate(mae_config(digits_data_dir), str(workdir))
  assert final['resumed_from_step'] == 4
  assert _same_metrics(final, ref_final), (final, ref_final)
  _assert_bitwise_equal(_params(workdir, 6), _params(ref_dir, 6))


@pytest.mark.slow
def test_init_from_mae_workdir_loads_the_encoder(mae_reference):
  """init_from an MAE workdir into a ViT with MAE's fine-tuning head: the encoder's weights, the fixed sin-cos
  table as the (now learned) position embedding; fc_norm and the head start fresh."""
  from vit_jax.models import mae  # pylint: disable=g-import-not-at-top
  workdir, _ = mae_reference
  vit_options = {k: MODEL[k] for k in ('patch_size', 'hidden_size', 'num_layers', 'num_heads', 'mlp_dim')}
  model = registry.create_model('vit_b16', num_classes=10, classifier='gap_fc_norm', **vit_options)
  init = jax.tree.map(np.asarray, model_utils.random_params(model, 16))
  loaded = traverse_util.flatten_dict(finetune.load_params(str(workdir), init), sep='/')
  trained = traverse_util.flatten_dict(_params(workdir, 6), sep='/')
  fresh = traverse_util.flatten_dict(init, sep='/')
  np.testing.assert_array_equal(loaded['Transformer/posembed_input/pos_embedding'],
                                mae.posemb_sincos_2d_mae(4, 4, 16))
  for path, value in loaded.items():
    if path.startswith(('fc_norm/', 'head/')):
      np.testing.assert_array_equal(value, fresh[path])
    elif path != 'Transformer/posembed_input/pos_embedding':
      np.testing.assert_array_equal(value, trained[path])


@pytest.mark.slow
def test_cli_short_mae_run(tmp_path, digits_data_dir):
  """The task and model chosen on the command line from the default (classification) config."""
  workdir = tmp_path / 'w'
  flags = [f'--config.model.{k}={v}' for k, v in MODEL.items()]
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
         f'--config.dataset.data_dir={digits_data_dir}', '--config.task.name=mae', '--config.model.name=mae_vit_b16',
         '--config.model.drop_path_rate=0.0', '--config.batch_size=32', '--config.total_steps=4',
         '--config.log_every=2', '--config.eval_every=4', '--config.checkpoint_every=4',
         '--config.optimizer.warmup_steps=1', *flags]
  env = xla_env.subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 4 and np.isfinite(final['eval_loss']) and np.isfinite(final['train_loss'])
