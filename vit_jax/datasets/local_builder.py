"""What the TFDS builders shipped in this package share."""
from __future__ import annotations

import inspect
from typing import Any

from etils import epath
import tensorflow_datasets as tfds


class LocalCodePath:
  """Mixin (list it before the TFDS builder base): the builder's code_path is the file that defines it.

  TFDS's default lookup goes through package resources and needs the `importlib_resources` backport, which may not
  be installed.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


class ArrayRecordFormat:
  """Mixin (list it before the TFDS builder base): `download_and_prepare` writes ArrayRecord files by default.

  The input pipeline reads examples by index (`builder.as_data_source`), which needs a random-access file format;
  TFDS's default, TFRecord, only streams. A copy already prepared in another format is read as it is (and the input
  pipeline says how to convert it).
  """

  def download_and_prepare(self, *, file_format: Any = None, **kwargs: Any) -> None:
    super().download_and_prepare(file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)
