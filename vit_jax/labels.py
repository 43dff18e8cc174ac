"""Class names of a trained model: recorded in its workdir at training time, read back by predict and visualize.

`WORKDIR/class_names.json` is a JSON list (index = label id), written once from the dataset's metadata (TFDS label
names; an image folder's class folders), so a workdir answers with names on a machine without the dataset.
"""
from __future__ import annotations

import json
from typing import Optional, Sequence

import jax
import ml_collections
from etils import epath

CLASS_NAMES_FILENAME = 'class_names.json'


def record_class_names(workdir: str, dataset_config: ml_collections.ConfigDict) -> Optional[epath.Path]:
  """Writes the dataset's class names into `workdir` unless they are there already (process 0 only); returns the
  file, or None when the dataset's labels have no names."""
  path = epath.Path(workdir) / CLASS_NAMES_FILENAME
  if path.exists() or jax.process_index() != 0:
    return path if path.exists() else None
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  names = input_pipeline.class_names(dataset_config)
  if names is None:
    return None
  tmp = path.parent / f'{path.name}.tmp'
  tmp.write_text(json.dumps(names))
  tmp.rename(path)
  return path


def read_class_names(workdir: str) -> Optional[list[str]]:
  """The names recorded by `record_class_names`, or None if the workdir has none (a run from before they were
  recorded: give --labels)."""
  path = epath.Path(workdir) / CLASS_NAMES_FILENAME
  return _as_names(json.loads(path.read_text()), str(path)) if path.exists() else None


def read_labels_file(path: str) -> list[str]:
  """Class names from a file: a JSON list, or plain text with one name per line (line i = label i)."""
  text = epath.Path(path).read_text()
  if text.lstrip().startswith('['):
    return _as_names(json.loads(text), path)
  return _as_names([line.strip() for line in text.splitlines() if line.strip()], path)


def _as_names(names: Sequence[object], source: str) -> list[str]:
  if not isinstance(names, list) or not names:
    raise ValueError(f'{source} must hold a non-empty list of class names (index = label id).')
  return [str(n) for n in names]
