"""Tests for vit_jax.input_pipeline and the bundled `digits` TFDS builder (offline: digits + tfds mock data)."""
from __future__ import annotations

import collections
import itertools
import json
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import input_pipeline, input_state
from vit_jax.config_schema import base_config
from vit_jax.datasets import digits

from tests import tfds_mock


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  """A data_dir with digits prepared once for the module."""
  path = str(tmp_path_factory.mktemp('tfds'))
  tfds.builder('digits', data_dir=path).download_and_prepare()
  return path


@pytest.fixture(scope='module')
def raw_test_split(data_dir) -> collections.Counter:
  """Multiset of (image bytes, label) of the digits test split, read straight from TFDS."""
  return collections.Counter((ex['image'][..., 0].tobytes(), int(ex['label'])) for ex in _read_all(data_dir, 'test'))


def _read_all(data_dir: str, split: str) -> list[dict[str, np.ndarray]]:
  """Every example of a digits split, decoded, in stored order (read by index, as the input pipeline does)."""
  source = tfds.builder('digits', data_dir=data_dir).as_data_source(split=split)
  return source.__getitems__(list(range(len(source))))


def _config(data_dir: str, **overrides):
  """Digits at its native 8x8 size, so eval images map back to the stored pixels exactly."""
  c = base_config().dataset
  c.data_dir = data_dir
  c.image_size = 8
  c.train_crop = 'pad_and_crop'
  c.eval_crop_fraction = 1.0
  c.shuffle_buffer = 500
  c.update(overrides)
  return c


def _to_uint8(images: np.ndarray) -> np.ndarray:
  """Inverts the [-1, 1] normalisation."""
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# The digits builder.


def test_digits_builder(data_dir, raw_test_split):
  builder = tfds.builder('digits', data_dir=data_dir)
  assert isinstance(builder, digits.Digits)
  assert builder.is_prepared()
  assert builder.info.splits['train'].num_examples == 1437
  assert builder.info.splits['test'].num_examples == 360
  assert builder.info.features['label'].num_classes == 10
  train = _read_all(data_dir, 'train')
  images = np.stack([ex['image'] for ex in train])
  assert images.shape == (1437, 8, 8, 1) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255
  assert set(int(ex['label']) for ex in train) == set(range(10))
  # The split is the documented one: the test split holds exactly the scaled sklearn images at split_indices().
  from sklearn.datasets import load_digits
  sk = load_digits()
  idx = digits.split_indices()
  assert len(idx['train']) == 1437 and len(idx['test']) == 360
  assert len(np.union1d(idx['train'], idx['test'])) == 1797
  scaled = np.round(sk.images * 255 / 16).astype(np.uint8)
  expected = collections.Counter((scaled[i].tobytes(), int(sk.target[i])) for i in idx['test'])
  assert expected == raw_test_split


def test_get_dataset_info(data_dir):
  info = input_pipeline.get_dataset_info(_config(data_dir))
  assert info == input_pipeline.DatasetInfo(num_classes=10, num_train_examples=1437, num_eval_examples=360)
  info = input_pipeline.get_dataset_info(_config(data_dir, train_split='train[:1000]', eval_split='train[1000:]'))
  assert (info.num_train_examples, info.num_eval_examples) == (1000, 437)


# ---------------------------------------------------------------------------------------------------------------------
# Training batches.


def _train_batches(config, n: int = 3, **kwargs) -> list[dict[str, np.ndarray]]:
  kwargs.setdefault('global_batch_size', 32)
  kwargs.setdefault('seed', 0)
  return list(itertools.islice(input_pipeline.create_train_iterator(config, **kwargs), n))


@pytest.mark.parametrize('train_crop,cache,image_size', [
    ('pad_and_crop', False, 8), ('pad_and_crop', True, 8), ('inception', False, 16), ('resize', True, 12)])
