"""Index-based tf.data input pipelines over TFDS datasets, yielding numpy batches for the trainer.

Reads every field of `config.dataset` (see config_schema.py). Each process reads only its own part of a split
(`tfds.split_for_jax_process`), so batches here are per-process: global_batch_size // process_count examples.
Images come out as float32 (b, image_size, image_size, 3) in [-1, 1] (x / 127.5 - 1, as the official ViT), labels
as int32 (b,).

Examples are read by index from ArrayRecord files (`builder.as_data_source`): the k-th training example of a process
is record `order(k)` of its part, where `order` is a fresh random permutation every epoch
(tf's stateless RandomIndexShuffle op: a global shuffle that buffers nothing), and its augmentation seed is folded
from k. Decoding and augmentation are tf ops run in parallel by tf.data, in order. So the iterator's whole state is
a few integers (vit_jax/input_state.py), and a resumed run draws exactly the batches an uninterrupted one would.
`dataset.shuffle_buffer` > 1 turns the per-epoch shuffle on (its size no longer matters: nothing is buffered);
0 or 1 reads each epoch in stored order. `dataset.cache` holds the encoded records in memory (small datasets).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import contextlib
import dataclasses
import difflib
import io
import logging
import math
import re
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import augment
from vit_jax import input_state
from vit_jax import datasets as _vit_jax_datasets  # Registers vit_jax's own TFDS builders (digits).
from vit_jax.datasets import image_folder

del _vit_jax_datasets

try:  # tf is only an input pipeline here: keep it off the accelerators so it never takes their memory.
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF already initialised its devices (someone used TF first); nothing we can change now.
  logging.warning('TensorFlow devices were already initialised; could not hide GPUs from tf.data.')

TRAIN_CROPS = ('inception', 'pad_and_crop', 'resize', 'multicrop')
_AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset. Example counts are for whole splits (all processes)."""
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  skipped_files: int | None = None  # image_folder: undecodable files left out (all splits); None for TFDS datasets.


# ---------------------------------------------------------------------------------------------------------------------
# Builders and splits.


def _is_vit_jax_builder(builder: tfds.core.DatasetBuilder) -> bool:
  """Whether `builder` is one of ours (prepared from bundled data, so it can be prepared anywhere)."""
  return type(builder).__module__.startswith('vit_jax.')


