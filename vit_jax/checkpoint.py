"""Train-state checkpoints (Orbax: async save, verified resume, keep-N) and the workdir's run identity.

A checkpoint step holds three items: `default` (the train state), `data` (each process's input-iterator position,
so a resumed run sees exactly the batches an uninterrupted one would) and `loop` (JSON: the trainer's running
metrics). Orbax writes a step into a temporary directory and renames it when complete, so a kill -9 never leaves a
half-written step under its final name. In the save's own finalisation (after every process has written, before
the rename) process 0 writes a sha256 manifest of the step's files, so every finished step has one. On resume the
newest step that matches its manifest and restores is used, and a corrupt newer one is moved aside (never deleted)
with a warning naming it. A step without a manifest is not trusted: an older step with one is preferred, and
otherwise it is used only after it restores with finite values, with a warning, and its manifest is rebuilt. Only
the keep-N policy deletes checkpoints. `WorkdirLock` keeps a second run out of a workdir in use.

Pretrained-weight loading lives in `vit_jax.pretrained`; `load_pretrained` is re-exported here because callers
think of it as "loading a checkpoint".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import socket
import threading
import time
from typing import Any, Optional, Protocol, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from vit_jax.pretrained import load_pretrained  # noqa: F401  (public re-export)

CONFIG_FILENAME = 'config.json'
CHECKPOINT_DIRNAME = 'checkpoints'
MANIFEST_DIRNAME = 'manifests'           # Under checkpoints/: STEP.json, sha256 and size of every file of a step.
QUARANTINE_DIRNAME = 'checkpoints_corrupt'  # Under the workdir: corrupt steps are moved here, never deleted.
STATE_ITEM, DATA_ITEM, LOOP_ITEM = 'default', 'data', 'loop'
_ORBAX_TMP_SUFFIX = '.orbax-checkpoint-tmp'  # Orbax writes step N into N.orbax-checkpoint-tmp, then renames it.


def read_latest_state(directory: epath.PathLike) -> tuple[Optional[int], Any]:
  """(step, train state as saved, host arrays) of the newest checkpoint under `directory`; (None, None) if none.

  Reads only the train-state item, without an abstract state, for using another run's weights (init_from,
  teachers). Runs resume through `Checkpointer` instead, which also restores the data and loop items.
  """
  manager = ocp.CheckpointManager(epath.Path(directory),
                                  options=ocp.CheckpointManagerOptions(create=False, read_only=True),
                                  item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler()})
  try:
    step = manager.latest_step()
    if step is None:
      return None, None
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore()}))
    return step, restored[STATE_ITEM]
  finally:
    manager.close()


class WorkdirConflictError(RuntimeError):
  """The workdir holds a run that the current config would overwrite."""


class CheckpointRestoreError(RuntimeError):
  """No checkpoint of a workdir could be restored; nothing was moved."""


class CheckpointMismatchError(ValueError):
  """A checkpoint's parameters do not fit the model being trained (another model, or other shapes)."""


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def config_differences(old: dict[str, Any], new: dict[str, Any], ignore: Sequence[str] = ()) -> list[str]:
  """Human-readable 'key: old -> new' lines for every leaf that differs between two config dicts (keys in `ignore`
  left out)."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  missing = object()
  return [f'{k}: {old_flat.get(k, missing)!r} -> {new_flat.get(k, missing)!r}'.replace(repr(missing), '<absent>')
          for k in sorted((set(old_flat) | set(new_flat)) - set(ignore))
          if old_flat.get(k, missing) != new_flat.get(k, missing)]


def write_text_atomic(path: epath.PathLike, text: str) -> None:
  """Writes `path` through `PATH.tmp` and a rename that replaces whatever is there (an older file, or a `.tmp`
  left by a killed run), so readers never see a truncated file."""
  path = epath.Path(path)
  tmp = path.parent / f'{path.name}.tmp'
  tmp.write_text(text)  # Truncates a leftover .tmp.
  tmp.replace(path)


def read_json(path: epath.PathLike) -> Any:
  """The JSON content of `path`; a file that is not valid JSON raises a ValueError naming it."""
  path = epath.Path(path)
  text = path.read_text()
  try:
    return json.loads(text)
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); it was truncated or edited. Restore it (e.g. from the '
                     'config the run was started with), or delete it if this workdir holds no checkpoints yet.'
                     ) from None


def has_checkpoints(workdir: epath.PathLike) -> bool:
  """True when `workdir` holds at least one finished checkpoint step (read-only)."""
  root = epath.Path(workdir) / CHECKPOINT_DIRNAME
  return root.exists() and any(p.name.isdigit() for p in root.iterdir())


def fields_added_at_default(old: dict[str, Any], new: dict[str, Any],
                            defaults: Optional[dict[str, Any]]) -> list[str]:
  """Keys of `new` that `old` lacks and whose value is the one `defaults` gives them: fields the code gained after
  the run in `old` began, at values that keep its behaviour."""
  if not defaults:
    return []
  old_flat, new_flat, default_flat = _flatten(old), _flatten(new), _flatten(defaults)
  return sorted(k for k, v in new_flat.items()
                if k not in old_flat and k in default_flat and default_flat[k] == v)


def claim_workdir(workdir: str, config: ml_collections.ConfigDict,
                  defaults: Optional[ml_collections.ConfigDict] = None) -> bool:
  """Records `config` as the workdir's run, or checks that it is the run already there.

  Returns True when the workdir already holds this run (so training resumes). Raises WorkdirConflictError, and
  changes nothing, when the workdir holds a different config or checkpoints of unknown origin; a config.json that
  is not JSON raises a ValueError naming it. With `defaults` (the schema's default config), a field that the code
  gained after the run began is no conflict when `config` holds it at its default: an upgrade of the code does not
  strand a run. Such fields are logged.
  """
  path = epath.Path(workdir)
  config_file = path / CONFIG_FILENAME
  current = json.loads(config.to_json_best_effort())
  if config_file.exists():
    previous = read_json(config_file)
    added = fields_added_at_default(
        previous, current, json.loads(defaults.to_json_best_effort()) if defaults is not None else None)
    if added:
      logging.warning('Workdir %s was started before these config fields existed; resuming with their defaults: %s',
                      workdir, ', '.join(added))
    diffs = config_differences(previous, current, ignore=added)
    if diffs:
      raise WorkdirConflictError(
          f'Workdir {workdir} holds a run with a different config:\n  ' + '\n  '.join(diffs) +
          '\nNothing was changed. Use a new --workdir for the new config, or rerun with the original config to '
          'resume.')
    return True
  if has_checkpoints(path):
    raise WorkdirConflictError(
        f'Workdir {workdir} holds checkpoints but no {CONFIG_FILENAME}, so its run cannot be identified. '
        'Nothing was changed. Use a new --workdir.')
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(config_file, json.dumps(current, indent=2, sort_keys=True))
  return False


class WorkdirLockedError(RuntimeError):
  """Another live process is running in this workdir."""


LOCK_FILENAME = 'run.lock'


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Exists, owned by someone else.
    return True
  return True


class WorkdirLock:
  """One run per workdir: WORKDIR/run.lock holds the host and pid of the process that runs there.

  Taken atomically (a hard link of a complete file, so no reader sees it half-written) and removed when the run
  ends. A lock of a process that is gone from this host is stale: it is taken over with a warning. A live holder,
  or a holder on another host (whose liveness cannot be checked from here), is refused with a message naming it.
  Multi-host runs share the workdir: process 0 holds the lock for all processes, and all fail together if it
  cannot. Workdirs that are not local paths (e.g. gs://) are not locked.
  """

  def __init__(self, workdir: str):
    self._path = epath.Path(workdir) / LOCK_FILENAME
    self._held = False
    self._me = {'host': socket.gethostname(), 'pid': os.getpid()}

  @property
  def path(self) -> epath.Path:
    return self._path

  def _local(self) -> bool:
    return '://' not in os.fspath(self._path)

  def acquire(self) -> None:
    error: Optional[str] = None
    if jax.process_index() == 0 and self._local():
      try:
        self._take()
      except WorkdirLockedError as e:
        error = str(e)
    if _any_process(error is not None):
      raise WorkdirLockedError(error or f'Process 0 could not lock {self._path}; see its log.')

  def _take(self) -> None:
    path = pathlib.Path(os.fspath(self._path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f'{path.name}.{self._me["host"]}.{self._me["pid"]}.tmp'
    tmp.write_text(json.dumps({**self._me, 'started': time.strftime('%Y-%m-%d %H:%M:%S %Z')}))
    try:
      for _ in range(3):
        try:
          os.link(tmp, path)  # Fails if the lock exists: the check and the creation are one step.
          self._held = True
          return
        except FileExistsError:
          pass
        holder = self._holder(path)
        if holder is None:  # Removed meanwhile, or unreadable: retry / refuse below.
          if path.exists() and not path.read_text().strip():
            raise WorkdirLockedError(f'{path} exists but is empty. If no run is using this workdir, delete it.')
          continue
        if holder.get('host') == self._me['host'] and not _pid_alive(int(holder.get('pid', -1))):
          logging.warning('Taking over the stale lock %s of process %s on %s, which is no longer running.', path,
                          holder.get('pid'), holder.get('host'))
          try:
            os.rename(path, path.parent / f'{path.name}.stale.{os.getpid()}')  # Only one taker wins the rename.
            os.unlink(path.parent / f'{path.name}.stale.{os.getpid()}')
          except FileNotFoundError:
            pass
          continue
        where = 'on this host' if holder.get('host') == self._me['host'] else f'on host {holder.get("host")}'
        raise WorkdirLockedError(
            f'Workdir {path.parent} is in use by process {holder.get("pid")} {where} (since '
            f'{holder.get("started", "?")}; lock file {path}). Two runs in one workdir would overwrite each '
            'other\'s checkpoints. Wait for it to finish or stop it, or use another --workdir. If that process is '
            'gone (e.g. its host was lost), delete the lock file.')
      raise WorkdirLockedError(f'Could not take the lock {path}: it keeps changing hands.')
    finally:
      tmp.unlink(missing_ok=True)

  @staticmethod
  def _holder(path: pathlib.Path) -> Optional[dict[str, Any]]:
    try:
      return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
      return None

  def release(self) -> None:
    if not self._held:
      return
    path = pathlib.Path(os.fspath(self._path))
    holder = self._holder(path) or {}
    if (holder.get('host'), holder.get('pid')) == (self._me['host'], self._me['pid']):  # Still ours.
      path.unlink(missing_ok=True)
    self._held = False

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()


# ---------------------------------------------------------------------------------------------------------------------
# The input-iterator item: each process stores its own iterator's position.


class CheckpointableIterator(Protocol):
  """An input iterator whose position is a snapshot of named byte strings (e.g. input_pipeline.TrainIterator)."""

  def get_state(self) -> dict[str, bytes]: ...

  def set_state(self, state: dict[str, bytes]) -> None: ...


class DataIteratorMismatchError(ValueError):
  """A checkpoint's input-iterator state was written by another number of processes (each reads another slice)."""


_PROCESS_COUNT_KEY = '__process_count__'  # Stored beside the iterator's own entries.


class DataIteratorHandler(ocp.handlers.CheckpointHandler):
  """Orbax handler for input-iterator snapshots: every process writes `process_{index}.npz` in the item directory.

  The snapshot is taken by the caller when `save` is requested (DataIteratorSave.capture), so the loop may draw
  more batches while Orbax writes in the background. Read back without pickle. The process count is stored too:
  with another count each process reads another slice of the data, so a snapshot would resume the wrong stream.
  """

  def save(self, directory: epath.Path, args: 'DataIteratorSave') -> None:
    arrays = {k: np.frombuffer(v, np.uint8) for k, v in args.state.items()}
    arrays[_PROCESS_COUNT_KEY] = np.asarray(jax.process_count(), np.int64)
    with (directory / f'process_{jax.process_index()}.npz').open('wb') as f:
      np.savez(f, **arrays)

  def restore(self, directory: epath.Path, args: 'DataIteratorRestore') -> CheckpointableIterator:
    path = directory / f'process_{jax.process_index()}.npz'
    if not path.exists():
      raise DataIteratorMismatchError(f'{directory} has no input-iterator state for process '
                                      f'{jax.process_index()}: it was saved by fewer processes.')
    with path.open('rb') as f, np.load(f, allow_pickle=False) as data:
      saved_count = int(data[_PROCESS_COUNT_KEY]) if _PROCESS_COUNT_KEY in data.files else jax.process_count()
      if saved_count != jax.process_count():
        raise DataIteratorMismatchError(f'{directory} was saved by {saved_count} processes, not '
                                        f'{jax.process_count()}.')
      args.iterator.set_state({k: data[k].tobytes() for k in data.files if k != _PROCESS_COUNT_KEY})
    return args.iterator


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
  state: dict[str, bytes]

  @classmethod
  def capture(cls, iterator: CheckpointableIterator) -> DataIteratorSave:
    return cls(iterator.get_state())


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
  iterator: CheckpointableIterator


# ---------------------------------------------------------------------------------------------------------------------
# Integrity: manifests, parameter-shape checks.


def _files(directory: epath.Path) -> list[epath.Path]:
  """Every file under `directory` (epath has no recursive glob on all backends)."""
  out = []
  for path in directory.iterdir():
    out.extend(_files(path) if path.is_dir() else [path])
  return out


_DIGEST_CHUNK_BYTES = 16 << 20  # Files are hashed in chunks: checkpoint shards can be gigabytes.


# Written by Orbax when it commits a step, after the manifest (commit timestamp, success marker): not covered.
_COMMIT_FILES = ('_CHECKPOINT_METADATA', 'commit_success.txt')


def _file_digests(step_dir: epath.Path) -> dict[str, list[Any]]:
  """{relative path: [size, sha256]} of every file of a checkpoint step but Orbax's commit records."""
  out = {}
  for path in sorted(_files(step_dir)):
    if path.name in _COMMIT_FILES and path.parent == step_dir:
      continue
    digest, size = hashlib.sha256(), 0
    with path.open('rb') as f:
      while chunk := f.read(_DIGEST_CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
    out[str(path.relative_to(step_dir))] = [size, digest.hexdigest()]
  return out


def _manifest_problem(step_dir: epath.Path, manifest_file: epath.Path) -> Optional[str]:
  """None when `step_dir` matches its manifest (or has none: the caller decides how far to trust such a step);
  else what differs."""
  if not manifest_file.exists():
    return None
  try:
    expected = json.loads(manifest_file.read_text())['files']
  except (ValueError, KeyError) as e:
    return f'its manifest {manifest_file} is unreadable ({e})'
  # Manifests written before they moved into the save's finalisation also list Orbax's commit records, which are
  # not covered now: they are left out of the comparison, so those checkpoints still verify.
  expected = {k: v for k, v in expected.items() if k not in _COMMIT_FILES}
  actual = _file_digests(step_dir)
  missing = sorted(set(expected) - set(actual))
  changed = sorted(k for k in expected if k in actual and actual[k] != expected[k])
  if missing or changed:
    return f'files missing: {missing[:5]}, files changed (size or sha256): {changed[:5]}'
  return None


def _key_name(entry: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{'a/b/c': shape} for every leaf; names are the same for a live state and Orbax's metadata of it."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(_key_name(e) for e in path): tuple(getattr(leaf, 'shape', ())) for path, leaf in flat}


def check_same_structure(saved: Any, expected: Any, what: str) -> None:
  """Raises CheckpointMismatchError listing every missing, unexpected or mis-shaped leaf of `saved` vs `expected`."""
  saved, expected = _tree_shapes(saved), _tree_shapes(expected)
  order = lambda keys: sorted(keys, key=lambda k: ('params' not in k.split('/')[:1], k))  # Params first.
  missing = order(set(expected) - set(saved))
  unexpected = order(set(saved) - set(expected))
  wrong = [f'{k}: checkpoint {saved[k]} vs model {expected[k]}' for k in order(set(saved) & set(expected))
           if saved[k] != expected[k]]
  if missing or unexpected or wrong:
    lines = ([f'missing from the checkpoint: {k}' for k in missing] + [f'not in the model: {k}' for k in unexpected]
             + [f'shape differs: {w}' for w in wrong])
    shown = '\n  '.join(lines[:40]) + (f'\n  ... and {len(lines) - 40} more' if len(lines) > 40 else '')
    raise CheckpointMismatchError(
        f'{what} does not match the model being trained ({len(lines)} mismatching parameters):\n  {shown}\n'
        'Nothing was loaded. Use the config (model and image size) that wrote this checkpoint, or a new workdir.')


def _all_finite(tree: Any) -> bool:
  """True when every floating-point leaf of `tree` is finite (reduced on device, one bool per leaf fetched)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(getattr(x, 'dtype', np.int32), jnp.floating)]
  return all(bool(jnp.isfinite(x).all()) for x in leaves)


def _any_process(flag: bool) -> bool:
  """True on every process if `flag` is True on any (multi-host runs must take the same branch)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


# ---------------------------------------------------------------------------------------------------------------------
# The checkpointer.


@dataclasses.dataclass
class Restored:
  """What `Checkpointer.restore_latest_valid` found: the step, the train state and the trainer's loop record."""
  step: int
  state: Any
  loop: dict[str, Any]
  data_restored: bool


class Checkpointer:
  """Saves and restores train state, input position and loop record under WORKDIR/checkpoints (newest `keep`)."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    self._workdir = epath.Path(workdir)
    self._root = self._workdir / CHECKPOINT_DIRNAME
    self._async = async_save
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._on_save_finalized))
    self._manager = self._new_manager()
    self._pending: list[int] = []  # Steps whose save is in flight (their manifest is not written yet).
    self._pending_lock = threading.Lock()

  def _new_manager(self) -> ocp.CheckpointManager:
    handlers = {STATE_ITEM: ocp.StandardCheckpointHandler(), DATA_ITEM: DataIteratorHandler(),
                LOOP_ITEM: ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(self._root, options=self._options, item_handlers=handlers)

  @property
  def directory(self) -> epath.Path:
    return self._root

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return self._root / str(step)

  def _manifest_file(self, step: int) -> epath.Path:
    return self._root / MANIFEST_DIRNAME / f'{step}.json'

  # -- saving ---------------------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, *, data_iterator: Optional[CheckpointableIterator] = None,
           loop: Optional[dict[str, Any]] = None) -> None:
    """Starts an asynchronous save of `step` (a no-op if that step is already saved).

    The input iterator's position is written before this returns, so the caller may go on drawing batches. The
    step's manifest is written in the save's own finalisation, before the step gets its final name, so every
    finished step has one.
    """
    if step in self._manager.all_steps():
      return
    items = {STATE_ITEM: ocp.args.StandardSave(state), LOOP_ITEM: ocp.args.JsonSave(loop or {})}
    if data_iterator is not None:
      items[DATA_ITEM] = DataIteratorSave.capture(data_iterator)
    with self._pending_lock:
      self._pending.append(step)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    if not self._async:  # No finalisation callback: the step is final now.
      self._write_manifest(step, self.step_dir(step))
      with self._pending_lock:
        self._pending.remove(step)

  def _on_save_finalized(self) -> None:
    """Orbax's post-finalisation callback (primary process, after every process has written its files, before
    the temporary directory is renamed to the step): records each pending step's manifest."""
    with self._pending_lock:
      pending = list(self._pending)
    for step in pending:
      tmp = self._root / f'{step}{_ORBAX_TMP_SUFFIX}'
      if tmp.exists():
        self._write_manifest(step, tmp)
        with self._pending_lock:
          self._pending.remove(step)

  def _write_manifest(self, step: int, step_dir: epath.Path) -> None:
    """The size and sha256 of every file of `step` (read from `step_dir`), written atomically (process 0)."""
    if jax.process_index() != 0:
      return
    manifest = self._manifest_file(step)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(manifest, json.dumps({'step': step, 'files': _file_digests(step_dir)}, indent=1))

  def _remove_stale_manifests(self) -> None:
    """Deletes the manifests of steps that keep-N has removed."""
    directory = self._root / MANIFEST_DIRNAME
    if jax.process_index() != 0 or not directory.exists():
      return
    existing = set(self._manager.all_steps())
    for manifest in directory.glob('*.json'):
      if manifest.stem.isdigit() and int(manifest.stem) not in existing:
        manifest.unlink()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()
    with self._pending_lock:
      missed, self._pending = [step for step in self._pending if step in self._manager.all_steps()], []
    for step in missed:  # The finalisation callback did not find the step's temporary directory.
      logging.warning('Checkpoint %s: writing its manifest after the save.', self.step_dir(step))
      self._write_manifest(step, self.step_dir(step))
    self._remove_stale_manifests()

  def close(self) -> None:
    self.wait_until_finished()
    self._manager.close()

  # -- restoring ------------------------------------------------------------------------------------------------

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores the train state of `step` (default: latest) into the shapes/shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    self._check_state_structure(step, abstract_state)
    logging.info('Restoring checkpoint at step %d.', step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardRestore(abstract_state)}))
    return restored[STATE_ITEM]

  def _check_state_structure(self, step: int, abstract_state: Any) -> None:
    metadata = self._manager.item_metadata(step)[STATE_ITEM]
    check_same_structure(metadata, abstract_state, f'Checkpoint {self.step_dir(step)}')

  def restore_latest_valid(self, abstract_state: Any, *,
                           data_iterator: Optional[CheckpointableIterator] = None) -> Optional[Restored]:
    """Restores the newest step that is intact; corrupt newer steps are then moved aside with a warning.

    Returns None when there are no checkpoints. When every step fails, nothing is moved and CheckpointRestoreError
    is raised: a cause common to all steps (memory, a changed environment) must not look like a fresh start. A
    checkpoint whose parameters do not fit `abstract_state` raises CheckpointMismatchError (a wrong config, not
    corruption). An input-iterator state that cannot be restored (e.g. another process count) is not corruption
    either: the train state is restored and `data_restored` is False.
    """
    self._warn_about_unfinished_saves()
    failed: list[tuple[int, Exception]] = []
    steps = sorted(self._manager.all_steps(), reverse=True)
    # A step without a manifest cannot be verified (e.g. its manifests were deleted): an older step that has one is
    # preferred; failing that, the step is used only after a verified restore, and its manifest is rebuilt.
    unverified = {step for step in steps if _any_process(jax.process_index() == 0 and
                                                         not self._manifest_file(step).exists())}
    for step in steps:
      if step in unverified and any(older < step and older not in unverified for older in steps):
        failed.append((step, IOError('it has no manifest, so its files cannot be verified (its manifest was lost, '
                                     'or the run was killed while saving it)')))
        continue
      error, metadata, present = self._integrity_error(step)
      if _any_process(error is not None):  # Every process takes the same branch.
        failed.append((step, error or IOError('a problem found by another process')))
        continue
      check_same_structure(metadata[STATE_ITEM], abstract_state, f'Checkpoint {self.step_dir(step)}')
      args = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
      if LOOP_ITEM in present:
        args[LOOP_ITEM] = ocp.args.JsonRestore()
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**args))
        if step in unverified and not _all_finite(restored[STATE_ITEM]):
          raise FloatingPointError('it has no manifest and holds non-finite values')
      except Exception as e:  # pylint: disable=broad-except
        error = e
      if _any_process(error is not None):
        failed.append((step, error or IOError('restore failed on another process')))
        continue
      for bad_step, bad_error in failed:  # An older step restored, so the newer ones are corrupt: move them aside.
        self._quarantine(bad_step, bad_error)
      if step in unverified:
        logging.warning('Checkpoint %s has no manifest (deleted, or written by an older vit_jax) and no older step '
                        'has one, so its files cannot be checked against their checksums. It restored and its '
                        'values are finite; its manifest is rebuilt from it now.', self.step_dir(step))
        self._write_manifest(step, self.step_dir(step))
      logging.info('Restored checkpoint %s.', self.step_dir(step))
      return Restored(step=step, state=restored[STATE_ITEM], loop=dict(restored.get(LOOP_ITEM) or {}),
                      data_restored=self._restore_data(step, present, data_iterator))
    if failed:
      step, error = failed[0]
      raise CheckpointRestoreError(
          f'No checkpoint in {self._root} could be restored (steps {[s for s, _ in failed]}; the newest failed with '
          f'{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ""}). Nothing was moved '
          'or deleted, and the run does not start again from step 0 over them. Fix the cause (memory, devices, '
          'package versions) and rerun, or start in a new --workdir.')
    return None

  def _integrity_error(self, step: int) -> tuple[Optional[Exception], Any, set[str]]:
    """(this process's problem with `step` or None, its item metadata, the items present)."""
    try:
      # Process 0 checks the manifest (one read of the files, not one per process) and tells the others.
      problem = None
      if jax.process_index() == 0:
        problem = _manifest_problem(self.step_dir(step), self._manifest_file(step))
      if _any_process(problem is not None):
        raise IOError(problem or 'manifest mismatch found by process 0')
      metadata = self._manager.item_metadata(step)
      present = {k for k in (STATE_ITEM, DATA_ITEM, LOOP_ITEM) if (self.step_dir(step) / k).exists()}
      if STATE_ITEM not in present or metadata.get(STATE_ITEM) is None:
        raise IOError(f'no readable {STATE_ITEM!r} item')
    except Exception as e:  # pylint: disable=broad-except
      return e, None, set()
    return None, metadata, present

  def _restore_data(self, step: int, present: set[str], data_iterator: Optional[CheckpointableIterator]) -> bool:
    """Restores the input iterator's position from `step`; False (with a warning) when it cannot."""
    if data_iterator is None:
      return False
    error: Optional[Exception] = None
    if DATA_ITEM not in present:
      error = IOError('no input-iterator state (written by an older vit_jax)')
    else:
      try:
        self._manager.restore(step, args=ocp.args.Composite(**{DATA_ITEM: DataIteratorRestore(data_iterator)}))
      except Exception as e:  # pylint: disable=broad-except
        error = e
    if _any_process(error is not None):
      logging.warning('Checkpoint %s: the input-iterator position was not restored (%s: %s). The train state is; '
                      'the input pipeline starts again with a new seed, so this resume is not exact.',
                      self.step_dir(step), type(error).__name__ if error else 'IOError',
                      str(error).splitlines()[0][:300] if error and str(error) else 'on another process')
      return False
    return True

  def _quarantine(self, step: int, error: Exception) -> None:
    """Moves a corrupt step out of the checkpoint directory (kept for inspection) and warns, naming both paths."""
    source = self.step_dir(step)
    target = self._workdir / QUARANTINE_DIRNAME / f'{step}-{time.strftime("%Y%m%d-%H%M%S")}'
    logging.warning('Checkpoint %s is incomplete or corrupt (%s: %s). Skipping it in favour of an earlier '
                    'checkpoint; it is moved, not deleted, to %s.', source, type(error).__name__,
                    str(error).splitlines()[0][:300] if str(error) else '', target)
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      source.rename(target)
      manifest = self._manifest_file(step)
      if manifest.exists():
        manifest.rename(target.parent / f'{target.name}.manifest.json')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'vit_jax_quarantine_{step}')
    self._manager.close()
    self._manager = self._new_manager()

  def _warn_about_unfinished_saves(self) -> None:
    if not self._root.exists():
      return
    leftovers = sorted(p.name for p in self._root.iterdir() if 'orbax-checkpoint-tmp' in p.name)
    if leftovers:
      logging.warning('Unfinished saves from an interrupted run are ignored (safe to delete): %s in %s.',
                      ', '.join(leftovers), self._root)

  def reached_preemption(self, step: int) -> bool:
    """True (on every process at the same step) when the multi-host preemption sync point is reached."""
    return self._manager.reached_preemption(step)

