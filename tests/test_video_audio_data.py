"""Tests for the video and audio input (vit_jax/video_audio_pipeline.py), the offline moving_digits and
synthetic_sounds data, the ucf101 / speech_commands configs on tfds.testing.mock_data, and one short main job per
modality (slow)."""
import json
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import ast_speech_commands
from configs import vivit_ucf101
from vit_jax import config_schema
from vit_jax import input_pipeline
from vit_jax import input_state
from vit_jax import video_audio_pipeline as vap
from vit_jax.datasets import moving_digits
from vit_jax.datasets import synthetic_sounds

from tests import tfds_mock
from tests import xla_env

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dataset(**kw) -> ml_collections.ConfigDict:
  config = config_schema.base_config().dataset
  config.update(kw)
  return config


def test_sample_frames_stride_centre_and_loop():
  clip = tf.reshape(tf.range(16), [16, 1, 1, 1])
  frames = lambda c, start: vap.sample_frames(c, 4, 3, start).numpy().ravel().tolist()
  assert frames(clip, None) == [3, 6, 9, 12]  # Window of 10 frames, centred in 16.
  assert frames(clip, tf.constant(6)) == [6, 9, 12, 15]
  assert frames(clip[:5], None) == [2, 0, 3, 1]  # Shorter than the window: looped (0..4, 0..4, 0..4).
  seeds = [vap._random_start(clip, 4, 3, tf.constant([s, 0])).numpy() for s in range(40)]  # pylint: disable=protected-access
  assert min(seeds) == 0 and max(seeds) == 6


def test_spec_augment_masks_bands():
  audio = _dataset().audio
  audio.update(freq_masks=1, freq_mask_width=3, time_masks=2, time_mask_width=5)
  spec = tf.ones([16, 40])
  for s in range(5):
    out = vap.spec_augment(spec, audio, tf.constant([s, 1])).numpy()
    zero_rows, zero_cols = (out == 0).all(1).sum(), (out == 0).all(0).sum()
    assert zero_rows <= 3 and zero_cols <= 10
    assert ((out == 0) == ((out == 0).all(1)[:, None] | (out == 0).all(0)[None, :])).all()  # Only whole bands.
  none = audio.copy_and_resolve_references()
  none.update(freq_masks=0, time_masks=0)
  np.testing.assert_array_equal(vap.spec_augment(spec, none, tf.constant([0, 1])), spec)


def test_synthetic_chirps_differ_only_in_time():
  """A rising and a falling chirp drawn from the same state have nearly the same mean spectrum; their peak bins
  move in opposite directions over time."""
  config = _dataset(image_size=32)
  config.audio.update(frames=64, frame_length_ms=25.0, frame_step_ms=7.5)
  specs = []
  for label in (0, 1):
    wave = synthetic_sounds.synthesise(label, np.random.RandomState(7)).astype(np.float32) / 32768
    samples = vap._audio_geometry(config, synthetic_sounds.SAMPLE_RATE)[2]  # pylint: disable=protected-access
    wave = vap._fit_wave(tf.constant(wave), samples, None)  # pylint: disable=protected-access
    specs.append(vap.log_mel(wave, config, synthetic_sounds.SAMPLE_RATE).numpy())
  rising, falling = specs
  assert rising.shape == (32, 64)
  peak = lambda s: s.argmax(0)
  assert peak(rising)[:8].mean() < peak(rising)[-8:].mean() and peak(falling)[:8].mean() > peak(falling)[-8:].mean()
  np.testing.assert_allclose(np.exp(rising).mean(1), np.exp(falling).mean(1), rtol=0.6)


def test_moving_digits_label_is_the_direction():
  images8 = np.random.RandomState(0).uniform(0, 1, (8, 8, 8))
  direction = np.array([0, 1, 2, 3] * 2)
  clips = moving_digits.render(images8, direction, np.random.RandomState(1)).astype(np.float32)
  assert clips.shape == (8, moving_digits.FRAMES, 16, 16, 3)
  for clip, d in zip(clips, direction):
    weight = np.abs(clip - np.median(clip, axis=(1, 2, 3), keepdims=True)).mean(-1)  # (T, H, W)
    rows, cols = np.mgrid[:16, :16]
    centre = lambda w, axis: (w * axis).sum() / w.sum()
    moved_col = centre(weight[-1], cols) - centre(weight[0], cols)
    moved_row = centre(weight[-1], rows) - centre(weight[0], rows)
    expected = {0: (0, 1), 1: (0, -1), 2: (1, 0), 3: (-1, 0)}[d]
    assert np.sign(round(moved_row)) == expected[0] and np.sign(round(moved_col)) == expected[1], d


@pytest.fixture(scope='module')
def mock_metadata_dir(tmp_path_factory) -> str:
  """Metadata (split sizes) only, for tfds.testing.mock_data of ucf101 and speech_commands."""
  path = str(tmp_path_factory.mktemp('mock_av'))
  for name, eval_split in [('ucf101/ucf101_1_256', 'test'), ('speech_commands', 'validation')]:
    builder = tfds.builder(name, data_dir=path)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name='train', shard_lengths=[4], num_bytes=0),
        tfds.core.SplitInfo(name=eval_split, shard_lengths=[3], num_bytes=0)]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)
  return path