def test_train_batches(data_dir, train_crop, cache, image_size):
  config = _config(data_dir, train_crop=train_crop, cache=cache, image_size=image_size)
  batches = _train_batches(config)
  for batch in batches:
    assert set(batch) == {'image', 'label'}
    assert batch['image'].shape == (32, image_size, image_size, 3) and batch['image'].dtype == np.float32
    assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    assert batch['image'].min() < -0.99 and batch['image'].max() > 0.99  # Uses the whole range (black/white ink).
    assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()
    np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])  # Grayscale -> RGB.
  # Deterministic for a seed; another seed or another process gives other batches.
  again = _train_batches(config)
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other_seed = _train_batches(config, n=1, seed=1)[0]
  assert not np.array_equal(other_seed['image'], batches[0]['image'])
  other_process = _train_batches(config, n=1, process_index=1, process_count=2)[0]
  assert other_process['image'].shape[0] == 16
  assert not np.array_equal(other_process['image'], batches[0]['image'][:16])


def test_train_repeats_forever_and_flips(data_dir):
  config = _config(data_dir, train_crop='resize', flip=False, shuffle_buffer=0)
  # 1437 examples: 50 batches of 32 need more than one epoch.
  batches = _train_batches(config, n=50)
  assert len(batches) == 50
  # Without augmentation or shuffling, epoch 2 starts like epoch 1.
  flat = np.concatenate([b['image'] for b in batches])
  np.testing.assert_array_equal(flat[1437:1437 + 10], flat[:10])
  flipped = np.concatenate([b['image'] for b in _train_batches(_config(data_dir, train_crop='resize', flip=True,
                                                                           shuffle_buffer=0), n=50)])
  is_flipped = [np.array_equal(f, x[:, ::-1]) and not np.array_equal(f, x) for f, x in zip(flipped, flat)]
  assert 0.3 < np.mean(is_flipped) < 0.7


# ---------------------------------------------------------------------------------------------------------------------
# The position: a few integers, exact resume, per-epoch permutations, per-process parts.


def _identities(batches, n: int) -> list[tuple[bytes, int]]:
  """(stored pixels, label) of the first n examples of un-augmented 8x8 batches."""
  images = np.concatenate([_to_uint8(b['image'])[..., 0] for b in batches])[:n]
  labels = np.concatenate([b['label'] for b in batches])[:n]
  return [(im.tobytes(), int(l)) for im, l in zip(images, labels)]


def test_state_is_a_few_integers_and_resumes_bitwise_across_epochs(data_dir):
  config = _config(data_dir, train_split='train[:300]', train_crop='inception', image_size=12, random_erasing=0.5)
  it = input_pipeline.create_train_iterator(config, global_batch_size=64, seed=3)
  for _ in range(4):  # 256 of 300 examples: the saved position sits just before the epoch boundary.
    next(it)
  state = it.get_state()
  assert set(state) == {input_state.STATE_KEY}
  assert len(state[input_state.STATE_KEY]) <= input_state.MAX_STATE_BYTES
  fields = json.loads(state[input_state.STATE_KEY])
  assert all(type(v) is int for v in fields.values()) and len(fields) <= 8, fields
  assert (fields['position'], fields['seed'], fields['num_examples']) == (256, 3, 300)
  expected = [next(it) for _ in range(3)]  # Crosses into epoch 2.
  resumed = input_pipeline.create_train_iterator(config, global_batch_size=64, seed=99)  # The saved seed wins.
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(3)]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert resumed.get_state() == it.get_state()


