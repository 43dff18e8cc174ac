"""Reliability: exact resume after preemption or a corrupt checkpoint, and the non-finite guard."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vit_jax import checkpoint, guards, input_pipeline, optim, preemption, train
from tests.test_train import ROOT, _main_cmd, tiny_config
from tests import xla_env

# Wall-clock fields; every other field of final_metrics.json must be identical between interrupted and not.
TIME_FIELDS = ('train_seconds', 'resumed_from_step')


def _same_metrics(a, b):
  strip = lambda d: {k: v for k, v in d.items() if k not in TIME_FIELDS}
  return strip(a) == strip(b)


def _params(workdir, step):
  return ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(step) / 'default')['params']


def _assert_bitwise_equal(a, b):
  flat_a, flat_b = checkpoint._tree_shapes(a), checkpoint._tree_shapes(b)  # pylint: disable=protected-access
  assert flat_a == flat_b
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


class _Hooked:
  """Wraps the train iterator: calls `hook(n, batch)` on the n-th batch this process draws; keeps save/restore."""

  def __init__(self, inner, hook):
    self._inner, self._hook, self._n = inner, hook, 0

  def __iter__(self):
    return self

  def __next__(self):
    self._n += 1
    return self._hook(self._n, next(self._inner))

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


def _hook_iterator(monkeypatch, hook):
  original = input_pipeline.create_train_iterator
  monkeypatch.setattr(input_pipeline, 'create_train_iterator', lambda *a, **k: _Hooked(original(*a, **k), hook))


@pytest.fixture(scope='module')
def reference(digits_data_dir, tmp_path_factory):
  """An uninterrupted 20-step run (checkpoints at 10 and 20): its workdir and final metrics."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  final = train.train_and_evaluate(tiny_config(digits_data_dir), str(workdir))
  return workdir, final


@pytest.mark.slow
def test_preempted_run_resumes_exactly(digits_data_dir, reference, tmp_path, monkeypatch):
  """SIGTERM at step 7: checkpoint 7, return without final metrics; the rerun equals the uninterrupted run bitwise."""
  ref_dir, ref_final = reference
  workdir = tmp_path / 'run'

  def sigterm_at_7(n, batch):
    if n == 7:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  _hook_iterator(monkeypatch, sigterm_at_7)
  assert train.train_and_evaluate(tiny_config(digits_data_dir), str(workdir)) == {'preempted_at_step': 7}
  assert (workdir / 'checkpoints' / '7').exists() and not (workdir / 'final_metrics.json').exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, 'the SIGTERM handler must be removed afterwards'
  monkeypatch.undo()
  final = train.train_and_evaluate(tiny_config(digits_data_dir), str(workdir))
  assert final['resumed_from_step'] == 7
  assert _same_metrics(final, ref_final), (final, ref_final)
  _assert_bitwise_equal(_params(workdir, 20), _params(ref_dir, 20))


@pytest.mark.slow
def test_truncated_latest_checkpoint_falls_back_to_previous(reference, digits_data_dir, tmp_path, caplog):
  """A truncated file in checkpoint 20 is detected; the run resumes from 10, moves 20 aside, and ends the same."""
  ref_dir, ref_final = reference
  workdir = tmp_path / 'run'
  shutil.copytree(ref_dir, workdir)
  before = (workdir / 'final_metrics.json').read_text()
  assert train.train_and_evaluate(tiny_config(digits_data_dir), str(workdir)) == json.loads(before)  # Done: as is.
  assert (workdir / 'final_metrics.json').read_text() == before
  # The finished run keeps its final_metrics.json (and a .tmp left by a killed write): the fallback run replaces
  # both atomically and ends normally (it used to fail with FileExistsError).
  (workdir / 'final_metrics.json.tmp').write_text('{"partial')
  victim = max((p for p in (workdir / 'checkpoints' / '20' / 'default').rglob('*') if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
  with caplog.at_level('WARNING'):
    final = train.train_and_evaluate(tiny_config(digits_data_dir), str(workdir))
  assert final['resumed_from_step'] == 10
  warnings = [r.getMessage() for r in caplog.records if 'corrupt' in r.getMessage()]
  assert warnings and str(workdir / 'checkpoints' / '20') in warnings[0], warnings
  moved = list((workdir / checkpoint.QUARANTINE_DIRNAME).iterdir())
  assert any(p.name.startswith('20-') and p.is_dir() for p in moved), 'the corrupt step is kept, not deleted'
  assert _same_metrics(final, ref_final)
  assert json.loads((workdir / 'final_metrics.json').read_text()) == final
  assert not (workdir / 'final_metrics.json.tmp').exists()
  _assert_bitwise_equal(_params(workdir, 20), _params(ref_dir, 20))


def test_checkpoint_of_another_model_is_refused(digits_data_dir, tmp_path):
  """Restoring into other shapes lists the mismatching parameters (params first) and loads nothing."""
  def abstract_state(width):
    config = tiny_config(digits_data_dir, **{'model.hidden_size': width})
    model = train.build_model(config, 10)
    tx, _ = optim.create_optimizer(config.optimizer, config.total_steps)
    return jax.eval_shape(lambda: train.TrainState.create(
        apply_fn=model.apply, params=model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params'], tx=tx))

  saved = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract_state(32))
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  ckpt.save(10, saved)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=3)
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r'mismatching parameters\):\n  shape differs: '
                     r'params/Transformer/encoder_norm/bias: checkpoint \(32,\) vs model \(48,\)'):
    ckpt.restore_latest_valid(abstract_state(48))
  ckpt.close()
  assert (tmp_path / 'checkpoints' / '10').exists(), 'a mismatch is not corruption: nothing is moved'


def _nan_at(step):
  def hook(n, batch):
    if n == step:
      batch = dict(batch, image=np.full_like(batch['image'], np.nan))
    return batch
  return hook


@pytest.mark.slow
def test_nonfinite_stops_the_run_naming_the_step(digits_data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  _hook_iterator(monkeypatch, _nan_at(13))
  with pytest.raises(guards.NonFiniteError, match='at step 13.*last good checkpoint, step 10'):
    train.train_and_evaluate(tiny_config(digits_data_dir), str(workdir))
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['10']
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_params(workdir, 10)))
  assert not (workdir / 'final_metrics.json').exists()


