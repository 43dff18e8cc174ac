"""Images/s of the training input pipeline at 224 px with RandAugment: this checkout against an older revision.

  python experiments/benchmarks/input_throughput.py [--baseline_rev 24153b5] [--rounds 4] [--batches 12]

Builds a synthetic dataset of JPEGs of ImageNet-like size (500x375, smooth colour fields plus noise, so they cost
about what photos cost to decode), prepared twice: as TFRecord for the baseline revision's input_pipeline.py
(tf.data streaming + shuffle buffer) and as ArrayRecord for this checkout's (read by index). Both run the same
config: inception crop to 224, flip, RandAugment 2 ops at magnitude 10, batch 32, one process. Rounds alternate
old and new, so a load that changes over the run hits both alike; each figure comes with the 1-minute load
average read just after it, and with the process's CPU time per image (all threads), which other load barely
changes: on a busy machine compare that. Prints one line per measurement and a JSON summary as the last line.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

flags.DEFINE_string('baseline_rev', '24153b5', 'git revision whose vit_jax/input_pipeline.py is the baseline')
flags.DEFINE_integer('rounds', 4, 'alternating (baseline, current) rounds')
flags.DEFINE_integer('batches', 12, 'batches of 32 timed per measurement (after 2 warm-up batches)')
flags.DEFINE_integer('images', 128, 'synthetic training images')

import tensorflow_datasets as tfds  # noqa: E402  (after sys.path)


class BenchImages(tfds.core.GeneratorBasedBuilder):
  """Synthetic 500x375 JPEGs in 10 classes (deterministic)."""

  VERSION = tfds.core.Version('1.0.0')
  NUM_IMAGES = 128

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager
    return {'train': self._generate_examples(self.NUM_IMAGES), 'validation': self._generate_examples(8)}

  def _generate_examples(self, n: int):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[:375, :500] / 375.0
    for i in range(n):
      a = rng.uniform(0, 6, size=(3, 2))
      field = np.stack([np.sin(a[c, 0] * yy + a[c, 1] * xx + c) for c in range(3)], -1) * 100 + 128
      image = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
      buf = io.BytesIO()
      Image.fromarray(image).save(buf, format='JPEG', quality=90)
      yield i, {'image': buf.getvalue(), 'label': i % 10}


def _baseline_module(rev: str) -> Any:
  """The baseline revision's input_pipeline.py, imported as a separate module."""
  source = subprocess.run(['git', 'show', f'{rev}:vit_jax/input_pipeline.py'], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
  path = pathlib.Path(tempfile.mkdtemp()) / 'baseline_input_pipeline.py'
  path.write_text(source)
  spec = importlib.util.spec_from_file_location('baseline_input_pipeline', path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up while the module runs.
  spec.loader.exec_module(module)
  return module


def _config(data_dir: str) -> Any:
  from vit_jax.config_schema import base_config  # pylint: disable=g-import-not-at-top
  c = base_config().dataset
  c.name, c.data_dir, c.eval_split = 'bench_images', data_dir, 'validation'
  c.image_size, c.train_crop, c.flip = 224, 'inception', True
  c.randaugment_layers, c.randaugment_magnitude = 2, 10.0
  c.shuffle_buffer, c.cache = 10_000, False
  return c


def _measure(module: Any, data_dir: str, batches: int) -> tuple[float, float]:
  """(images/s wall-clock, CPU ms per image): the CPU time of all threads barely depends on other load."""
  it = module.create_train_iterator(_config(data_dir), global_batch_size=32, seed=0)
  for _ in range(2):  # Warm-up: graph tracing, thread pools, autotuning.
    next(it)
  start, cpu = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  n = batches * 32
  return n / (time.perf_counter() - start), 1e3 * (time.process_time() - cpu) / n


def main(argv) -> None:
  del argv
  args = flags.FLAGS
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  BenchImages.NUM_IMAGES = args.images
  work = pathlib.Path(tempfile.mkdtemp(prefix='input_bench_'))
  dirs = {'baseline': str(work / 'tfrecord'), 'current': str(work / 'array_record')}
  tfds.builder('bench_images', data_dir=dirs['baseline']).download_and_prepare(file_format='tfrecord')
  tfds.builder('bench_images', data_dir=dirs['current']).download_and_prepare(file_format='array_record')
  modules = {'baseline': _baseline_module(args.baseline_rev), 'current': input_pipeline}
  results: dict[str, list[tuple[float, float, float]]] = {'baseline': [], 'current': []}
  for r in range(args.rounds):
    for name in (('baseline', 'current') if r % 2 == 0 else ('current', 'baseline')):
      rate, cpu_ms = _measure(modules[name], dirs[name], args.batches)
      load = os.getloadavg()[0]
      results[name].append((rate, cpu_ms, load))
      print(f'round {r} {name:8s} {rate:7.1f} images/s  {cpu_ms:6.1f} CPU ms/image   load average (1 min) '
            f'{load:.1f}', flush=True)
  summary = {name: {'median_images_per_s': round(float(np.median([x[0] for x in v])), 1),
                    'median_cpu_ms_per_image': round(float(np.median([x[1] for x in v])), 1),
                    'images_per_s': [round(x[0], 1) for x in v], 'cpu_ms_per_image': [round(x[1], 1) for x in v],
                    'load_1min': [round(x[2], 1) for x in v]}
             for name, v in results.items()}
  summary['cpus'] = os.cpu_count()
  print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)
