"""Predict on a trained workdir, and the console output of the run that trained it."""
import contextlib
import io
import json
import logging as py_logging
import os
import re

import numpy as np
import pytest
from absl import logging
from PIL import Image

from tests.test_train import tiny_config
from vit_jax import console, input_pipeline, labels, predict, train


@pytest.fixture(scope='module')
def trained(digits_data_dir, tmp_path_factory):
  """(workdir, config, console output) of a 4-step digits run, output captured from absl's own handler."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(digits_data_dir, total_steps=4, log_every=2, eval_every=4, checkpoint_every=2,
                       **{'optimizer.warmup_steps': 1})
  buffer = io.StringIO()
  console.configure_logging(0)
  handler = logging.get_absl_handler().python_handler
  stream = handler.stream
  handler.stream = buffer  # Where absl writes after flag parsing; before it, absl writes to sys.stderr.
  try:
    with contextlib.redirect_stderr(buffer):
      train.train_and_evaluate(config, workdir)
  finally:
    handler.stream = stream
  return workdir, config, buffer.getvalue()


@pytest.mark.slow
def test_console_shows_progress_eval_and_summary_only(trained):
  workdir, _, output = trained
  lines = output.splitlines()
  steps = [l for l in lines if re.search(r' step [24]/4  loss \d\.\d{4}  acc \d\.\d{3}  lr \S+  [\d,]+ img/s  ETA ', l)]
  assert len(steps) == 2, output
  assert sum(' eval 4/4  accuracy ' in l and '(best ' in l for l in lines) == 1, output
  assert any(' done 4 steps in ' in l and 'final eval accuracy' in l for l in lines), output
  assert any(f'checkpoints {workdir}/checkpoints' in l and 'final_metrics.json' in l for l in lines), output
  # Orbax logs ~50 INFO lines per checkpoint and clu echoes every scalar: none of it shows by default.
  assert not any(re.search(r'orbax|checkpoint_manager|Saving|Finished|train_loss=', l) for l in lines), output
  assert len(lines) <= 8, output


def test_log_filter_drops_library_info_and_keeps_warnings():
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top
  library = os.path.join(os.path.dirname(orbax.checkpoint.__file__), 'checkpoint_manager.py')
  record = lambda path, level: py_logging.LogRecord('absl', level, path, 1, 'msg', None, None)
  keep = console.OwnInfoFilter().filter
  assert not keep(record(library, py_logging.INFO))
  assert keep(record(library, py_logging.WARNING))
  assert keep(record(console.__file__, py_logging.INFO))


def test_console_lines():
  line = console.train_line(50, 800, {'train_loss': 1.23456, 'train_accuracy': 0.5, 'train_learning_rate': 1e-3},
                            images_per_sec=1234.5, eta_seconds=3725)
  assert line == 'step  50/800  loss 1.2346  acc 0.500  lr 1.00e-03  1,234 img/s  ETA 1:02:05'
  reporter = console.TrainConsole(total_steps=10, start_step=0, batch_size=4, workdir='/w', is_main=True,
                                  clock=iter([0.0, 5.0, 6.0]).__next__)
  reporter.eval(5, {'eval_accuracy': 0.5, 'eval_loss': 1.0})
  reporter.eval(10, {'eval_accuracy': 0.4, 'eval_loss': 1.1})
  assert reporter.best == (0.5, 5)
  assert console.eval_line(10, 10, {'eval_loss': 0.5, 'knn/accuracy': 0.25}, None, None) == \
      'eval 10/10  loss 0.5000  knn/accuracy 0.2500'


def _digit_pngs(data_dir, folder, n):
  """The first n eval images of digits as PNG files (lossless), and their eval-pipeline arrays."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.builder('digits', data_dir=data_dir).as_data_source(split='test')  # ArrayRecord: read by index.
  examples = source.__getitems__(list(range(n)))
  paths = []
  for i, example in enumerate(examples):
    path = folder / f'{i}.png'
    Image.fromarray(example['image'][..., 0]).save(path)
    paths.append(str(path))
  return paths


@pytest.mark.slow
def test_predict_workdir_names_json_and_corrupt_file(trained, tmp_path):
  workdir, config, _ = trained
  assert labels.read_class_names(workdir) == [str(i) for i in range(10)]  # Recorded at training time.
  folder = tmp_path / 'images'
  (folder / 'sub').mkdir(parents=True)
  paths = _digit_pngs(config.dataset.data_dir, folder / 'sub', 3)
  (folder / 'broken.png').write_bytes(b'\x89PNG not really')
  loaded = predict.load_workdir(workdir)
  files = predict.list_images([str(folder)])
  results, skipped = predict.predict_files(loaded, files, k=3, batch_size=2)
  assert [r['file'] for r in results] == paths
  assert skipped == [(str(folder / 'broken.png'), skipped[0][1])] and 'broken.png' in skipped[0][1]
  for r in results:
    assert [e['name'] for e in r['top_k']] == [str(e['label']) for e in r['top_k']]
    probs = [e['prob'] for e in r['top_k']]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
  out = tmp_path / 'out.jsonl'
  predict.write_json_lines(results, str(out))
  assert [json.loads(l) for l in out.read_text().splitlines()] == results
  # The same preprocessing as eval: the eval iterator's first images are these files'.
  batch = next(input_pipeline.create_eval_iterator(config.dataset, global_batch_size=4))
  np.testing.assert_allclose(predict.load_image(paths[1], loaded.dataset_config), batch['image'][1], atol=1e-6)


@pytest.mark.slow
def test_predict_refuses_missing_checkpoint_and_mismatched_weights(trained, tmp_path):
  from vit_jax import pretrained  # pylint: disable=g-import-not-at-top
  workdir, config, _ = trained
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'config.json').write_text((open(os.path.join(workdir, 'config.json')).read()))
  with pytest.raises(FileNotFoundError, match='has no checkpoint'):
    predict.load_workdir(str(empty))
  weights = tmp_path / 'params.npz'
  pretrained.save_npz_official(predict.load_workdir(workdir).variables['params'], str(weights))
  overrides = {k: v for k, v in config.model.items() if k != 'name'}
  with pytest.raises(ValueError, match=re.escape(str(weights))):
    predict.load_weights('vit_pico', str(weights), num_classes=7, image_size=16, model_overrides=overrides)
  loaded = predict.load_weights('vit_pico', str(weights), num_classes=10, image_size=16, model_overrides=overrides)
  assert loaded.variables['params']['head']['kernel'].shape[-1] == 10