def test_epochs_are_permutations_and_processes_read_disjoint_parts(data_dir):
  config = _config(data_dir, train_crop='resize', flip=False)
  train = collections.Counter((ex['image'][..., 0].tobytes(), int(ex['label'])) for ex in _read_all(data_dir, 'train'))
  parts = []
  for process_index in range(3):
    it = input_pipeline.create_train_iterator(config, global_batch_size=96, seed=0, process_index=process_index,
                                              process_count=3)
    n = it.position.num_examples
    seen = _identities([next(it) for _ in range(2 * n // 32 + 1)], 2 * n)
    first, second = seen[:n], seen[n:]
    assert collections.Counter(first) == collections.Counter(second), 'each epoch holds the part exactly once'
    assert first != second, 'each epoch has its own order'
    parts.append(collections.Counter(first))
  assert sum(parts, collections.Counter()) == train  # The parts tile the split.


# ---------------------------------------------------------------------------------------------------------------------
# Eval batches.


@pytest.mark.parametrize('process_count,global_batch_size', [
    (1, 64), (1, 7), (1, 360), (1, 500), (2, 64), (2, 14), (3, 48), (3, 9)])
def test_eval_covers_split_exactly_once(data_dir, raw_test_split, process_count, global_batch_size):
  config = _config(data_dir)
  local_batch = global_batch_size // process_count
  seen = collections.Counter()
  num_batches = []
  for process_index in range(process_count):
    batches = list(input_pipeline.create_eval_iterator(
        config, global_batch_size=global_batch_size, process_index=process_index, process_count=process_count))
    num_batches.append(len(batches))
    for batch in batches:
      assert set(batch) == {'image', 'label', 'mask'}
      assert batch['image'].shape == (local_batch, 8, 8, 3) and batch['image'].dtype == np.float32
      assert batch['label'].shape == (local_batch,) and batch['label'].dtype == np.int32
      assert batch['mask'].shape == (local_batch,)
      real = batch['mask'].astype(bool)
      assert (batch['label'][~real] == 0).all()
      images = _to_uint8(batch['image'][real])
      for image, label in zip(images, batch['label'][real]):
        seen[(image[..., 0].tobytes(), int(label))] += 1
  assert len(set(num_batches)) == 1, num_batches  # Every process yields the same number of batches.
  assert num_batches[0] == math.ceil(math.ceil(360 / process_count) / local_batch)
  assert seen == raw_test_split  # The whole split, every example exactly once.


def test_eval_is_repeatable_and_centre_crops(data_dir):
  config = _config(data_dir, image_size=16, eval_crop_fraction=0.875)
  first = list(input_pipeline.create_eval_iterator(config, global_batch_size=100))
  second = list(input_pipeline.create_eval_iterator(config, global_batch_size=100))
  assert len(first) == len(second) == 4
  assert sum(b['mask'].sum() for b in first) == 360
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert first[0]['image'].shape == (100, 16, 16, 3)


def test_resize_small_and_center_crop_keeps_the_centre():
  image = np.zeros((40, 80, 3), np.uint8)
  image[10:30, 20:60] = 255  # The central half is white.
  out = input_pipeline._resize_small_and_center_crop(tf.constant(image), 16, 0.5).numpy()
  assert out.shape == (16, 16, 3)
  np.testing.assert_allclose(out, 255.0, atol=1e-3)
  out = input_pipeline._resize_small_and_center_crop(tf.constant(image), 16, 1.0).numpy()
  assert out.shape == (16, 16, 3) and out.min() == 0.0  # Plain resize keeps the black border.
  crop = input_pipeline._inception_crop(tf.constant(image), 24, tf.constant([1, 2], tf.int64)).numpy()
  assert crop.shape == (24, 24, 3) and 0.0 <= crop.min() and crop.max() <= 255.0


# ---------------------------------------------------------------------------------------------------------------------
# Other TFDS datasets, mocked.


@pytest.fixture(scope='module')
def mock_metadata_dir(tmp_path_factory) -> str:
  """A data_dir holding only metadata (split sizes) for cifar10 and imagenet2012, for tfds.testing.mock_data."""
  path = str(tmp_path_factory.mktemp('mock_tfds'))
  for name, eval_split in [('cifar10', 'test'), ('imagenet2012', 'validation')]:
    builder = tfds.builder(name, data_dir=path)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name='train', shard_lengths=[20], num_bytes=0),
        tfds.core.SplitInfo(name=eval_split, shard_lengths=[10], num_bytes=0)]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_dir)
  return path


@pytest.mark.parametrize('name,eval_split,train_crop,num_classes', [
    ('cifar10', 'test', 'pad_and_crop', 10), ('imagenet2012', 'validation', 'inception', 1000)])