def _get_builder(dataset_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the prepared builder for `dataset_config.name`, preparing vit_jax's own builders when missing."""
  name, data_dir = dataset_config.name, dataset_config.data_dir
  if name == 'image_folder':
    splits = [re.split(r'[\[+]', dataset_config[f])[0] for f in ('train_split', 'eval_split')]
    builder = image_folder.builder(dataset_config.folder, splits, data_dir=data_dir)
    if not builder.is_prepared():
      logging.info('Converting image folder %s into TFDS files under %s (once).', dataset_config.folder,
                   builder.data_dir)
      builder = _prepare_once(builder, lambda: image_folder.builder(dataset_config.folder, splits, data_dir))
    return builder
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split(':')[0].split('/')[0]
    close = difflib.get_close_matches(base, tfds.list_builders(with_community_datasets=False), n=5)
    hint = f' Did you mean one of {close}?' if close else ''
    raise ValueError(f'Unknown dataset {name!r} (config.dataset.name): no TFDS or vit_jax builder has that name.'
                     f'{hint}') from None
  if builder.is_prepared():
    return builder
  if _is_vit_jax_builder(builder):
    logging.info('Preparing vit_jax dataset %r into %s.', name, builder.data_dir)
    return _prepare_once(builder, lambda: tfds.builder(name, data_dir=data_dir))
  where = data_dir if data_dir is not None else 'the TFDS default (~/tensorflow_datasets or $TFDS_DATA_DIR)'
  manual = ''
  if builder.name == 'imagenet2012':
    manual = (' imagenet2012 cannot be downloaded by TFDS: first place ILSVRC2012_img_train.tar and '
              'ILSVRC2012_img_val.tar in DATA_DIR/downloads/manual/.')
  raise FileNotFoundError(
      f'Dataset {name!r} is not prepared in data_dir={where} (looked for {builder.data_dir}), and this machine '
      f'cannot download it. Prepare it on a machine with internet with `tfds build {builder.name} '
      f'--file_format=array_record --data_dir=DATA_DIR` and copy DATA_DIR/{builder.name} into the data_dir here, '
      f'or set config.dataset.data_dir to a directory where it is already prepared.{manual}')


def _prepare_once(builder: tfds.core.DatasetBuilder,
                  rebuild: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
  """Prepares `builder` on process 0 while the others wait (data_dir must be shared in multi-host runs)."""
  if jax.process_index() == 0:
    with _quiet_tfds():
      builder.download_and_prepare()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f'vit_jax_prepare_{builder.name}')
    if jax.process_index() != 0:
      builder = rebuild()  # Re-reads the now prepared dataset's info.
  return builder


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  """Without absl --verbosity >= 1: no TFDS progress bars or printed banners while it prepares a dataset (our
  own log lines say what is being prepared and where)."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  if absl_logging.get_verbosity() >= 1:
    yield
    return
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.enable_progress_bar()


def _num_examples(builder: tfds.core.DatasetBuilder, split: Any, field: str) -> int:
  """Number of examples in `split` (a name, slice like 'train[:90%]', or sub-split); clear error if invalid."""
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f'Invalid split {str(split)!r} (config.dataset.{field}) for dataset {builder.name!r}: {e} '
                     f'Available splits: {sorted(builder.info.splits.keys())}.') from None


def _process_split(dataset_config: ml_collections.ConfigDict, field: str, global_batch_size: int,
                   process_index: int | None, process_count: int | None,
                   ) -> tuple[tfds.core.DatasetBuilder, Any, int, int, int]:
  """Validates arguments; returns (builder, this process's sub-split, process_index, process_count, local batch)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Need 0 <= process_index < process_count, got {process_index} and {process_count}.')
  if global_batch_size < 1 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size={global_batch_size} must be a positive multiple of the number of '
                     f'processes ({process_count}).')
  builder = _get_builder(dataset_config)
  split = dataset_config[field]
  _num_examples(builder, split, field)
  subsplit = tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count)
  return builder, subsplit, process_index, process_count, global_batch_size // process_count


def get_dataset_info(dataset_config: ml_collections.ConfigDict) -> DatasetInfo:
  """Classes and whole-split sizes of the configured dataset (preparing vit_jax builders if needed)."""
  builder = _get_builder(dataset_config)
  skipped = None
  if isinstance(builder, image_folder.ImageFolder):
    per_split = image_folder.skipped_files(builder)
    skipped = sum(len(v) for v in per_split.values())
    if skipped:
      logging.warning('Image folder %s: %d undecodable file(s) were skipped when it was converted: %s',
                      dataset_config.folder, skipped, {k: len(v) for k, v in per_split.items()})
  return DatasetInfo(
      num_classes=builder.info.features['label'].num_classes,
      num_train_examples=_num_examples(builder, dataset_config.train_split, 'train_split'),
      num_eval_examples=_num_examples(builder, dataset_config.eval_split, 'eval_split'),
      skipped_files=skipped,
  )


# ---------------------------------------------------------------------------------------------------------------------
# Image ops (tf, per example). Images are uint8 (h, w, c) until resized; resizing gives float32 in [0, 255].


