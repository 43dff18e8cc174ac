"""Train-state checkpoints (Orbax: async save, resume, keep-N) and the workdir's run identity.

Pretrained-weight loading lives in `vit_jax.pretrained`; `load_pretrained` is re-exported here because callers
think of it as "loading a checkpoint".
"""
from __future__ import annotations

import json
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from vit_jax.pretrained import load_pretrained  # noqa: F401  (public re-export)

CONFIG_FILENAME = 'config.json'
CHECKPOINT_DIRNAME = 'checkpoints'


class WorkdirConflictError(RuntimeError):
  """The workdir holds a run that the current config would overwrite."""


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """Human-readable 'key: old -> new' lines for every leaf that differs between two config dicts."""
  old_flat, new_flat = _flatten(old), _flatten(new)
  missing = object()
  return [f'{k}: {old_flat.get(k, missing)!r} -> {new_flat.get(k, missing)!r}'.replace(repr(missing), '<absent>')
          for k in sorted(set(old_flat) | set(new_flat)) if old_flat.get(k, missing) != new_flat.get(k, missing)]


def claim_workdir(workdir: str, config: ml_collections.ConfigDict) -> bool:
  """Records `config` as the workdir's run, or checks that it is the run already there.

  Returns True when the workdir already holds this run (so training resumes). Raises WorkdirConflictError, and
  changes nothing, when the workdir holds a different config or checkpoints of unknown origin.
  """
  path = epath.Path(workdir)
  config_file = path / CONFIG_FILENAME
  current = json.loads(config.to_json_best_effort())
  if config_file.exists():
    previous = json.loads(config_file.read_text())
    diffs = config_differences(previous, current)
    if diffs:
      raise WorkdirConflictError(
          f'Workdir {workdir} holds a run with a different config:\n  ' + '\n  '.join(diffs) +
          '\nNothing was changed. Use a new --workdir for the new config, or rerun with the original config to '
          'resume.')
    return True
  if (path / CHECKPOINT_DIRNAME).exists() and any((path / CHECKPOINT_DIRNAME).iterdir()):
    raise WorkdirConflictError(
        f'Workdir {workdir} holds checkpoints but no {CONFIG_FILENAME}, so its run cannot be identified. '
        'Nothing was changed. Use a new --workdir.')
  if jax.process_index() == 0:
    path.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(current, indent=2, sort_keys=True))
  return False


class Checkpointer:
  """Saves and restores the train state under WORKDIR/checkpoints, keeping the newest `keep` steps."""

  def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(epath.Path(workdir) / CHECKPOINT_DIRNAME, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def restore(self, abstract_state: Any, step: Optional[int] = None) -> Any:
    """Restores `step` (default: latest) into the shapes, dtypes and shardings of `abstract_state`."""
    step = self.latest_step() if step is None else step
    logging.info('Restoring checkpoint at step %d.', step)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def save(self, step: int, state: Any) -> None:
    """Starts an asynchronous save of `state` as `step` (a no-op if that step is already saved)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
