"""Bytes of training-input state per process in a checkpoint, before and after the index-based pipeline (ImageNet).

  python experiments/benchmarks/input_state_size.py [--baseline_rev 24153b5]

Before (the baseline revision's tf.data pipeline): its checkpoint state is a tf.train.Checkpoint of the iterator,
which holds the shuffle buffer of still-encoded records. Measured here on synthetic 500x375 JPEGs at two buffer
sizes (buffers filled), which gives the bytes per buffered record; the ImageNet figure is then computed for the
ImageNet recipe's buffer (config_schema default 10,000; recipes.py uses up to 250,000) with ImageNet's mean
training JPEG (ILSVRC-2012 train: about 140 GB in 1,281,167 files, so about 110 KB each). So the "before" ImageNet
figure is computed from a measured slope, not measured on ImageNet itself.

After (this checkout): the state of a real TrainIterator over `imagenet2012` with its real TFDS features and
ImageNet's train length (1,281,167 records, served by a synthetic random-access source of tiny JPEGs; shapes only),
as process 63 of 64 after 300 epochs' worth of position. Measured, not computed. Prints a JSON summary last.
"""
from __future__ import annotations

import io
import json
import pathlib
import sys
import tempfile

import numpy as np
from absl import app
from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import tensorflow_datasets as tfds  # noqa: E402  (after sys.path)

# BenchImages, the baseline loader, and the --baseline_rev flag.
from experiments.benchmarks import input_throughput  # noqa: E402

IMAGENET_TRAIN = 1_281_167
IMAGENET_MEAN_JPEG_BYTES = 110_000
BUFFERS = (32, 96)


def _baseline_bytes_per_record(rev: str) -> tuple[float, dict[int, int], float]:
  """Fits the baseline's state bytes against its shuffle-buffer size on the synthetic JPEGs."""
  old = input_throughput._baseline_module(rev)  # pylint: disable=protected-access
  data_dir = tempfile.mkdtemp(prefix='state_size_')
  input_throughput.BenchImages.NUM_IMAGES = 128
  builder = tfds.builder('bench_images', data_dir=data_dir)
  builder.download_and_prepare(file_format='tfrecord')
  mean_record = builder.info.splits['train'].num_bytes / builder.info.splits['train'].num_examples
  sizes = {}
  for buffer in BUFFERS:
    config = input_throughput._config(data_dir)  # pylint: disable=protected-access
    config.image_size, config.randaugment_layers, config.shuffle_buffer = 32, 0, buffer
    it = old.create_train_iterator(config, global_batch_size=8, seed=0)
    next(it)  # Fills the buffer.
    sizes[buffer] = sum(len(v) for v in it.get_state().values())
  slope = (sizes[BUFFERS[1]] - sizes[BUFFERS[0]]) / (BUFFERS[1] - BUFFERS[0])
  return slope, sizes, mean_record


class _TinyJpegs:
  """A random-access source of `n` serialized imagenet2012 examples (one 8x8 JPEG reused): shapes only."""

  def __init__(self, builder: tfds.core.DatasetBuilder, n: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buf, format='JPEG')
    self._features, self._jpeg, self._n = builder.info.features, buf.getvalue(), n

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, i: int) -> bytes:
    return self._features.serialize_example({'image': self._jpeg, 'label': i % 1000, 'file_name': f'{i}.JPEG'})


def _index_state_bytes() -> tuple[int, dict]:
  """State bytes of this checkout's TrainIterator on imagenet2012 metadata at ImageNet's length."""
  from vit_jax import input_pipeline, input_state  # pylint: disable=g-import-not-at-top
  data_dir = tempfile.mkdtemp(prefix='imagenet_meta_')
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name='train', shard_lengths=[IMAGENET_TRAIN], num_bytes=0),
      tfds.core.SplitInfo(name='validation', shard_lengths=[50_000], num_bytes=0)]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_dir)
  config = input_throughput._config(data_dir)  # pylint: disable=protected-access
  config.name, config.image_size, config.randaugment_layers = 'imagenet2012', 32, 0
  process_count = 64

  def source(b, split, **kwargs):
    del kwargs
    return _TinyJpegs(b, b.info.splits[split].num_examples)

  with tfds.testing.mock_data(data_dir=data_dir, as_data_source_fn=source):
    it = input_pipeline.create_train_iterator(config, global_batch_size=4096, seed=0, process_index=63,
                                              process_count=process_count)
    next(it)
    saved = input_state.InputPosition.from_state(it.get_state())
    late = input_state.InputPosition(**{**saved.__dict__, 'position': 300 * saved.num_examples + 64})
    it.set_state(late.to_state())
    next(it)
    state = it.get_state()
  return sum(len(v) for v in state.values()), json.loads(state[input_state.STATE_KEY])


def main(argv) -> None:
  del argv
  slope, sizes, mean_record = _baseline_bytes_per_record(flags.FLAGS.baseline_rev)
  before = {buffer: slope * buffer * IMAGENET_MEAN_JPEG_BYTES / mean_record for buffer in (10_000, 250_000)}
  after_bytes, after_fields = _index_state_bytes()
  for buffer, size in sizes.items():
    print(f'baseline, synthetic {mean_record / 1e3:.0f} KB records, shuffle buffer {buffer}: {size:,} bytes')
  for buffer, size in before.items():
    print(f'baseline, ImageNet (computed), shuffle buffer {buffer:,}: {size / 1e9:.2f} GB per process, '
          f'{64 * size / 1e9:.0f} GB per checkpoint of a 64-host run')
  print(f'index-based, ImageNet length, process 63 of 64: {after_bytes} bytes per process, {64 * after_bytes:,} '
        f'bytes per checkpoint of a 64-host run: {after_fields}')
  print(json.dumps({'baseline_state_bytes_measured': sizes, 'baseline_bytes_per_buffered_record': round(slope),
                    'synthetic_mean_record_bytes': round(mean_record),
                    'baseline_imagenet_bytes_per_process_computed': {k: round(v) for k, v in before.items()},
                    'index_state_bytes_per_process_measured': after_bytes, 'index_state': after_fields}))


if __name__ == '__main__':
  app.run(main)
