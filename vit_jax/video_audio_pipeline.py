"""Video and audio input: the dataset's 'video' or 'audio' feature turned into model inputs under the key 'image'.

Selected by config.dataset.modality ('video' | 'audio'); `vit_jax.input_pipeline` hands such datasets here, and
the batches keep its contract (per-process, 'image' float32 + 'label' int32; eval batches padded with a 'mask'), so
the classification task and the train loop take them unchanged (mixup, config.mixup.*, mixes clip with clip).

Video (TFDS Video features, e.g. `ucf101`, vit_jax's `moving_digits`): uint8 (T0, H, W, 3) clips become float32
(num_frames, image_size, image_size, 3) in [-1, 1]: every `frame_stride`-th frame over a window of
(num_frames - 1) * frame_stride + 1 frames, starting at a random frame for training and centred for eval (clips
shorter than the window are looped). Frames are resized to image_size ('resize'), or, for training with
train_crop='inception', cut by one random box shared by every frame; eval resizes the short side and centre-crops
(eval_crop_fraction). `flip` flips whole clips.

Audio (TFDS Audio features, e.g. `speech_commands`, vit_jax's `synthetic_sounds`): int16 or float waveforms become
log-mel spectrograms float32 (image_size mel bins, audio.frames frames, 1), frequency as height and time as width
(the AST's layout): STFT with audio.frame_length_ms windows every audio.frame_step_ms (Hann, FFT at the next power
of two), power spectrum -> mel filterbank (tf.signal, 20 Hz to Nyquist) -> log(x + 1e-6), normalised
(x - norm_mean) / (2 norm_std) as the AST. Waveforms are zero-padded or cut (random window for training, centre
for eval) to the samples that give exactly audio.frames frames. SpecAugment (training): audio.freq_masks masks of
0..freq_mask_width mel bins and audio.time_masks of 0..time_mask_width frames, set to 0 (the normalised mean).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import input_pipeline

MODALITIES = ('video', 'audio')


def check_config(dataset_config: ml_collections.ConfigDict) -> None:
  """ValueErrors naming the field for video/audio settings that cannot work."""
  if dataset_config.modality not in MODALITIES:
    raise ValueError(f'config.dataset.modality={dataset_config.modality!r}: this pipeline takes {MODALITIES}.')
  if dataset_config.image_size < 1:
    raise ValueError(f'config.dataset.image_size must be positive, got {dataset_config.image_size}.')
  if dataset_config.modality == 'video':
    video = dataset_config.video
    if video.num_frames < 1 or video.frame_stride < 1:
      raise ValueError(f'config.dataset.video.num_frames={video.num_frames} and frame_stride={video.frame_stride} '
                       'must be positive.')
    if dataset_config.train_crop not in ('resize', 'inception'):
      raise ValueError(f"config.dataset.train_crop={dataset_config.train_crop!r}: video takes 'resize' or "
                       "'inception' (one random box for every frame).")
    return
  audio = dataset_config.audio
  if audio.frames < 1 or audio.frame_length_ms <= 0 or audio.frame_step_ms <= 0 or audio.norm_std <= 0:
    raise ValueError(f'config.dataset.audio: frames={audio.frames}, frame_length_ms={audio.frame_length_ms}, '
                     f'frame_step_ms={audio.frame_step_ms} and norm_std={audio.norm_std} must be positive.')
  if min(audio.freq_masks, audio.time_masks, audio.freq_mask_width, audio.time_mask_width) < 0:
    raise ValueError('config.dataset.audio.{freq,time}_masks and {freq,time}_mask_width must be >= 0.')


def _feature(builder: tfds.core.DatasetBuilder, modality: str) -> Any:
  """The dataset's `modality` feature; a ValueError naming the dataset's features otherwise."""
  features = builder.info.features
  if modality not in features or 'label' not in features:
    raise ValueError(f'config.dataset.modality={modality!r} reads the {modality!r} and "label" features, but '
                     f'{builder.name!r} has {sorted(features.keys())}.')
  return features[modality]


# -------------------------------------------------------------------------------------------------------- video

def sample_frames(video: tf.Tensor, num_frames: int, stride: int, start: tf.Tensor | None) -> tf.Tensor:
  """`num_frames` frames every `stride` from `video` (T0, ...): from frame `start`, or (None) the centred window;
  a clip shorter than the window is looped."""
  span = (num_frames - 1) * stride + 1
  length = tf.shape(video)[0]
  video = tf.cond(length < span, lambda: tf.tile(video, [span // length + 1, 1, 1, 1]), lambda: video)
  length = tf.shape(video)[0]
  first = (length - span) // 2 if start is None else start
  return tf.gather(video, first + tf.range(num_frames) * stride)


def _random_start(video: tf.Tensor, num_frames: int, stride: int, seed: tf.Tensor) -> tf.Tensor:
  span = (num_frames - 1) * stride + 1
  room = tf.maximum(tf.shape(video)[0] - span, 0)
  return tf.random.stateless_uniform([], seed, 0, room + 1, dtype=tf.int32)


def _video_train(frames: tf.Tensor, config: ml_collections.ConfigDict, seed: tf.Tensor) -> tf.Tensor:
  """(T, size, size, 3) float in [0, 255]: one crop box (or a plain resize) and one flip for every frame."""
  size = config.image_size
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if config.train_crop == 'inception':
    begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(frames)[1:], bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=crop_seed,
        min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(config.crop_min_area, 1.0),
        use_image_if_no_bounding_boxes=True)
    frames = frames[:, begin[0]:begin[0] + crop[0], begin[1]:begin[1] + crop[1]]
  frames = tf.clip_by_value(tf.image.resize(tf.cast(frames, tf.float32), [size, size]), 0.0, 255.0)
  if config.flip:
    flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    frames = tf.cond(flip, lambda: frames[:, :, ::-1], lambda: frames)
  return frames


def _video_eval(frames: tf.Tensor, config: ml_collections.ConfigDict) -> tf.Tensor:
  """(T, size, size, 3) float in [0, 255]: short side to size / eval_crop_fraction, centre crop."""
  size, fraction = config.image_size, config.eval_crop_fraction
  shape = tf.cast(tf.shape(frames)[1:3], tf.float32)
  new_hw = tf.maximum(tf.cast(tf.round(shape * (size / fraction) / tf.reduce_min(shape)), tf.int32), size)
  frames = tf.clip_by_value(tf.image.resize(tf.cast(frames, tf.float32), new_hw), 0.0, 255.0)
  top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  return frames[:, top:top + size, left:left + size]


# -------------------------------------------------------------------------------------------------------- audio

def _audio_geometry(config: ml_collections.ConfigDict, sample_rate: int) -> tuple[int, int, int]:
  """(window samples, hop samples, samples giving exactly audio.frames frames)."""
  audio = config.audio
  length = int(round(sample_rate * audio.frame_length_ms / 1000))
  step = int(round(sample_rate * audio.frame_step_ms / 1000))
  return length, step, (audio.frames - 1) * step + length


def log_mel(wave: tf.Tensor, config: ml_collections.ConfigDict, sample_rate: int) -> tf.Tensor:
  """Normalised log-mel spectrogram (mel bins = image_size, frames) of a float waveform of the right length."""
  length, step, _ = _audio_geometry(config, sample_rate)
  fft = 2 ** int(math.ceil(math.log2(length)))
  spec = tf.abs(tf.signal.stft(wave, length, step, fft_length=fft, window_fn=tf.signal.hann_window)) ** 2
  mel = tf.signal.linear_to_mel_weight_matrix(config.image_size, fft // 2 + 1, sample_rate, 20.0,
                                              sample_rate / 2)
  logmel = tf.math.log(tf.matmul(spec, mel) + 1e-6)
  return tf.transpose((logmel - config.audio.norm_mean) / (2 * config.audio.norm_std))


def _fit_wave(wave: tf.Tensor, samples: int, seed: tf.Tensor | None) -> tf.Tensor:
  """Zero-pad to `samples`, or cut a window of them (random with a seed, else centred)."""
  wave = tf.pad(wave, [[0, tf.maximum(samples - tf.shape(wave)[0], 0)]])
  room = tf.shape(wave)[0] - samples
  if seed is None:
    start = room // 2
  else:
    start = tf.random.stateless_uniform([], seed, 0, room + 1, dtype=tf.int32)
  return wave[start:start + samples]


def spec_augment(spec: tf.Tensor, audio: ml_collections.ConfigDict, seed: tf.Tensor) -> tf.Tensor:
  """SpecAugment on (mel, frames): freq_masks bands of 0..freq_mask_width bins and time_masks of
  0..time_mask_width frames set to 0."""
  bins, frames = spec.shape
  keep = tf.ones_like(spec)
  seeds = tf.random.experimental.stateless_split(seed, audio.freq_masks + audio.time_masks + 1)
  masks = [(0, bins, audio.freq_mask_width)] * audio.freq_masks + [(1, frames, audio.time_mask_width)] * \
      audio.time_masks
  for i, (axis, size, width) in enumerate(masks):
    w_seed, s_seed = tf.unstack(tf.random.experimental.stateless_split(seeds[i], 2))
    width = tf.random.stateless_uniform([], w_seed, 0, min(width, size) + 1, dtype=tf.int32)
    start = tf.random.stateless_uniform([], s_seed, 0, size - width + 1, dtype=tf.int32)
    pos = tf.range(size)
    band = tf.cast((pos < start) | (pos >= start + width), spec.dtype)
    keep *= band[:, None] if axis == 0 else band[None, :]
  return spec * keep


def _waveform(example: dict[str, tf.Tensor]) -> tf.Tensor:
  wave = example['audio']
  if wave.dtype == tf.int16:
    return tf.cast(wave, tf.float32) / 32768.0
  return tf.cast(wave, tf.float32)


# ------------------------------------------------------------------------------------------------------ iterators

def _preprocess_fn(config: ml_collections.ConfigDict, builder: tfds.core.DatasetBuilder,
                   train: bool) -> input_pipeline.Preprocess:
  """(example, seed or None for eval) -> {'image', 'label'} for the configured modality."""
  feature = _feature(builder, config.modality)
  label = lambda example: tf.cast(example['label'], tf.int32)
  if config.modality == 'video':
    video = config.video

    def video_fn(example, seed):
      clip = example['video']
      if train:
        start_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        frames = sample_frames(clip, video.num_frames, video.frame_stride,
                               _random_start(clip, video.num_frames, video.frame_stride, start_seed))
        frames = _video_train(frames, config, crop_seed)
      else:
        frames = _video_eval(sample_frames(clip, video.num_frames, video.frame_stride, None), config)
      frames = tf.ensure_shape(frames, [video.num_frames, config.image_size, config.image_size, 3])
      return {'image': frames / 127.5 - 1.0, 'label': label(example)}
    return video_fn

  sample_rate = int(feature.sample_rate)
  _, _, samples = _audio_geometry(config, sample_rate)

  def audio_fn(example, seed):
    if train:
      crop_seed, mask_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
      spec = log_mel(_fit_wave(_waveform(example), samples, crop_seed), config, sample_rate)
      spec = spec_augment(tf.ensure_shape(spec, [config.image_size, config.audio.frames]), config.audio, mask_seed)
    else:
      spec = log_mel(_fit_wave(_waveform(example), samples, None), config, sample_rate)
    spec = tf.ensure_shape(spec, [config.image_size, config.audio.frames])
    return {'image': spec[..., None], 'label': label(example)}
  return audio_fn


def create_train_iterator(dataset_config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                          process_index: int | None = None,
                          process_count: int | None = None) -> input_pipeline.TrainIterator:
  """Endless, shuffled, augmented per-process training batches of clips or spectrograms (module docstring):
  input_pipeline's index-based stream (deterministic given `seed` and the process; a few integers of state)."""
  check_config(dataset_config)
  return input_pipeline.train_batches(
      dataset_config, lambda builder: _preprocess_fn(dataset_config, builder, train=True),
      global_batch_size=global_batch_size, seed=seed, process_index=process_index, process_count=process_count)


def create_eval_iterator(dataset_config: ml_collections.ConfigDict, *, global_batch_size: int,
                         process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass over this process's part of the eval split (centre clips / windows), padded to whole
  batches with a 'mask' by input_pipeline.eval_batches; every process yields the same number of batches."""
  check_config(dataset_config)
  return input_pipeline.eval_batches(
      dataset_config, lambda builder: _preprocess_fn(dataset_config, builder, train=False),
      global_batch_size=global_batch_size, process_index=process_index, process_count=process_count)
