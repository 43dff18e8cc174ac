"""Workdir identity: a run resumes only into its own workdir and never overwrites another run."""
import json

import pytest

from vit_jax import checkpoint
from vit_jax.config_schema import base_config


def test_claim_records_and_recognises_the_run(tmp_path):
  config = base_config()
  assert checkpoint.claim_workdir(str(tmp_path), config) is False
  assert json.loads((tmp_path / 'config.json').read_text())['total_steps'] == config.total_steps
  assert checkpoint.claim_workdir(str(tmp_path), config) is True


def test_different_config_is_refused_and_nothing_changes(tmp_path):
  config = base_config()
  checkpoint.claim_workdir(str(tmp_path), config)
  before = (tmp_path / 'config.json').read_text()
  other = base_config()
  other.optimizer.lr = 0.5
  with pytest.raises(checkpoint.WorkdirConflictError, match=r'optimizer.lr: 0.001 -> 0.5'):
    checkpoint.claim_workdir(str(tmp_path), other)
  assert (tmp_path / 'config.json').read_text() == before


def test_fields_added_after_the_run_began_are_accepted_at_their_defaults(tmp_path):
  """A run started before the code gained a config field resumes when the field is at its default, and is
  refused when it is not."""
  config = base_config()
  checkpoint.claim_workdir(str(tmp_path), config)
  stored = json.loads((tmp_path / 'config.json').read_text())
  del stored['dataset']['modality']  # As written by a version of the code without this field.
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  with pytest.raises(checkpoint.WorkdirConflictError, match=r'dataset.modality: <absent> -> .image.'):
    checkpoint.claim_workdir(str(tmp_path), config)  # Without the schema's defaults, nothing is assumed.
  assert checkpoint.claim_workdir(str(tmp_path), config, defaults=base_config()) is True
  changed = base_config()
  changed.dataset.modality = 'video'
  with pytest.raises(checkpoint.WorkdirConflictError, match=r'dataset.modality: <absent> -> .video.'):
    checkpoint.claim_workdir(str(tmp_path), changed, defaults=base_config())


def test_checkpoints_without_config_are_refused(tmp_path):
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  with pytest.raises(checkpoint.WorkdirConflictError, match='cannot be identified'):
    checkpoint.claim_workdir(str(tmp_path), base_config())
  assert not (tmp_path / 'config.json').exists()


def test_config_differences_lists_added_and_removed_keys():
  diffs = checkpoint.config_differences({'a': 1, 'b': {'c': 2}}, {'a': 1, 'b': {'d': 3}})
  assert diffs == ['b.c: 2 -> <absent>', 'b.d: <absent> -> 3']


# Verified restore: corrupt newest steps are detected, moved aside (never deleted) and the previous one is used.

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


class _Iter:
  def __init__(self, n=0):
    self.n = n

  def get_state(self):
    return {'.pos': str(self.n).encode()}

  def set_state(self, state):
    self.n = int(state['.pos'].decode())


def _save_steps(workdir, steps):
  ckpt = checkpoint.Checkpointer(str(workdir), keep=5)
  for s in steps:
    ckpt.save(s, {'w': jnp.full((4,), float(s))}, data_iterator=_Iter(s), loop={'step': s})
  ckpt.close()