@pytest.mark.slow
def test_nonfinite_updates_are_skipped_and_counted(digits_data_dir, tmp_path, monkeypatch):
  workdir = tmp_path / 'run'
  _hook_iterator(monkeypatch, _nan_at(13))
  final = train.train_and_evaluate(tiny_config(digits_data_dir, on_nonfinite='skip'), str(workdir))
  assert final['nonfinite_updates'] == 1 and final['step'] == 20
  assert all(np.isfinite(v) for v in final.values()), final
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_params(workdir, 20)))


def test_nonfinite_monitor_names_first_bad_step():
  monitor = guards.NonFiniteMonitor('stop', '/w')
  for step, flag in [(1, 0), (2, 0), (3, 1), (4, 1)]:
    monitor.add(step, jnp.int32(flag))
  with pytest.raises(guards.NonFiniteError, match='at step 3 \\(2 such step'):
    monitor.check(last_good_step=2)
  monitor.check(last_good_step=2)  # Flags are consumed by a check.
  skip = guards.NonFiniteMonitor('skip', '/w')
  skip.add(1, jnp.int32(1))
  skip.check(None)  # Skip mode never raises.


def _sigterm_after(cmd, env, *patterns):
  """Runs `cmd`, sends SIGTERM once stderr has shown each of `patterns` in order; returns (returncode, stderr)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  seen, todo = [], list(patterns)
  for line in proc.stderr:
    seen.append(line)
    if todo and todo[0] in line:
      todo.pop(0)
      if not todo:
        proc.send_signal(signal.SIGTERM)
        break
  rest = proc.communicate(timeout=180)[1]
  assert not todo, f'never saw {todo}: ' + ''.join(seen)[-3000:]
  return proc.returncode, ''.join(seen) + rest


@pytest.mark.slow
def test_cli_sigterm_saves_and_exits_zero(tmp_path, digits_data_dir):
  """The real CLI: SIGTERM mid-run -> checkpoint at the current step, exit 0; the rerun resumes from that step."""
  workdir = tmp_path / 'w'
  cmd = _main_cmd(workdir, digits_data_dir, '--config.total_steps=5000', '--config.checkpoint_every=10000',
                  '--config.eval_every=0', '--config.log_every=1', '--config.model.num_layers=1')
  env = xla_env.subprocess_env()
  rc, stderr = _sigterm_after(cmd, env, '/5000  loss ')  # A console step line: training has started.
  assert rc == 0, stderr[-2000:]
  saved = [int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()]
  assert len(saved) == 1 and 0 < saved[0] < 5000, saved
  assert f'Preempted (SIGTERM) at step {saved[0]} of 5000' in stderr
  assert not (workdir / 'final_metrics.json').exists()
  rc, stderr = _sigterm_after(cmd, env, f'Resumed from step {saved[0]} of 5000', '/5000  loss ')
  assert rc == 0, stderr[-2000:]
  later = max(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert later > saved[0] and f'Preempted (SIGTERM) at step {later} of 5000' in stderr


def test_no_pickle_on_any_load_path():
  """Static check of the package: np.load always with allow_pickle=False; no pickle/torch/dill loads at all."""
  import ast  # pylint: disable=g-import-not-at-top
  offences = []
  for path in sorted((ROOT / 'vit_jax').rglob('*.py')):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import | ast.ImportFrom):
        names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
        offences += [f'{path.name}: imports {n}' for n in names if n and n.split('.')[0] in ('pickle', 'dill')]
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ('load', 'loads'):
        owner = getattr(node.func.value, 'id', None)
        if owner in ('pickle', 'torch', 'dill', 'cloudpickle', 'joblib'):
          offences.append(f'{path.name}:{node.lineno}: {owner}.{node.func.attr}')
        if owner in ('np', 'numpy') and not any(k.arg == 'allow_pickle' and getattr(k.value, 'value', None) is False
                                                 for k in node.keywords):
          offences.append(f'{path.name}:{node.lineno}: np.load without allow_pickle=False')
  assert not offences, offences


# Second pass (issue 15): failures found by trying the loop as a careless or hostile user would.


def _short(data_dir, **overrides):
  """tiny_config cut to a few steps with a checkpoint every step and no periodic eval."""
  return tiny_config(data_dir, **{'total_steps': 2, 'log_every': 1, 'eval_every': 0, 'checkpoint_every': 1,
                                  'optimizer.warmup_steps': 0, **overrides})


def test_overflowing_update_is_caught_at_step_1(digits_data_dir, tmp_path):
  """lr=1e39 is inf in float32: loss and gradient norm of step 1 are finite but the updated params are not. Stop
  mode names step 1 and saves nothing; skip mode keeps finite params and reports finite metrics."""
  with pytest.raises(guards.NonFiniteError, match='at step 1 .*No checkpoint had been saved yet'):
    train.train_and_evaluate(_short(digits_data_dir, **{'optimizer.lr': 1e39}), str(tmp_path / 'stop'))
  assert not any(p.name.isdigit() for p in (tmp_path / 'stop' / 'checkpoints').iterdir())
  final = train.train_and_evaluate(_short(digits_data_dir, on_nonfinite='skip', **{'optimizer.lr': 1e39}),
                                   str(tmp_path / 'skip'))
  # Every value is finite but the learning rate itself (1e39 is inf in float32): the model and its scores are.
  assert final['nonfinite_updates'] == 2 and final['train_learning_rate'] == np.inf, final
  assert all(np.isfinite(v) for k, v in final.items() if k != 'train_learning_rate'), final
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_params(tmp_path / 'skip', 2)))


@pytest.mark.parametrize('overrides,match', [({'dataset.train_crop': 'inceptoin'}, 'train_crop'),
                                             ({'init_from': '/no/such/weights.npz'}, 'weights.npz')])
def test_failed_start_leaves_the_workdir_free(digits_data_dir, tmp_path, overrides, match):
  """Bad input that only the data pipeline or the weight loader detects fails before the workdir is claimed, so
  the corrected rerun is not refused as another run's workdir."""
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with pytest.raises(Exception, match=match):
    train.train_and_evaluate(_short(digits_data_dir, **overrides), str(workdir))
  assert not (workdir / 'config.json').exists() and not (workdir / checkpoint.LOCK_FILENAME).exists()
  assert checkpoint.claim_workdir(str(workdir), _short(digits_data_dir)) is False  # The fixed rerun may claim it.


