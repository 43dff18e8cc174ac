"""The image-folder dataset: conversion, corrupt files skipped and counted, clear errors, training end to end."""
import io

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from vit_jax import checkpoint, input_pipeline, train
from vit_jax.config_schema import base_config
from vit_jax.datasets import image_folder

CLASSES = ('circle', 'square', 'stripes')


def _png(kind, rng, size=12):
  yy, xx = np.mgrid[:size, :size]
  if kind == 'circle':
    mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
  elif kind == 'square':
    mask = (abs(yy - size / 2) < size / 4) & (abs(xx - size / 2) < size / 4)
  else:
    mask = (xx // 2) % 2 == 0
  image = (mask[..., None] * 200 + rng.integers(0, 40, (size, size, 3))).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def make_folder(root, per_class=(8, 3), corrupt=True):
  """root/train and root/val with one folder per class; 4 corrupt files in train and 1 in val when `corrupt`."""
  rng = np.random.default_rng(0)
  for split, n in zip(('train', 'val'), per_class):
    for c in CLASSES:
      d = root / split / c
      d.mkdir(parents=True)
      for i in range(n):
        (d / f'{i}.png').write_bytes(_png(c, rng))
  if corrupt:
    good = (root / 'train' / 'circle' / '0.png').read_bytes()
    (root / 'train' / 'circle' / 'truncated.png').write_bytes(good[:len(good) // 2])
    (root / 'train' / 'square' / 'garbage.jpg').write_bytes(b'not an image at all' * 10)
    (root / 'train' / 'square' / 'empty.jpg').write_bytes(b'')
    (root / 'train' / 'stripes' / 'notes.txt').write_text('labels are folder names')
    (root / 'val' / 'circle' / 'bad.png').write_bytes(good[:40])
    (root / 'train' / 'circle' / '.DS_Store').write_bytes(b'\0\1')  # Hidden: ignored, not counted.
  return root


def _dataset_config(root, data_dir, **kw):
  c = base_config().dataset
  c.name, c.folder, c.data_dir = 'image_folder', str(root), str(data_dir)
  c.eval_split, c.image_size, c.train_crop, c.shuffle_buffer = 'val', 16, 'resize', 64
  c.update(kw)
  return c


def test_corrupt_files_are_skipped_and_counted(tmp_path):
  root = make_folder(tmp_path / 'images')
  config = _dataset_config(root, tmp_path / 'tfds')
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (3, 24, 9)
  assert info.skipped_files == 5
  b = image_folder.builder(str(root), ['train', 'val'], data_dir=str(tmp_path / 'tfds'))
  assert b.is_prepared() and b.info.features['label'].names == list(CLASSES)
  assert sorted(image_folder.skipped_files(b)['train']) == [
      'train/circle/truncated.png', 'train/square/empty.jpg', 'train/square/garbage.jpg', 'train/stripes/notes.txt']
  batch = next(input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0))
  assert batch['image'].shape == (8, 16, 16, 3) and np.isfinite(batch['image']).all()
  labels = [int(l) for b in input_pipeline.create_eval_iterator(config, global_batch_size=4)
            for l, m in zip(b['label'], b['mask']) if m]
  assert sorted(labels) == [0] * 3 + [1] * 3 + [2] * 3


def test_changed_folder_is_converted_again(tmp_path):
  root = make_folder(tmp_path / 'images', corrupt=False)
  config = _dataset_config(root, tmp_path / 'tfds')
  assert input_pipeline.get_dataset_info(config).num_train_examples == 24
  (root / 'train' / 'circle' / 'extra.png').write_bytes((root / 'train' / 'circle' / '1.png').read_bytes())
  assert input_pipeline.get_dataset_info(config).num_train_examples == 25



def test_images_in_nested_subfolders_are_included_and_counted(tmp_path, caplog):
  root = make_folder(tmp_path / 'images', corrupt=False)
  nested = root / 'train' / 'circle' / 'indoor' / 'close-up'
  nested.mkdir(parents=True)
  (nested / 'n.png').write_bytes((root / 'train' / 'circle' / '1.png').read_bytes())
  (root / 'train' / 'square' / '.thumbnails').mkdir()  # Hidden folder: ignored.
  (root / 'train' / 'square' / '.thumbnails' / 't.png').write_bytes((root / 'train' / 'square' / '1.png').read_bytes())
  with caplog.at_level('INFO', logger='absl'):  # absl's own level (e.g. WARNING once absl flags are parsed)
    _, files = image_folder.scan(str(root), ['train', 'val'])
  assert ('train/circle/indoor/close-up/n.png', 0) in files['train'] and len(files['train']) == 25
  assert any('1 file(s) in nested subfolders' in r.getMessage() for r in caplog.records)
  assert input_pipeline.get_dataset_info(_dataset_config(root, tmp_path / 'tfds')).num_train_examples == 25


def test_resume_on_a_changed_folder_warns_and_restarts_the_input(tmp_path, caplog):
  """The checkpointed position names the folder's conversion: on a changed folder it is not applied to new data."""
  root = make_folder(tmp_path / 'images', corrupt=False)
  config = _dataset_config(root, tmp_path / 'tfds')
  it = input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0)
  next(it)
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run'), keep=2)
  ckpt.save(1, {'w': jnp.zeros((2,))}, data_iterator=it)
  ckpt.close()
  state = {'w': jnp.zeros((2,))}
  same = input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0)
  restored = checkpoint.Checkpointer(str(tmp_path / 'run'), keep=2).restore_latest_valid(state, data_iterator=same)
  assert (restored.data_restored, same.position.position) == (True, 8)  # Unchanged folder: exact resume.
  (root / 'train' / 'circle' / 'extra.png').write_bytes((root / 'train' / 'circle' / '1.png').read_bytes())
  changed = input_pipeline.create_train_iterator(config, global_batch_size=8, seed=0)
  with caplog.at_level('WARNING'):
    restored = checkpoint.Checkpointer(str(tmp_path / 'run'), keep=2).restore_latest_valid(state,
                                                                                         data_iterator=changed)
  assert (restored.step, restored.data_restored, changed.position.position) == (1, False, 0)
  assert any('training data changed since this checkpoint' in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize('breakage,match', [
    (lambda r: (r / 'train' / 'empty_class').mkdir(), r'Class folder .*empty_class is empty'),
    (lambda r: (r / 'val').rename(r / 'valid'), r"no split folder 'val' \(it has \['train', 'valid'\]\)"),
    (lambda r: (r / 'val' / 'triangle').mkdir(), r"class folders \['triangle'\] that .*train lacks"),
])
def test_unusable_layouts_are_named(tmp_path, breakage, match):
  root = make_folder(tmp_path / 'images', per_class=(1, 1), corrupt=False)
  breakage(root)
  with pytest.raises(image_folder.ImageFolderError, match=match):
    input_pipeline.get_dataset_info(_dataset_config(root, tmp_path / 'tfds'))


def test_class_with_only_corrupt_files_is_an_error(tmp_path):
  root = make_folder(tmp_path / 'images', per_class=(1, 1), corrupt=False)
  (root / 'train' / 'square' / '0.png').write_bytes(b'broken')
  with pytest.raises(image_folder.ImageFolderError, match='square.* hold no decodable image'):
    input_pipeline.get_dataset_info(_dataset_config(root, tmp_path / 'tfds'))


@pytest.mark.slow
def test_training_on_an_image_folder_reports_skipped_files(tmp_path):
  root = make_folder(tmp_path / 'images')
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(str(tmp_path / 'tfds'), total_steps=6, log_every=3, eval_every=0, checkpoint_every=6,
                       batch_size=8)
  config.optimizer.warmup_steps = 1
  config.dataset = _dataset_config(root, tmp_path / 'tfds', cache=True)
  final = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert final['dataset_skipped_files'] == 5 and final['step'] == 6
  assert np.isfinite(final['train_loss']) and 0 <= final['eval_accuracy'] <= 1
