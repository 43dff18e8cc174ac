"""The training input's position: a few integers that pin down every later batch (exact resume at any scale).

The train iterator (input_pipeline.TrainIterator) is a pure function of where it is in its example stream and of
what it reads: the k-th example of a process is record `order(k)` of that process's part of the split, augmented with
a seed derived from k. So its whole state is `position` (examples this process has consumed) and the integers that
say which stream that is (seed, process index and count, the part's size, a fingerprint of the dataset). A
checkpoint stores it as a ~150-byte JSON object per process, whatever the dataset or shuffle size; the tf.data
iterator state it replaces held the shuffle buffer (about 1 GB per process for ImageNet with a 10k buffer).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

STATE_KEY = 'input_position'  # The single entry of TrainIterator.get_state().
MAX_STATE_BYTES = 512  # Far above the ~150 bytes written; a test holds get_state() to it.


class InputStateMismatchError(ValueError):
  """A saved input position belongs to another stream (dataset changed, other seed, other process layout)."""


def dataset_fingerprint(*parts: object) -> int:
  """A 63-bit integer naming a dataset's contents and split (e.g. TFDS full name incl. config and version, split).

  An image folder's TFDS config name carries a hash of its file listing, so a changed folder changes this.
  """
  digest = hashlib.sha256('|'.join(str(p) for p in parts).encode()).digest()
  return int.from_bytes(digest[:8], 'big') >> 1


@dataclasses.dataclass(frozen=True)
class InputPosition:
  """Where a process's train stream is; every field an int. `position` counts examples, not batches."""
  position: int
  seed: int
  process_index: int
  process_count: int
  num_examples: int  # Of this process's part of the train split.
  dataset: int  # dataset_fingerprint(...) of what is read.

  def to_state(self) -> dict[str, bytes]:
    """The checkpointable form: {STATE_KEY: JSON bytes of the integers}."""
    return {STATE_KEY: json.dumps(dataclasses.asdict(self), sort_keys=True).encode()}

  @classmethod
  def from_state(cls, state: dict[str, bytes]) -> InputPosition:
    """Parses `to_state`'s output; a clear error for anything else (e.g. an older tf.data iterator snapshot)."""
    if set(state) != {STATE_KEY}:
      raise InputStateMismatchError(
          f'the saved input state has entries {sorted(state)[:4]}, not {STATE_KEY!r}: it was written by an older '
          'vit_jax input pipeline (tf.data iterator snapshot), which this one cannot continue')
    try:
      fields = json.loads(bytes(state[STATE_KEY]).decode())
      position = cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls)})
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
      raise InputStateMismatchError(f'the saved input position is unreadable ({type(e).__name__}: {e})') from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in dataclasses.asdict(position).values()):
      raise InputStateMismatchError(f'the saved input position holds non-integers: {fields}')
    return position

  def check_continues(self, saved: InputPosition) -> None:
    """Raises InputStateMismatchError unless `saved` is a position in a stream over the same data and process part.

    The seed may differ: it is part of the position (a run whose input was restarted with a new seed resumes that
    stream).
    """
    if saved.dataset != self.dataset or saved.num_examples != self.num_examples:
      raise InputStateMismatchError(
          f'the training data changed since this checkpoint (dataset fingerprint {saved.dataset:x} with '
          f'{saved.num_examples} examples in this process\'s part, now {self.dataset:x} with {self.num_examples}); '
          'an image folder whose files were added, removed or modified is converted afresh, so the saved position '
          'would point into other data')
    mine, theirs = dataclasses.asdict(self), dataclasses.asdict(saved)
    other = {k: (theirs[k], mine[k]) for k in ('process_index', 'process_count') if theirs[k] != mine[k]}
    if other:
      raise InputStateMismatchError(f'the saved input position is for another stream: (saved, now) {other}')
