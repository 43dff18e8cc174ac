"""`image_folder`: a user's own images, as FOLDER/SPLIT/CLASS/IMAGE, served as a TFDS dataset.

Layout: FOLDER/train/cat/1.jpg, FOLDER/train/dog/2.png, FOLDER/val/cat/3.jpg, ... One subdirectory per split
(any names: train, val, test), one subdirectory per class inside; the train split's class folders (sorted) define
the label ids, and every other split may only use those classes. Files in nested subfolders of a class folder
(FOLDER/train/cat/indoor/4.jpg) belong to that class; how many there are is logged. Hidden files and folders
(.name) are ignored.

The folder is converted once into TFDS files under data_dir (one builder config per folder and file listing: a
changed folder gets a fresh conversion, the old one is left alone), so training reads it through the same
input pipeline as any TFDS dataset (per-process splits, shuffling, exact resume). A checkpoint's input position
names the conversion it was taken on, so a run resumed on a changed folder warns and restarts its input order.
During conversion every image is decoded once: undecodable or corrupt files are skipped, counted per split and
listed in the dataset's metadata; they never crash a run. An empty class folder, a split without class folders, or
a missing split is an error that names the folder.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax.datasets import local_builder
from absl import logging
from etils import epath


class ImageFolderError(ValueError):
  """The folder layout cannot be used; the message names the folder and the fix."""


def _visible(path: epath.Path) -> bool:
  return not path.name.startswith('.')


def _subdirs(path: epath.Path) -> list[epath.Path]:
  return sorted((p for p in path.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def scan(folder: str, splits: Sequence[str]) -> tuple[list[str], dict[str, list[tuple[str, int]]]]:
  """Returns (class names, {split: [(relative file path, label)]}) for the requested splits; clear errors."""
  root = epath.Path(folder)
  if not root.is_dir():
    raise ImageFolderError(f'config.dataset.folder={folder!r} is not a directory.')
  available = [p.name for p in _subdirs(root)]
  for split in splits:
    if split not in available:
      raise ImageFolderError(f'Image folder {folder} has no split folder {split!r} (it has {available}). Create '
                             f'{root / split}/CLASS/IMAGE, or set config.dataset.train_split/eval_split to one of '
                             f'{available}.')
  train = 'train' if 'train' in splits else splits[0]
  classes = [p.name for p in _subdirs(root / train)]
  if not classes:
    raise ImageFolderError(f'Split folder {root / train} has no class folders; expected {root / train}/CLASS/IMAGE.')
  files: dict[str, list[tuple[str, int]]] = {}
  for split in splits:
    split_dir = root / split
    class_dirs = _subdirs(split_dir)
    if not class_dirs:
      raise ImageFolderError(f'Split folder {split_dir} has no class folders; expected {split_dir}/CLASS/IMAGE.')
    unknown = [p.name for p in class_dirs if p.name not in classes]
    if unknown:
      raise ImageFolderError(f'{split_dir} has class folders {unknown} that {root / train} lacks. Every class '
                             f'must have training images; add them there or remove these folders.')
    entries, nested = [], 0
    for class_dir in class_dirs:
      images = _files_below(class_dir)
      if not images:
        raise ImageFolderError(f'Class folder {class_dir} is empty. Add images to it or remove it.')
      label = classes.index(class_dir.name)
      entries.extend((str(p.relative_to(root)), label) for p in images)
      nested += sum(p.parent != class_dir for p in images)
    if nested:
      logging.info('image_folder: %d file(s) in nested subfolders of the class folders of %s are included, each '
                   'labelled by its top-level class folder.', nested, split_dir)
    files[split] = entries
  return classes, files


def _files_below(directory: epath.Path) -> list[epath.Path]:
  """Every visible file under `directory`, at any depth (hidden files and folders skipped), sorted by path."""
  found = []
  for p in directory.iterdir():
    if not _visible(p):
      continue
    if p.is_dir():
      found.extend(_files_below(p))
    elif p.is_file():
      found.append(p)
  return sorted(found)


def _fingerprint(folder: str, files: dict[str, list[tuple[str, int]]]) -> str:
  """Changes when the folder moves or any file is added, removed, resized or touched."""
  h = hashlib.sha256(os.path.abspath(folder).encode())
  root = epath.Path(folder)
  for split in sorted(files):
    for rel, label in files[split]:
      stat = os.stat(root / rel)
      h.update(f'{split}|{rel}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n'.encode())
  return h.hexdigest()[:12]


def decode_ok(data: bytes) -> bool:
  """Whether TensorFlow can decode `data` as an image (JPEG, PNG, GIF, BMP), exactly as training will."""
  try:
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    return image.shape[0] > 0 and image.shape[1] > 0
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError, ValueError):
    return False


class ImageFolder(local_builder.LocalCodePath, local_builder.ArrayRecordFormat, tfds.core.GeneratorBasedBuilder,
                  skip_registration=True):
  """Images in FOLDER/SPLIT/CLASS/; build with `image_folder.builder(folder, splits, data_dir)`."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Folder of class folders per split; undecodable files skipped and counted.',
                   '1.1.0': 'Files in nested subfolders of a class folder included; stored as ArrayRecord.'}

  def __init__(self, *, folder: str, splits: Sequence[str], data_dir: Any = None):
    self._folder = os.path.abspath(folder)
    self._classes, self._files = scan(folder, splits)
    base = re.sub(r'[^a-z0-9]+', '_', os.path.basename(self._folder.rstrip('/')).lower()).strip('_') or 'folder'
    config = tfds.core.BuilderConfig(name=f'{base}_{_fingerprint(folder, self._files)}',
                                     description=f'Images from {self._folder}.')
    super().__init__(data_dir=data_dir, config=config)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Image folder {self._folder}.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=self._classes),
            'file': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager
    self.info.metadata['skipped_files'] = {}
    return {split: self._generate_examples(split, entries) for split, entries in self._files.items()}

  def _generate_examples(self, split: str, entries: list[tuple[str, int]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields the decodable images of `split`; records the others in info.metadata['skipped_files'][split]."""
    root = epath.Path(self._folder)
    bad, per_class = [], np.zeros(len(self._classes), np.int64)
    for rel, label in entries:
      data = (root / rel).read_bytes()
      if not decode_ok(data):
        bad.append(rel)
        continue
      per_class[label] += 1
      yield rel, {'image': data, 'label': label, 'file': rel}
    if bad:
      logging.warning('image_folder: skipped %d undecodable file(s) in %s, e.g. %s', len(bad), root / split, bad[:5])
    present = sorted({label for _, label in entries})
    empty = [str(root / split / self._classes[i]) for i in present if per_class[i] == 0]
    if empty:
      raise ImageFolderError(f'Class folder(s) {empty} hold no decodable image ({len(bad)} undecodable files in '
                             f'{root / split}). Replace the files or remove the folders.')
    self.info.metadata['skipped_files'][split] = bad


def builder(folder: str, splits: Sequence[str], data_dir: Any = None) -> ImageFolder:
  """The (possibly not yet prepared) builder for `folder`; raises ImageFolderError for unusable layouts."""
  return ImageFolder(folder=folder, splits=list(dict.fromkeys(splits)), data_dir=data_dir)


def skipped_files(b: tfds.core.DatasetBuilder) -> dict[str, list[str]]:
  """{split: [relative paths]} of the files skipped as undecodable when `b` was prepared."""
  return dict(b.info.metadata.get('skipped_files', {})) if b.info.metadata is not None else {}