@pytest.mark.parametrize('manifest', [True, False], ids=['with_manifest', 'restore_fails'])
def test_corrupt_latest_step_falls_back(tmp_path, caplog, manifest):
  _save_steps(tmp_path, [1, 2])
  assert (tmp_path / 'checkpoints' / 'manifests' / '2.json').exists()
  if not manifest:  # As if killed between the save and its manifest: detection must come from the restore itself.
    (tmp_path / 'checkpoints' / 'manifests' / '2.json').unlink()
  files = sorted((p for p in (tmp_path / 'checkpoints' / '2' / 'default').rglob('*') if p.is_file()),
                 key=lambda p: -p.stat().st_size)
  for f in files[:3]:
    f.write_bytes(f.read_bytes()[:f.stat().st_size // 3])
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  it = _Iter()
  with caplog.at_level('WARNING'):
    restored = ckpt.restore_latest_valid({'w': jnp.zeros((4,))}, data_iterator=it)
  assert restored.step == 1 and it.n == 1 and restored.loop == {'step': 1}
  np.testing.assert_array_equal(restored.state['w'], np.ones(4))
  assert any(str(tmp_path / 'checkpoints' / '2') in r.getMessage() and 'corrupt' in r.getMessage()
             for r in caplog.records)
  assert ckpt.all_steps() == [1]
  assert [p.name.split('-')[0] for p in (tmp_path / checkpoint.QUARANTINE_DIRNAME).iterdir() if p.is_dir()] == ['2']
  ckpt.save(2, {'w': jnp.full((4,), 2.0)}, data_iterator=it)  # The step can be written again.
  ckpt.close()


def test_intact_checkpoint_restores_state_iterator_and_loop(tmp_path):
  _save_steps(tmp_path, [3])
  (tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp-123').mkdir()  # A save killed half-way: ignored.
  it = _Iter()
  restored = checkpoint.Checkpointer(str(tmp_path), keep=5).restore_latest_valid({'w': jnp.zeros((4,))},
                                                                                 data_iterator=it)
  assert (restored.step, it.n, restored.loop, restored.data_restored) == (3, 3, {'step': 3}, True)
  assert (tmp_path / 'checkpoints' / '4.orbax-checkpoint-tmp-123').exists()


class _RefusingIter(_Iter):
  def set_state(self, state):
    raise RuntimeError('iterator format changed')


def test_unrestorable_iterator_position_keeps_every_checkpoint(tmp_path, caplog):
  """A failing input-iterator restore is not corruption: the state restores, no step is moved aside."""
  _save_steps(tmp_path, [10, 20])
  with caplog.at_level('WARNING'):
    restored = checkpoint.Checkpointer(str(tmp_path), keep=5).restore_latest_valid(
        {'w': jnp.zeros((4,))}, data_iterator=_RefusingIter())
  assert (restored.step, restored.data_restored) == (20, False)
  np.testing.assert_array_equal(restored.state['w'], np.full(4, 20.0))
  assert any('iterator format changed' in r.getMessage() for r in caplog.records)
  assert not (tmp_path / checkpoint.QUARANTINE_DIRNAME).exists()


def test_iterator_position_of_another_process_count_is_not_restored(tmp_path):
  _save_steps(tmp_path, [10])
  [npz] = (tmp_path / 'checkpoints' / '10' / checkpoint.DATA_ITEM).glob('process_0.npz')
  with np.load(npz) as data:
    arrays = dict(data)
  arrays['__process_count__'] = np.asarray(2)  # As if two processes had saved it.
  np.savez(npz, **arrays)
  (tmp_path / 'checkpoints' / 'manifests' / '10.json').unlink()  # The edit is not corruption here.
  it = _Iter(-1)
  restored = checkpoint.Checkpointer(str(tmp_path), keep=5).restore_latest_valid({'w': jnp.zeros((4,))},
                                                                                 data_iterator=it)
  assert (restored.step, restored.data_restored, it.n) == (10, False, -1)


def test_when_every_step_fails_nothing_is_moved_and_the_run_does_not_restart(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for step in (1, 2):
    for f in (p for p in (tmp_path / 'checkpoints' / str(step) / 'default').rglob('*') if p.is_file()):
      f.write_bytes(f.read_bytes()[:f.stat().st_size // 3])
  with pytest.raises(checkpoint.CheckpointRestoreError, match=r'steps \[2, 1\].*Nothing was moved'):
    checkpoint.Checkpointer(str(tmp_path), keep=5).restore_latest_valid({'w': jnp.zeros((4,))},
                                                                        data_iterator=_Iter())
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()) == ['1', '2']
  assert not (tmp_path / checkpoint.QUARANTINE_DIRNAME).exists()


def test_wrong_shapes_list_the_parameters(tmp_path):
  _save_steps(tmp_path, [1])
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  with pytest.raises(checkpoint.CheckpointMismatchError,
                     match=r'shape differs: w: checkpoint \(4,\) vs model \(5,\)\n  not in the model|'
                           r'missing from the checkpoint: v.*\n.*shape differs: w'):
    ckpt.restore_latest_valid({'w': jnp.zeros((5,)), 'v': jnp.zeros(())})
  assert ckpt.all_steps() == [1]


def test_garbage_config_json_is_named(tmp_path):
  (tmp_path / 'config.json').write_text('{"seed": 0,')
  with pytest.raises(ValueError, match=f'{tmp_path / "config.json"} is not valid JSON'):
    checkpoint.claim_workdir(str(tmp_path), base_config())


def test_atomic_write_replaces_target_and_leftover_tmp(tmp_path):
  target = tmp_path / 'final_metrics.json'
  target.write_text('old')
  (tmp_path / 'final_metrics.json.tmp').write_text('left by a killed run')
  checkpoint.write_text_atomic(target, 'new')
  assert target.read_text() == 'new' and not (tmp_path / 'final_metrics.json.tmp').exists()


# Manifests: written by the save itself; a step without one is not trusted silently.


def test_manifest_exists_when_the_save_completes(tmp_path):
  """Before any later save or close (as after a kill -9 right after the save), the step has its manifest."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  ckpt.save(1, {'w': jnp.ones((4,))}, data_iterator=_Iter(1))
  ckpt._manager.wait_until_finished()  # pylint: disable=protected-access  (Orbax's own completion, nothing of ours)
  assert (tmp_path / 'checkpoints' / 'manifests' / '1.json').exists()
  ckpt.close()


def _flip_a_byte(step_dir):
  """Flips one byte of the largest array file: Orbax still restores it, with other values."""
  victim = max((p for p in (step_dir / 'default').rglob('*') if p.is_file() and p.parent.name == 'd'),
               key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[-1] ^= 0xFF
  victim.write_bytes(bytes(data))


def test_step_without_manifest_falls_back_to_a_verified_one(tmp_path, caplog):
  _save_steps(tmp_path, [1, 2])
  (tmp_path / 'checkpoints' / 'manifests' / '2.json').unlink()  # E.g. killed between the save and its manifest.
  _flip_a_byte(tmp_path / 'checkpoints' / '2')
  with caplog.at_level('WARNING'):
    restored = checkpoint.Checkpointer(str(tmp_path), keep=5).restore_latest_valid({'w': jnp.zeros((4,))},
                                                                                   data_iterator=_Iter())
  assert restored.step == 1
  assert any('no manifest' in r.getMessage() and str(tmp_path / 'checkpoints' / '2') in r.getMessage()
             for r in caplog.records)


def test_deleted_manifests_are_rebuilt_with_a_warning(tmp_path, caplog):
  _save_steps(tmp_path, [1, 2])
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / 'checkpoints' / 'manifests')
  with caplog.at_level('WARNING'):
    restored = checkpoint.Checkpointer(str(tmp_path), keep=5).restore_latest_valid({'w': jnp.zeros((4,))},
                                                                                   data_iterator=_Iter())
  assert restored.step == 2
  assert any('has no manifest' in r.getMessage() and 'rebuilt' in r.getMessage() for r in caplog.records)
  assert (tmp_path / 'checkpoints' / 'manifests' / '2.json').exists()


def test_manifests_of_older_versions_listing_commit_records_still_verify(tmp_path):
  """Manifests written before they moved into the save's finalisation also list Orbax's commit records; the steps
  they describe still restore (and a flipped byte is still caught)."""
  _save_steps(tmp_path, [1, 2])
  for step in (1, 2):
    manifest_file = tmp_path / 'checkpoints' / 'manifests' / f'{step}.json'
    manifest = json.loads(manifest_file.read_text())
    manifest['files'].update({'_CHECKPOINT_METADATA': [1, 'x'], 'commit_success.txt': [1, 'y']})
    manifest_file.write_text(json.dumps(manifest))
  restored = checkpoint.Checkpointer(str(tmp_path), keep=5).restore_latest_valid({'w': jnp.zeros((4,))},
                                                                                 data_iterator=_Iter())
  assert restored.step == 2
  _flip_a_byte(tmp_path / 'checkpoints' / '2')
  restored = checkpoint.Checkpointer(str(tmp_path), keep=5).restore_latest_valid({'w': jnp.zeros((4,))},
                                                                                 data_iterator=_Iter())
  assert restored.step == 1


# The workdir lock.


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, caplog):
  import os, socket, subprocess  # pylint: disable=g-import-not-at-top,multiple-imports
  lock_file = tmp_path / checkpoint.LOCK_FILENAME
  with checkpoint.WorkdirLock(str(tmp_path)):
    assert json.loads(lock_file.read_text())['pid'] == os.getpid()
    with pytest.raises(checkpoint.WorkdirLockedError, match=f'in use by process {os.getpid()} on this host'):
      checkpoint.WorkdirLock(str(tmp_path)).acquire()
  assert not lock_file.exists(), 'released when the run ends'
  dead = subprocess.Popen(['true'])
  dead.wait()
  lock_file.write_text(json.dumps({'host': socket.gethostname(), 'pid': dead.pid}))
  with caplog.at_level('WARNING'), checkpoint.WorkdirLock(str(tmp_path)):
    assert json.loads(lock_file.read_text())['pid'] == os.getpid()
  assert any('stale lock' in r.getMessage() for r in caplog.records)
  lock_file.write_text(json.dumps({'host': 'elsewhere', 'pid': 1}))
  with pytest.raises(checkpoint.WorkdirLockedError, match='process 1 on host elsewhere'):
    checkpoint.WorkdirLock(str(tmp_path)).acquire()