def _data_source(builder: tfds.core.DatasetBuilder, subsplit: Any) -> Sequence[bytes]:
  """This process's part of a split as a random-access sequence of serialized examples (ArrayRecord files)."""
  try:
    return builder.as_data_source(split=subsplit, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  except NotImplementedError:
    stored = builder.info.file_format.value if builder.info.file_format else 'an unknown format'
    raise ValueError(
        f'Dataset {builder.name!r} in {builder.data_dir} is stored as {stored}, which cannot be read by index. '
        'vit_jax reads examples by index (a few integers of input state; exact resume), which needs ArrayRecord '
        f'files: prepare it with `tfds build {builder.name} --file_format=array_record --data_dir=DATA_DIR`, or '
        f'add ArrayRecord files beside the prepared ones with `tfds convert_format --dataset_version_dir='
        f'{builder.data_dir} --out_file_format=array_record` (needs apache_beam).') from None


def _record_reader(source: Sequence[bytes], in_memory: bool) -> Callable[[tf.Tensor], tf.Tensor]:
  """Returns fn: int64 indices (n,) -> their serialized examples, string (n,); `in_memory` reads all once."""
  # TFDS's ArrayRecord sources read a batch of keys in parallel; any other Sequence is read key by key.
  get_many = getattr(source, '__getitems__', None) or (lambda keys: [source[k] for k in keys])
  if in_memory:
    records = tf.constant(np.array(get_many(list(range(len(source)))), dtype=object))
    return lambda indices: tf.gather(records, indices)

  def read(indices: np.ndarray) -> np.ndarray:
    return np.array(get_many(indices.tolist()), dtype=object)

  def reader(indices: tf.Tensor) -> tf.Tensor:
    records = tf.numpy_function(read, [indices], tf.string)
    records.set_shape(indices.shape)
    return records
  return reader


def _parse_fn(builder: tfds.core.DatasetBuilder) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
  """Returns a fn: serialized example -> every feature decoded with the dataset's own features (images uint8)."""
  return builder.info.features.deserialize_example


_READ_CHUNK = 32  # Records fetched per call into the data source (one Python call per chunk, not per example).


def _examples(source: Sequence[bytes], *, in_memory: bool, start: int, stop: int,
              order: Callable[[tf.Tensor], tf.Tensor]) -> tf.data.Dataset:
  """(k, serialized record `order(k)`) for k in [start, stop), in order; reads in chunks."""
  reader = _record_reader(source, in_memory)
  ds = tf.data.Dataset.range(start, stop).batch(_READ_CHUNK)
  ds = ds.map(lambda ks: (ks, reader(order(ks))))
  return ds.unbatch()


def _epoch_order(num_examples: int, shuffle_seed: int | None) -> Callable[[tf.Tensor], tf.Tensor]:
  """Returns fn: stream positions k (int64) -> record indices; a new permutation per epoch (None: stored order)."""
  def order(ks: tf.Tensor) -> tf.Tensor:
    epoch, index = ks // num_examples, ks % num_examples
    if shuffle_seed is None:
      return index
    # The raw op takes per-element seeds [n, 3] (the tf.random.experimental wrapper mis-pads rank-2 seeds).
    seeds = tf.stack([tf.fill(tf.shape(ks), tf.constant(shuffle_seed, tf.int64)), epoch, tf.zeros_like(ks)], axis=-1)
    return tf.raw_ops.RandomIndexShuffle(index=index, seed=seeds, max_index=tf.fill(tf.shape(ks), tf.constant(
        num_examples - 1, tf.int64)), rounds=4)
  return order


def _to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Grayscale -> RGB by repeating the channel; RGBA -> RGB by dropping alpha. Always returns 3 channels."""
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels == 1:
    return tf.tile(image, [1, 1, 3])
  if channels is None:
    image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3])
  else:
    image = image[..., :3]
  image.set_shape([None, None, 3])
  return image


def _resize(image: tf.Tensor, height: Any, width: Any) -> tf.Tensor:
  """Bilinear resize to (height, width) as float32 in [0, 255]; a no-op cast when the static size already matches."""
  if image.shape[0] == height and image.shape[1] == width:
    return tf.cast(image, tf.float32)
  image = tf.image.resize(image, [height, width], method='bilinear')
  return tf.clip_by_value(image, 0.0, 255.0)


def _inception_crop(image: tf.Tensor, size: int, seed: tf.Tensor, min_area: float = 0.05) -> tf.Tensor:
  """Random crop of `min_area`..100% of the area (5%: ViT/big_vision; 20%: MAE pretraining) with aspect ratio
  3/4..4/3, resized to size x size."""
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), bounding_boxes=tf.zeros([0, 0, 4], tf.float32), seed=seed, min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3), area_range=(min_area, 1.0), use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, crop_size)
  crop.set_shape([None, None, 3])
  return _resize(crop, size, size)


def _pad_and_crop(image: tf.Tensor, size: int, padding: int, seed: tf.Tensor) -> tf.Tensor:
  """Resize to size, zero-pad by `padding` on every side, and take a random size x size crop (CIFAR-style)."""
  image = _resize(image, size, size)
  if padding > 0:
    image = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
  return tf.image.stateless_random_crop(image, [size, size, 3], seed=seed)


def _resize_small_and_center_crop(image: tf.Tensor, size: int, crop_fraction: float) -> tf.Tensor:
  """Resize the shorter side to size / crop_fraction (keeping aspect), then take the central size x size crop."""
  if crop_fraction == 1.0:
    return _resize(image, size, size)
  small = size / crop_fraction
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = small / tf.reduce_min(shape)
  new_hw = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = tf.image.resize(image, new_hw, method='bilinear')
  image = tf.clip_by_value(image, 0.0, 255.0)
  top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
  image = tf.slice(image, [top, left, 0], [size, size, 3])
  image.set_shape([size, size, 3])
  return image


def _normalize(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] -> [-1, 1], as the official ViT."""
  return image / 127.5 - 1.0


def eval_preprocess(image: tf.Tensor, dataset_config: ml_collections.ConfigDict) -> tf.Tensor:
  """The eval transform of one decoded image (uint8 (h, w, 1|3|4)): RGB, resize the shorter side to
  image_size / eval_crop_fraction, central image_size crop, [-1, 1]. Shared by eval, predict and visualize."""
  image = _resize_small_and_center_crop(_to_rgb(image), dataset_config.image_size, dataset_config.eval_crop_fraction)
  return _normalize(image)


def class_names(dataset_config: ml_collections.ConfigDict) -> list[str] | None:
  """The label names of the configured dataset (TFDS metadata; an image folder's class folders), or None when its
  label feature has no names."""
  names = _get_builder(dataset_config).info.features['label'].names
  return list(names) if names else None


def _check_image_config(dataset_config: ml_collections.ConfigDict) -> None:
  """Validates the image fields, so that mistakes fail at iterator creation, not inside tf.data."""
  if dataset_config.image_size < 1:
    raise ValueError(f'config.dataset.image_size must be positive, got {dataset_config.image_size}.')
  if dataset_config.train_crop not in TRAIN_CROPS:
    raise ValueError(f'config.dataset.train_crop must be one of {TRAIN_CROPS}, got {dataset_config.train_crop!r}.')
  if not 0.0 < dataset_config.crop_min_area <= 1.0:
    raise ValueError(f'config.dataset.crop_min_area must be in (0, 1], got {dataset_config.crop_min_area}.')
  if dataset_config.crop_padding < 0:
    raise ValueError(f'config.dataset.crop_padding must be >= 0, got {dataset_config.crop_padding}.')
  if not 0.0 < dataset_config.eval_crop_fraction <= 1.0:
    raise ValueError(f'config.dataset.eval_crop_fraction must be in (0, 1], got {dataset_config.eval_crop_fraction}.')
  if dataset_config.train_crop == 'multicrop':
    _check_multicrop_config(dataset_config)


def _check_multicrop_config(dataset_config: ml_collections.ConfigDict) -> None:
  """The DINO multi-crop fields: crop counts, sizes and area ranges."""
  if dataset_config.local_crops < 0 or dataset_config.local_image_size < 1:
    raise ValueError(f'config.dataset.local_crops={dataset_config.local_crops} must be >= 0 and '
                     f'config.dataset.local_image_size={dataset_config.local_image_size} positive.')
  for key in ('global_crop_scale', 'local_crop_scale'):
    lo, hi = dataset_config[key]
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f'config.dataset.{key}={tuple(dataset_config[key])} must be an area range (lo, hi) with '
                       '0 < lo <= hi <= 1, e.g. (0.4, 1.0) for global and (0.05, 0.4) for local crops.')
  lo, hi = dataset_config.blur_sigma
  if not 0.0 < lo <= hi <= augment.MAX_BLUR_SIGMA:
    raise ValueError(f'config.dataset.blur_sigma={tuple(dataset_config.blur_sigma)} must be a sigma range (lo, hi) '
                     f'in pixels with 0 < lo <= hi <= {augment.MAX_BLUR_SIGMA}, e.g. DINO\'s (0.1, 2.0) at 224 px.')