def test_ucf101_config_on_mock_data(mock_metadata_dir):
  config = vivit_ucf101.get_config().dataset
  config.update(image_size=32, data_dir=mock_metadata_dir)
  config.video.update(num_frames=4, frame_stride=2)
  with tfds.testing.mock_data(data_dir=mock_metadata_dir, as_data_source_fn=tfds_mock.fake_data_source):
    assert input_pipeline.get_dataset_info(config).num_classes == 101
    batch = next(input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0))
    evals = list(input_pipeline.create_eval_iterator(config, global_batch_size=2))
  assert batch['image'].shape == (2, 4, 32, 32, 3) and batch['image'].dtype == np.float32
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1 and batch['label'].dtype == np.int32
  assert [b['mask'].sum() for b in evals] == [2, 1] and evals[0]['image'].shape == (2, 4, 32, 32, 3)


def test_speech_commands_config_on_mock_data(mock_metadata_dir):
  config = ast_speech_commands.get_config().dataset
  config.update(data_dir=mock_metadata_dir)
  with tfds.testing.mock_data(data_dir=mock_metadata_dir, as_data_source_fn=tfds_mock.fake_data_source):
    assert input_pipeline.get_dataset_info(config).num_classes == 12
    batch = next(input_pipeline.create_train_iterator(config, global_batch_size=2, seed=0))
    evals = list(input_pipeline.create_eval_iterator(config, global_batch_size=2))
  assert batch['image'].shape == (2, 128, 98, 1) and np.isfinite(batch['image']).all()
  assert [b['mask'].sum() for b in evals] == [2, 1] and evals[0]['image'].shape == (2, 128, 98, 1)


def test_audio_stream_resumes_exactly_and_eval_pads_processes(mock_metadata_dir):
  """Video/audio go through input_pipeline's index-based stream: a few integers of state, bitwise resume, and
  all-masked eval batches where one process's part is shorter."""
  config = ast_speech_commands.get_config().dataset
  config.update(data_dir=mock_metadata_dir, image_size=16)
  config.audio.frames = 8
  with tfds.testing.mock_data(data_dir=mock_metadata_dir, as_data_source_fn=tfds_mock.fake_data_source):
    it = input_pipeline.create_train_iterator(config, global_batch_size=2, seed=3)
    first = [next(it) for _ in range(3)]  # 6 examples: the 4-example train split wraps into a second epoch.
    state = it.get_state()
    later = [next(it) for _ in range(2)]
    resumed = input_pipeline.create_train_iterator(config, global_batch_size=2, seed=3)
    resumed.set_state(state)
    again = [next(resumed) for _ in range(2)]
    parts = [list(input_pipeline.create_eval_iterator(config, global_batch_size=2, process_index=i,
                                                      process_count=2)) for i in range(2)]
  assert sum(len(v) for v in state.values()) <= input_state.MAX_STATE_BYTES
  for a, b in zip(later, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(first[0]['image'], first[1]['image'])
  assert [[b['mask'].sum() for b in p] for p in parts] == [[1, 1], [1, 0]]
  assert all(b['image'].shape == (1, 16, 8, 1) for p in parts for b in p)


def test_bad_video_audio_config():
  with pytest.raises(ValueError, match='train_crop'):
    vap.check_config(_dataset(modality='video', train_crop='pad_and_crop'))
  with pytest.raises(ValueError, match='frame_stride'):
    vap.check_config(_dataset(modality='video', train_crop='resize', video=dict(num_frames=4, frame_stride=0)))
  bad = _dataset(modality='audio')
  bad.audio.frames = 0
  with pytest.raises(ValueError, match='frames=0'):
    vap.check_config(bad)


@pytest.mark.slow  # Prepares the offline dataset and trains 3 steps in a subprocess: minutes on a loaded CPU.
@pytest.mark.parametrize('config,model,classes', [('vivit_digits.py', 'vivit_pico', 4),
                                                  ('ast_digits.py', 'ast_pico', 8)])
def test_main_job_trains_video_and_audio(config, model, classes, tmp_path):
  """`python -m vit_jax.main --config=configs/{vivit,ast}_digits.py` runs a few steps end to end."""
  workdir = tmp_path / 'run'
  cmd = [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/{config}', f'--workdir={workdir}',
         f'--config.dataset.data_dir={tmp_path / "data"}', '--config.total_steps=3', '--config.batch_size=8',
         '--config.log_every=1', '--config.eval_every=3', '--config.checkpoint_every=3',
         '--config.optimizer.warmup_steps=1']
  env = xla_env.subprocess_env()
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 3 and all(np.isfinite(v) for v in final.values())
  assert 0 < final['train_loss'] < 10 and 0 <= final['eval_accuracy'] <= 1
  assert f'model {model}' in proc.stderr and f'{classes} classes' in proc.stderr