def test_second_run_in_a_locked_workdir_is_refused(digits_data_dir, tmp_path):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  holder = subprocess.Popen(['sleep', '60'])
  try:
    (workdir / checkpoint.LOCK_FILENAME).write_text(json.dumps({'host': socket.gethostname(),
                                                                'pid': holder.pid, 'started': 'now'}))
    with pytest.raises(checkpoint.WorkdirLockedError, match=f'in use by process {holder.pid} on this host'):
      train.train_and_evaluate(_short(digits_data_dir), str(workdir))
    assert not (workdir / 'config.json').exists()
  finally:
    holder.kill()
    holder.wait()


def test_ctrl_c_checkpoints(digits_data_dir, tmp_path, monkeypatch):
  """SIGINT is a preemption: the run checkpoints the step it is on and returns (it used to exit with nothing)."""
  def sigint_at_3(n, batch):
    if n == 3:
      os.kill(os.getpid(), signal.SIGINT)
    return batch

  _hook_iterator(monkeypatch, sigint_at_3)
  before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a pytest-xdist worker.
  config = _short(digits_data_dir, total_steps=6, checkpoint_every=100)
  assert train.train_and_evaluate(config, str(tmp_path / 'run')) == {'preempted_at_step': 3}
  assert (tmp_path / 'run' / 'checkpoints' / '3').exists()
  assert signal.getsignal(signal.SIGINT) is before


def test_second_ctrl_c_stops_at_once():
  """The first SIGINT asks for a checkpoint; a second one raises KeyboardInterrupt at once. Handlers restored."""
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}  # xdist workers ignore SIGINT.
  with preemption.PreemptionWatcher() as watcher:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.01)  # The handler runs here.
    assert watcher.requested and watcher(5) and watcher.reason == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert {sig: signal.getsignal(sig) for sig in before} == before


def test_sigterm_before_training_stops_cleanly(digits_data_dir, tmp_path, monkeypatch):
  """A SIGTERM while the run is still being built: it returns before claiming or writing anything."""
  original = input_pipeline.create_train_iterator

  def sigterm_then_build(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(input_pipeline, 'create_train_iterator', sigterm_then_build)
  assert train.train_and_evaluate(_short(digits_data_dir), str(tmp_path / 'run')) == {'preempted_at_step': 0}
  assert not (tmp_path / 'run').exists()
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