# ---------------------------------------------------------------------------------------------------------------------
# Iterators. Every modality shares them: it supplies only a per-example `Preprocess` (images here, clips and
# spectrograms in vit_jax/video_audio_pipeline.py), so reading, sharding, shuffling and the resumable position are
# one path.

# fn(example, seed) -> model inputs {'image', 'label', ...}: `example` holds every feature of the dataset, decoded;
# `seed` is the example's own stateless seed (int64 (2,), from its position in the stream) for training, None for
# eval. Output shapes must be static (eval pads with all-masked batches of them).
Preprocess = Callable[[dict[str, tf.Tensor], tf.Tensor | None], dict[str, tf.Tensor]]


def _process_seeds(seed: int, process_index: int) -> tuple[int, np.ndarray]:
  """(shuffle seed, augmentation seed pair) derived from (seed, process_index): they differ by process."""
  words = np.random.SeedSequence([seed, process_index]).generate_state(4, dtype=np.uint32)
  return int(words[0]), words[2:].astype(np.int64)


class TrainIterator:
  """Numpy batches from an index-based tf.data pipeline whose position is a few integers (exact resume).

  `make_dataset(start, seed)` builds the batches of the stream from example `start` on; the tf.data iterator is
  created at the first `next()`, so a `set_state` right after construction builds nothing twice. `get_state()`
  returns {input_state.STATE_KEY: ~150 bytes} whatever the dataset; `set_state` on an iterator over the same data
  and process part continues where it was taken (with the saved seed), and raises
  input_state.InputStateMismatchError, naming why, for another dataset (e.g. a changed image folder) or part.
  """

  def __init__(self, make_dataset: Callable[[int, int], tf.data.Dataset], position: input_state.InputPosition,
               batch_size: int):
    self._make_dataset = make_dataset
    self._position = position
    self._batch_size = batch_size
    self._iterator: Iterator[Any] | None = None

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      self._iterator = iter(self._make_dataset(self._position.position, self._position.seed))
    batch = tf.nest.map_structure(lambda t: t.numpy(), next(self._iterator))
    self._position = dataclasses.replace(self._position, position=self._position.position + self._batch_size)
    return batch

  @property
  def position(self) -> input_state.InputPosition:
    return self._position

  def get_state(self) -> dict[str, bytes]:
    return self._position.to_state()

  def set_state(self, state: dict[str, bytes]) -> None:
    saved = input_state.InputPosition.from_state(state)
    self._position.check_continues(saved)
    self._position, self._iterator = saved, None


