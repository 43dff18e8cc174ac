"""tfds.testing.mock_data for the index-based input pipeline: mocked datasets served as serialized records."""
from __future__ import annotations

import itertools
from typing import Any

import tensorflow_datasets as tfds


def fake_data_source(builder: tfds.core.DatasetBuilder, split: Any, **kwargs: Any) -> list[bytes]:
  """`as_data_source` for mock_data (`as_data_source_fn=`): `split`'s size in random examples (from the metadata),
  serialized with the dataset's own features.

  (tfds 4.9.10's default mock cannot serve serialized records: its `__getitems__` is bound without `self`.)
  """
  del kwargs
  num_examples = builder.info.splits[split].num_examples
  examples = tfds.testing.mocking.RandomFakeGenerator(builder.info.features, num_examples)
  return [builder.info.features.serialize_example(ex) for ex in itertools.islice(examples, num_examples)]