def test_mocked_tfds_datasets(mock_metadata_dir, name, eval_split, train_crop, num_classes):
  config = _config(mock_metadata_dir, name=name, eval_split=eval_split, train_crop=train_crop, image_size=32,
                   eval_crop_fraction=0.875)
  with tfds.testing.mock_data(data_dir=mock_metadata_dir, as_data_source_fn=tfds_mock.fake_data_source):
    info = input_pipeline.get_dataset_info(config)
    assert info == input_pipeline.DatasetInfo(num_classes, 20, 10)
    train = _train_batches(config, n=2, global_batch_size=8)
    evals = list(input_pipeline.create_eval_iterator(config, global_batch_size=4))
  for batch in train:
    assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
    assert -1.0 <= batch['image'].min() and batch['image'].max() <= 1.0
    assert batch['label'].dtype == np.int32 and (batch['label'] < num_classes).all()
  assert [b['mask'].sum() for b in evals] == [4, 4, 2]
  assert all(b['image'].shape == (4, 32, 32, 3) for b in evals)


# ---------------------------------------------------------------------------------------------------------------------
# Errors.


def test_unknown_dataset(data_dir):
  with pytest.raises(ValueError, match=r"Unknown dataset 'digitz'.*digits"):
    input_pipeline.get_dataset_info(_config(data_dir, name='digitz'))


def test_unknown_split(data_dir):
  with pytest.raises(ValueError, match=r"'validation'.*eval_split.*\['test', 'train'\]"):
    input_pipeline.create_eval_iterator(_config(data_dir, eval_split='validation'), global_batch_size=8)
  with pytest.raises(ValueError, match=r"'tarin'.*train_split"):
    input_pipeline.create_train_iterator(_config(data_dir, train_split='tarin'), global_batch_size=8, seed=0)


def test_batch_not_divisible_by_processes(data_dir):
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    input_pipeline.create_train_iterator(_config(data_dir), global_batch_size=9, seed=0, process_index=0,
                                         process_count=2)
  with pytest.raises(ValueError, match='multiple of the number of processes'):
    input_pipeline.create_eval_iterator(_config(data_dir), global_batch_size=10, process_index=2, process_count=3)


def test_bad_image_config(data_dir):
  with pytest.raises(ValueError, match='train_crop'):
    input_pipeline.create_train_iterator(_config(data_dir, train_crop='random'), global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match='eval_crop_fraction'):
    input_pipeline.create_eval_iterator(_config(data_dir, eval_crop_fraction=0.0), global_batch_size=8)


def test_unprepared_dataset_says_how_to_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'cifar10' is not prepared.*tfds build cifar10"):
    input_pipeline.get_dataset_info(_config(str(tmp_path), name='cifar10'))
  with pytest.raises(FileNotFoundError, match='ILSVRC2012_img_train.tar'):
    input_pipeline.get_dataset_info(_config(str(tmp_path), name='imagenet2012'))


def test_position_of_other_data_or_an_older_format_is_refused(data_dir):
  state = input_pipeline.create_train_iterator(_config(data_dir), global_batch_size=32, seed=0).get_state()
  other_split = input_pipeline.create_train_iterator(_config(data_dir, train_split='train[:1000]'),
                                                     global_batch_size=32, seed=0)
  with pytest.raises(input_state.InputStateMismatchError, match='training data changed since this checkpoint'):
    other_split.set_state(state)
  other_part = input_pipeline.create_train_iterator(_config(data_dir), global_batch_size=32, seed=0,
                                                    process_index=1, process_count=2)
  with pytest.raises(input_state.InputStateMismatchError):
    other_part.set_state(state)
  with pytest.raises(input_state.InputStateMismatchError, match='older vit_jax input pipeline'):
    other_split.set_state({'.index': b'\0', '.data-00000-of-00001': b'\1'})  # A tf.data iterator snapshot.
  with pytest.raises(input_state.InputStateMismatchError, match='unreadable'):
    other_split.set_state({input_state.STATE_KEY: b'{"position": 3'})


def test_streaming_only_format_says_how_to_fix(tmp_path):
  tfds.builder('digits', data_dir=str(tmp_path)).download_and_prepare(file_format='tfrecord')
  with pytest.raises(ValueError, match=r'stored as tfrecord.*tfds build digits --file_format=array_record'):
    input_pipeline.create_train_iterator(_config(str(tmp_path)), global_batch_size=8, seed=0)