def train_batches(dataset_config: ml_collections.ConfigDict,
                  preprocess_for: Callable[[tfds.core.DatasetBuilder], Preprocess], *, global_batch_size: int,
                  seed: int, process_index: int | None = None, process_count: int | None = None) -> TrainIterator:
  """Endless training batches of this process's part of `dataset_config.train_split`, read by index.

  The k-th example of the stream is record order(k) of the part (a fresh permutation each epoch when
  dataset.shuffle_buffer > 1), decoded and passed to `preprocess_for(builder)` with the seed
  fold_in(augmentation seed, k); batches of global_batch_size // process_count, remainder dropped. Deterministic
  given `seed` and the process; the position is a few integers (TrainIterator). Unreadable datasets and an empty
  part are errors here, not at the first `next()`.
  """
  builder, subsplit, process_index, process_count, local_batch = _process_split(
      dataset_config, 'train_split', global_batch_size, process_index, process_count)
  source = _data_source(builder, subsplit)
  num_examples = len(source)
  if num_examples < 1:
    raise ValueError(f'Process {process_index} of {process_count} has no examples of train split '
                     f'{dataset_config.train_split!r} of {builder.name!r}; use a larger split or fewer processes.')
  shuffle = bool(dataset_config.shuffle_buffer and dataset_config.shuffle_buffer > 1)
  in_memory = bool(dataset_config.cache)
  parse, preprocess = _parse_fn(builder), preprocess_for(builder)

  def make_dataset(start: int, stream_seed: int) -> tf.data.Dataset:
    shuffle_seed, aug_seed = _process_seeds(stream_seed, process_index)
    order = _epoch_order(num_examples, shuffle_seed if shuffle else None)

    def one(k: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
      return preprocess(parse(record), tf.random.experimental.stateless_fold_in(tf.constant(aug_seed), k))

    ds = _examples(source, in_memory=in_memory, start=start, stop=2**62, order=order)
    ds = ds.map(one, num_parallel_calls=_AUTOTUNE)
    return ds.batch(local_batch, drop_remainder=True).prefetch(_AUTOTUNE)

  position = input_state.InputPosition(
      position=0, seed=seed, process_index=process_index, process_count=process_count, num_examples=num_examples,
      dataset=input_state.dataset_fingerprint(builder.info.full_name, dataset_config.train_split, process_index,
                                              process_count))
  return TrainIterator(make_dataset, position, local_batch)


def eval_batches(dataset_config: ml_collections.ConfigDict,
                 preprocess_for: Callable[[tfds.core.DatasetBuilder], Preprocess], *, global_batch_size: int,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass, in stored order, over this process's part of `dataset_config.eval_split`, each example through
  `preprocess_for(builder)` with seed None; batches padded to the local batch size with a float32 'mask' (1 real,
  0 padding), and as many batches on every process (all-masked ones at the end), so collective steps never hang.
  """
  builder, subsplit, _, process_count, local_batch = _process_split(
      dataset_config, 'eval_split', global_batch_size, process_index, process_count)
  split = dataset_config.eval_split
  largest_part = max(builder.info.splits[s].num_examples
                     for s in tfds.even_splits(split, n=process_count))
  num_batches = math.ceil(largest_part / local_batch)
  parse, preprocess = _parse_fn(builder), preprocess_for(builder)
  source = _data_source(builder, subsplit)
  ds = _examples(source, in_memory=False, start=0, stop=len(source), order=lambda ks: ks)
  ds = ds.map(lambda k, record: preprocess(parse(record), None), num_parallel_calls=_AUTOTUNE)
  ds = ds.batch(local_batch).prefetch(_AUTOTUNE)
  empty = {k: np.zeros((0,) + tuple(spec.shape[1:]), spec.dtype.as_numpy_dtype) for k, spec in ds.element_spec.items()}

  def padded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(batch['label'])
    out = {k: np.zeros((local_batch,) + v.shape[1:], v.dtype) for k, v in batch.items()}
    for k, v in batch.items():
      out[k][:n] = v
    out['mask'] = (np.arange(local_batch) < n).astype(np.float32)
    return out

  def batches() -> Iterator[dict[str, np.ndarray]]:
    count = 0
    for batch in ds.as_numpy_iterator():
      count += 1
      if count > num_batches:
        raise RuntimeError(f'Eval split {split!r} of {builder.name!r} has more examples than its metadata says '
                           f'({largest_part} per process at most); re-prepare the dataset.')
      yield padded(batch)
    for _ in range(num_batches - count):
      yield padded(empty)

  return batches()


def create_train_iterator(dataset_config: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                          process_index: int | None = None,
                          process_count: int | None = None) -> TrainIterator:
  """Endless, shuffled, augmented per-process training batches; deterministic given `seed` and the process.

  Yields {'image': float32 (b, image_size, image_size, 3) in [-1, 1], 'label': int32 (b,)} with
  b = global_batch_size // process_count. With train_crop='multicrop' (DINO), 'image' holds the 2 global views
  (b, 2, image_size, image_size, 3) and 'local_image' the local ones (b, local_crops, local_image_size, ..., 3).
  Errors in the config and unreadable datasets are raised here, not at the first `next()`.
  dataset.modality 'video' / 'audio': clips or spectrograms from vit_jax/video_audio_pipeline.py.
  """
  if dataset_config.get('modality', 'image') != 'image':
    from vit_jax import video_audio_pipeline  # pylint: disable=g-import-not-at-top
    return video_audio_pipeline.create_train_iterator(dataset_config, global_batch_size=global_batch_size, seed=seed,
                                                      process_index=process_index, process_count=process_count)
  _check_image_config(dataset_config)
  preprocess = _image_train_fn(dataset_config)
  return train_batches(dataset_config, lambda builder: preprocess, global_batch_size=global_batch_size, seed=seed,
                       process_index=process_index, process_count=process_count)


def _image_train_fn(dataset_config: ml_collections.ConfigDict) -> Preprocess:
  """The training transform of one image example: crop, flip, RandAugment, normalise, random erasing."""
  size = dataset_config.image_size
  train_crop, padding, flip = dataset_config.train_crop, dataset_config.crop_padding, dataset_config.flip

  def preprocess(example: dict[str, tf.Tensor], rng: tf.Tensor) -> dict[str, tf.Tensor]:
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(rng, 2))
    image = _to_rgb(example['image'])
    if train_crop == 'multicrop':  # DINO: 2 global and `local_crops` local views (augment.dino_multicrop).
      views, local_views = augment.dino_multicrop(
          tf.cast(image, tf.float32), crop_seed, global_size=size, local_size=dataset_config.local_image_size,
          num_local=dataset_config.local_crops, global_scale=tuple(dataset_config.global_crop_scale),
          local_scale=tuple(dataset_config.local_crop_scale), blur_sigma=tuple(dataset_config.blur_sigma))
      return {'image': _normalize(views), 'local_image': _normalize(local_views),
              'label': tf.cast(example['label'], tf.int32)}
    if train_crop == 'inception':
      image = _inception_crop(image, size, crop_seed, dataset_config.crop_min_area)
    elif train_crop == 'pad_and_crop':
      image = _pad_and_crop(image, size, padding, crop_seed)
    else:
      image = _resize(image, size, size)
    if flip:
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    if dataset_config.randaugment_layers:  # Seeds folded from `rng`, so the crop/flip streams stay as they were.
      image = augment.randaugment_float(image, dataset_config.randaugment_layers,
                                        dataset_config.randaugment_magnitude,
                                        tf.random.experimental.stateless_fold_in(rng, 2))
    image = _normalize(image)
    if dataset_config.random_erasing:
      image = augment.random_erasing(image, dataset_config.random_erasing,
                                     tf.random.experimental.stateless_fold_in(rng, 3))
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}
  return preprocess


def create_eval_iterator(dataset_config: ml_collections.ConfigDict, *, global_batch_size: int,
                         process_index: int | None = None,
                         process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One deterministic pass over this process's part of the eval split, padded to whole batches.

  Yields {'image', 'label', 'mask'} with mask float32 (b,): 1 for real examples, 0 for padding. Every process
  yields the same number of batches (ceil(largest per-process part / local batch)), padding with all-masked
  batches where needed, so collective eval steps never hang. Over all processes, each example of the split
  appears exactly once with mask 1. dataset.modality 'video' / 'audio': vit_jax/video_audio_pipeline.py.
  """
  if dataset_config.get('modality', 'image') != 'image':
    from vit_jax import video_audio_pipeline  # pylint: disable=g-import-not-at-top
    return video_audio_pipeline.create_eval_iterator(dataset_config, global_batch_size=global_batch_size,
                                                     process_index=process_index, process_count=process_count)
  _check_image_config(dataset_config)
  size = dataset_config.image_size

  def preprocess(example: dict[str, tf.Tensor], seed: None) -> dict[str, tf.Tensor]:
    del seed
    image = tf.ensure_shape(eval_preprocess(example['image'], dataset_config), [size, size, 3])
    return {'image': image, 'label': tf.cast(example['label'], tf.int32)}

  return eval_batches(dataset_config, lambda builder: preprocess, global_batch_size=global_batch_size,
                      process_index=process_index, process_count=process_count)
