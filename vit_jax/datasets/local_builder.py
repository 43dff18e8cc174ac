"""What the TFDS builders shipped in this package share."""
from __future__ import annotations

import inspect

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
