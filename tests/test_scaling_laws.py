"""Scaling-law studies: the rsqrt/constant cooldown schedule, grid expansion, few-shot probe, law fits on synthetic
ledgers, and the sweep's branch, skip and resume behaviour on tiny runs."""
import csv
import json
import pathlib
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from ml_collections.config_flags import config_flags as cf_impl

from experiments.scaling_laws import fewshot, fit, laws, ledger, runner, study as study_lib
from vit_jax import checkpoint, optim, train
from vit_jax.evaluators import fewshot as fewshot_probe
from vit_jax.config_schema import base_config
from vit_jax.models import vit

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _opt(**kw):
  c = base_config().optimizer
  c.update(kw)
  return c


# --- Schedule.


@pytest.mark.parametrize('schedule', ['constant', 'rsqrt'])
def test_cooldown_schedule(schedule):
  opt = _opt(lr=1.0, warmup_steps=10, schedule=schedule, cooldown_steps=20, rsqrt_timescale=40)
  sched = optim.create_learning_rate_schedule(opt, 100)
  np.testing.assert_allclose(float(sched(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(sched(10)), 1.0, rtol=1e-6)
  plateau = 1.0 if schedule == 'constant' else np.sqrt(40 / (50 + 40))  # Step 60: 50 steps after warmup.
  np.testing.assert_allclose(float(sched(60)), plateau, rtol=1e-5)
  at_90 = 1.0 if schedule == 'constant' else np.sqrt(40 / (80 + 40))
  np.testing.assert_allclose(float(sched(90)), 0.5 * at_90, rtol=1e-5)  # Half-way through the cooldown.
  assert float(sched(100)) == 0.0
  # Before its cooldown the lr does not depend on the run length: the basis of branching cooldowns.
  longer = optim.create_learning_rate_schedule(_opt(**{**opt.to_dict(), 'cooldown_steps': 40}), 200)
  steps = np.arange(0, 81)
  np.testing.assert_allclose([float(sched(s)) for s in steps], [float(longer(s)) for s in steps], rtol=1e-6)


def test_cooldown_needs_a_cooldown_schedule():
  with pytest.raises(ValueError, match='cooldown_steps'):
    optim.create_learning_rate_schedule(_opt(schedule='cosine', cooldown_steps=10), 100)
  with pytest.raises(ValueError, match='cooldown_steps'):
    optim.create_learning_rate_schedule(_opt(schedule='rsqrt', cooldown_steps=200, warmup_steps=0), 100)


# --- Study grid.


def _tiny_study(data_dir, **overrides):
  s = study_lib.base_study()
  sys.path.insert(0, str(ROOT))
  from configs import default  # pylint: disable=g-import-not-at-top
  s.base = default.get_config()
  s.base.dataset.data_dir = data_dir
  s.base.batch_size = 32
  s.base.log_every = 5
  s.base.eval_every = 0
  s.base.checkpoint_every = 100
  s.base.keep_checkpoints = 1
  s.base.optimizer.warmup_steps = 2
  s.base.optimizer.schedule = 'constant'
  s.shapes = (dict(hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2),)
  s.steps = (8, 16)
  s.cooldown_fraction = 0.5
  s.fewshot.shots = (2,)
  s.fewshot.seeds = 2
  s.update(overrides)
  return s


def test_expand_makes_trunks_and_branches():
  s = _tiny_study(None, steps=(100, 200, 400), train_examples=(100, 0), cooldown_fraction=0.2)
  runs = study_lib.expand(s)
  assert [r.name for r in runs] == [
      'w16d1m32h2_nall_s400', 'w16d1m32h2_nall_s200', 'w16d1m32h2_nall_s100',
      'w16d1m32h2_n100_s400', 'w16d1m32h2_n100_s200', 'w16d1m32h2_n100_s100']
  trunk, b200, b100 = runs[3:]
  assert trunk.trunk is None and trunk.config.total_steps == 400 and trunk.config.optimizer.cooldown_steps == 80
  assert (b200.trunk, b200.branch_step, b200.config.optimizer.cooldown_steps) == (trunk.name, 160, 40)
  assert (b100.trunk, b100.branch_step) == (trunk.name, 80)
  assert trunk.config.checkpoint_every == 80  # Saves 80, 160, ..., 400, plus spare slots for preemption saves.
  assert trunk.config.keep_checkpoints == 5 + study_lib.PREEMPTION_SLOTS
  assert trunk.config.dataset.train_split == 'train[:100]' and runs[0].config.dataset.train_split == 'train'
  assert trunk.config.model.hidden_size == 16 and s.base.total_steps != 400  # The base is not modified.
  independent = study_lib.expand(_tiny_study(None, steps=(100, 200), branch_cooldowns=False))
  assert all(r.trunk is None for r in independent)


def test_trunk_keeps_branch_starts_through_preemption_saves():
  """Steps (300, 600, 1000) at cooldown 0.2: branches start at 240 and 480; the trunk saves 240, 480, 720, 960 and
  1000. Orbax keeps only the newest keep_checkpoints steps, so off-cadence preemption saves must not evict 240."""
  trunk = study_lib.expand(_tiny_study(None, steps=(300, 600, 1000), cooldown_fraction=0.2))[0]
  every, keep = trunk.config.checkpoint_every, trunk.config.keep_checkpoints
  saves = sorted(set(range(every, 1001, every)) | {1000} | {250, 500, 730, 970})  # Four preemptions.
  assert every == 240 and {240, 480} <= set(saves[-keep:])


@pytest.mark.parametrize('overrides,match', [
    (dict(steps=()), 'study.steps'),
    (dict(cooldown_fraction=1.5), 'cooldown_fraction'),
    (dict(shapes=(dict(),)), 'study.shapes'),
    (dict(train_examples=(-1,)), 'train_examples'),
    (dict(base=dict(optimizer=dict(cooldown_steps=5))), 'cooldown_fraction'),
])
def test_study_errors_name_the_field(overrides, match):
  with pytest.raises(ValueError, match=match):
    study_lib.expand(_tiny_study(None, **overrides))


def test_study_rejects_cosine_branches_and_unknown_keys():
  s = _tiny_study(None)
  s.base.optimizer.schedule = 'cosine'
  with pytest.raises(ValueError, match='branch_cooldowns'):
    study_lib.expand(s)
  s = _tiny_study(None)
  s.stpes = (1,)
  with pytest.raises(ValueError, match='stpes'):
    study_lib.expand(s)


def test_default_digits_study_expands():
  path = ROOT / 'experiments' / 'scaling_laws' / 'configs' / 'digits.py'
  s = cf_impl._ConfigFileParser(name='config').parse(str(path))  # pylint: disable=protected-access
  runs = study_lib.expand(s)
  assert len(runs) == len(s.shapes) * len(s.steps) * len(s.train_examples)
  assert sum(r.trunk is None for r in runs) == len(s.shapes) * len(s.train_examples)


def test_emit_commands_stages():
  runs = study_lib.expand(_tiny_study(None))
  lines = runner.emit_commands(runs, '/w d', ['--config=c.py', '--config.base.seed', '3'])
  commands = [l for l in lines if not l.startswith('#')]
  assert len(commands) == len(runs) + 1
  assert commands[0] == ("python -m experiments.scaling_laws.sweep --config=c.py --config.base.seed=3 "
                         "'--workdir=/w d' --only=w16d1m32h2_nall_s16")
  assert lines.index('# Stage 2, after stage 1 has finished: cooldown branches (in parallel).') == 2
  assert commands[-1].endswith('--ledger_only')


# --- Few-shot probe.


def test_ridge_probe():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 16)) * 5
  labels = np.repeat(np.arange(4), 30)
  x = centers[labels] + rng.normal(size=(120, 16))
  assert fewshot_probe.ridge_probe_error(x[::3], labels[::3], x, labels, num_classes=4, l2_reg=1.0) == 0.0
  # Fewer points than dimensions takes the dual form; it must agree with the primal solution.
  few = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(4)])
  y = 2.0 * np.eye(4)[labels[few]] - 1.0
  np.testing.assert_allclose(fewshot_probe.ridge_weights(x[few], y, 3.0, dual=True),
                             fewshot_probe.ridge_weights(x[few], y, 3.0, dual=False), rtol=1e-8, atol=1e-10)
  errors = fewshot_probe.fewshot_errors(x, labels, x, labels, num_classes=4, shots=(2, 5), l2_reg=2.0 ** 10, seeds=2)
  assert set(errors) == {2, 5} and errors[5] < 0.05
  noise = rng.normal(size=(120, 16))
  assert fewshot_probe.ridge_probe_error(noise[few], labels[few], noise, labels, num_classes=4, l2_reg=1.0) > 0.4
  with pytest.raises(ValueError, match='shots'):
    fewshot_probe.fewshot_errors(x, labels, x, labels, num_classes=4, shots=(31,), l2_reg=1.0, seeds=1)


# --- Fits.


def test_pareto_frontier():
  x = np.array([1, 2, 2, 3, 4, 5])
  y = np.array([0.5, 0.6, 0.4, 0.45, 0.3, 0.3])
  assert laws.pareto_frontier(x, y).tolist() == [0, 2, 4]


TRUE_LAW = dict(a=50.0, b=0.25, c=0.03, d=2e8)


def _synthetic_ledger(path, seed=0, n=40, noise=0.02):
  """Runs on the known law E = a (C + d)^-b + c with 2% log-normal noise, plus as many dominated runs."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    c = float(np.exp(rng.uniform(np.log(1e9), np.log(1e13))))
    e = float(laws.power_law(c, **TRUE_LAW) * np.exp(rng.normal(0, noise)))
    rows.append(dict(run=f'on_law_{i}', trunk='', train_flops=c, num_params=round(c ** 0.5), examples_seen=c / 1e5,
                     train_examples=1000, eval_error=e))
    worse = c * np.exp(rng.uniform(0, 1))
    rows.append(dict(run=f'dominated_{i}', trunk='', train_flops=worse, num_params=round(c ** 0.5),
                     examples_seen=worse / 1e5, train_examples=500, eval_error=e * np.exp(abs(rng.normal(0.1, 0.2)))))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def test_fit_recovers_known_law(tmp_path):
  """Tolerances: b within 15%, c within 0.01 absolute (of 0.03), a within 50% (a carries b's error as C^db at
  C ~ 1e11), and the fitted curve within 5% of the true law over the sampled compute range."""
  ledger_path = tmp_path / 'ledger.csv'
  _synthetic_ledger(ledger_path)
  out = tmp_path / 'report'
  fit.write_report(fit.read_ledger(str(ledger_path)), str(ledger_path), str(out), metric='eval_error', samples=20,
                   holdout_fraction=0.2, seed=0)
  fits = json.loads((out / 'fits.json').read_text())
  law = fits['fits']['compute']
  assert abs(law['b'] / TRUE_LAW['b'] - 1) < 0.15, law
  assert abs(law['c'] - TRUE_LAW['c']) < 0.01, law
  assert abs(law['a'] / TRUE_LAW['a'] - 1) < 0.5, law
  grid = np.logspace(9, 13, 50)
  fitted = laws.power_law(grid, *(law[k] for k in laws.PARAM_NAMES))
  np.testing.assert_allclose(fitted, laws.power_law(grid, **TRUE_LAW), rtol=0.05)
  for k in laws.PARAM_NAMES:
    low, high = law['ci95'][k]
    assert low <= law[k] <= high and low < high, (k, law['ci95'][k])
  extrapolation = fits['extrapolation']
  assert extrapolation['n_held_out_runs'] == 16 and extrapolation['mean_rel_error'] < 0.1
  assert {'params', 'examples_seen'} <= set(fits['fits'])
  report = (out / 'report.md').read_text()
  assert report.index('## Answers') < report.index('## What the data do not support') < report.index('## Plots')
  assert fits['joint']['bootstrap_samples'] == 20 and len(fits['joint']['budgets']) == 2
  for name in ('error_vs_compute.png', 'error_vs_params.png', 'error_vs_examples.png', 'isoflop.png',
               'residuals.png', 'joint.png'):
    assert (out / name).stat().st_size > 10_000, name
    assert f']({name})' in report
  assert f'{law["b"]:.3f}' in report


def test_fit_names_a_missing_metric(tmp_path):
  ledger_path = tmp_path / 'ledger.csv'
  _synthetic_ledger(ledger_path, n=5)
  with pytest.raises(ValueError, match='fewshot_10shot_error'):
    fit.analyse(fit.read_ledger(str(ledger_path)), 'fewshot_10shot_error')


# --- Sweep: branches, skip and resume (tiny real runs).


@pytest.mark.slow
def test_sweep_branches_skips_and_resumes(digits_data_dir, tmp_path, monkeypatch):
  s = _tiny_study(digits_data_dir)
  root = tmp_path / 'study'
  path, count, total = runner.run_study(s, str(root))
  assert (count, total) == (2, 2)
  runs_dir = root / 'runs'
  trunk, branch = runs_dir / 'w16d1m32h2_nall_s16', runs_dir / 'w16d1m32h2_nall_s8'
  # The trunk (16 steps, cooldown 8) kept the step-4 checkpoint; the 8-step branch started there and cooled down.
  assert json.loads((branch / 'final_metrics.json').read_text())['resumed_from_step'] == 4
  assert 8 in [int(p.name) for p in (branch / 'checkpoints').iterdir() if p.name.isdigit()]
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['run'] for r in rows] == ['w16d1m32h2_nall_s16', 'w16d1m32h2_nall_s8']
  for r in rows:
    assert 0.0 <= float(r['eval_error']) <= 1.0 and 0.0 <= float(r['fewshot_2shot_error']) <= 1.0
    assert float(r['train_flops']) == float(r['macs_per_image']) * 6 * int(r['steps']) * 32
    assert float(r['wall_seconds']) > 0 and int(r['num_params']) > 0
  assert rows[1]['trunk'] == rows[0]['run'] and float(rows[1]['run_flops']) == float(rows[1]['train_flops']) / 2

  # Finished runs are skipped: training must not be called.
  def no_training(*args, **kwargs):
    raise AssertionError('a finished run was trained again')
  monkeypatch.setattr(train, 'train_and_evaluate', no_training)
  before = (trunk / 'ledger_row.json').read_text()
  assert runner.run_study(s, str(root))[1:] == (2, 2)
  assert (trunk / 'ledger_row.json').read_text() == before
  monkeypatch.undo()

  # An interrupted trunk resumes from its latest checkpoint; its finished branch is left alone.
  shutil.rmtree(trunk / 'checkpoints' / '16')
  (trunk / 'final_metrics.json').unlink()
  (trunk / 'ledger_row.json').unlink()
  branch_row = (branch / 'ledger_row.json').read_text()
  runner.run_study(s, str(root))
  assert json.loads((trunk / 'final_metrics.json').read_text())['resumed_from_step'] == 12
  assert (branch / 'ledger_row.json').read_text() == branch_row
  assert json.loads((trunk / 'sweep_timing.json').read_text())['attempts'] == 2

  # A changed study is refused and nothing is written.
  s.base.optimizer.lr = 0.5
  with pytest.raises(checkpoint.WorkdirConflictError, match='optimizer.lr'):
    runner.run_study(s, str(root))
  assert (branch / 'ledger_row.json').read_text() == branch_row


# --- Runner and ledger bookkeeping (no training).


def _write_config(run_dir, config):
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / 'config.json').write_text(config.to_json_best_effort())


def _other_lr(run):
  config = run.config.copy_and_resolve_references()
  config.optimizer.lr = 0.123
  return config


def _no_training(*args, **kwargs):
  raise AssertionError('nothing may train here')


def test_branch_refuses_a_trunk_of_another_config(tmp_path):
  trunk, branch = study_lib.expand(_tiny_study(None))
  trunk_dir = tmp_path / 'runs' / trunk.name
  _write_config(trunk_dir, _other_lr(trunk))
  (trunk_dir / 'checkpoints' / str(branch.branch_step)).mkdir(parents=True)
  with pytest.raises(checkpoint.WorkdirConflictError, match='optimizer.lr'):
    runner.seed_branch(tmp_path, branch, trunk)
  assert not (tmp_path / 'runs' / branch.name).exists()


def test_changed_study_is_refused_before_anything_trains(tmp_path, monkeypatch):
  for run in study_lib.expand(_tiny_study(None)):
    _write_config(tmp_path / 'runs' / run.name, run.config)
  monkeypatch.setattr(train, 'train_and_evaluate', _no_training)
  # A longer length makes a new trunk; the old 16-step trunk would become a branch with other checkpoint settings.
  with pytest.raises(checkpoint.WorkdirConflictError, match='w16d1m32h2_nall_s16'):
    runner.run_study(_tiny_study(None, steps=(8, 16, 32)), str(tmp_path))
  assert not (tmp_path / 'runs' / 'w16d1m32h2_nall_s32').exists()


def test_ledger_refuses_rows_of_another_config_and_leaves_out_stale_probes(tmp_path):
  s = _tiny_study(None)
  runs = study_lib.expand(s)
  for run in runs:
    _write_config(tmp_path / 'runs' / run.name, run.config)
    ledger.write_row(tmp_path / 'runs' / run.name, {'run': run.name, ledger.PROBE_KEY: ledger.probe_settings(s)})
  assert ledger.write_ledger(tmp_path, runs, s)[1] == 2
  s.fewshot.l2_reg = 1.0
  assert ledger.write_ledger(tmp_path, runs, s)[1] == 0
  _write_config(tmp_path / 'runs' / runs[1].name, _other_lr(runs[1]))
  with pytest.raises(checkpoint.WorkdirConflictError, match='optimizer.lr'):
    ledger.write_ledger(tmp_path, runs, s)


def test_changed_fewshot_settings_recompute_only_the_probe(tmp_path, monkeypatch):
  s = _tiny_study(None)
  run = study_lib.expand(s)[0]
  run_dir = tmp_path / 'runs' / run.name
  _write_config(run_dir, run.config)
  old = {'run': run.name, 'eval_error': 0.25, 'fewshot_2shot_error': 0.5, ledger.PROBE_KEY: ledger.probe_settings(s)}
  ledger.write_row(run_dir, old)
  monkeypatch.setattr(train, 'train_and_evaluate', _no_training)
  monkeypatch.setattr(fewshot, 'probe_run', lambda *a, **kw: {int(k): 0.125 for k in kw['shots']})
  assert runner.execute(tmp_path, run, s) == 'skipped'
  s.fewshot.shots = (3,)
  assert runner.execute(tmp_path, run, s) == 'reprobed'
  row = ledger.read_row(run_dir)
  assert row['fewshot_3shot_error'] == 0.125 and 'fewshot_2shot_error' not in row and row['eval_error'] == 0.25
  assert ledger.probe_is_current(row, s)


def test_preempted_or_crashed_run_writes_no_row_and_counts_its_time(tmp_path, monkeypatch):
  run = study_lib.expand(_tiny_study(None))[0]
  run_dir = tmp_path / 'runs' / run.name

  def preempted(config, workdir):
    checkpoint.claim_workdir(workdir, config)
    return {'preempted_at_step': 4}
  monkeypatch.setattr(train, 'train_and_evaluate', preempted)
  with pytest.raises(runner.RunPreempted, match='step 4 .*Rerun the same command to resume'):
    runner.execute(tmp_path, run, _tiny_study(None))
  monkeypatch.setattr(train, 'train_and_evaluate', lambda *a: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    runner.execute(tmp_path, run, _tiny_study(None))
  assert not (run_dir / 'ledger_row.json').exists()
  assert json.loads((run_dir / 'sweep_timing.json').read_text())['attempts'] == 2


def test_device_hours_count_each_part_at_its_own_device_count(tmp_path):
  trunk, branch = study_lib.expand(_tiny_study(None))  # The branch starts at step 4 of 16.
  for run, wall, devices in ((trunk, 160.0, 8), (branch, 20.0, 2)):
    _write_config(tmp_path / 'runs' / run.name, run.config)
    (tmp_path / 'runs' / run.name / 'sweep_timing.json').write_text(
        json.dumps({'wall_seconds': wall, 'attempts': 1, 'devices': devices}))
  cost = ledger.cost(tmp_path, branch)
  assert cost['wall_seconds'] == 20 + 40 and cost['devices'] == 2
  np.testing.assert_allclose(cost['device_hours'], (20 * 2 + 40 * 8) / 3600)
  (tmp_path / 'runs' / trunk.name / 'sweep_timing.json').unlink()
  assert np.isnan(ledger.cost(tmp_path, branch)['device_hours'])


def test_flops_count_map_heads_and_pre_logits():
  config = study_lib.expand(_tiny_study(None))[0].config
  plain = ledger.vit_shape(config, 10)
  assert plain['flops_method'] == 'analytic'
  assert plain['macs_per_image'] == vit.vit_forward_macs(
      image_size=16, patch_size=plain['patch_size'], hidden_size=16, num_layers=1, mlp_dim=32, num_classes=10)
  config.model.classifier = 'map'
  map_head = ledger.vit_shape(config, 10)
  assert map_head['flops_method'] == 'xla' and map_head['macs_per_image'] > plain['macs_per_image']


def test_too_many_train_examples_are_refused(digits_data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(train, 'train_and_evaluate', _no_training)
  with pytest.raises(ValueError, match='has only 1'):
    runner.run_study(_tiny_study(digits_data_dir, train_examples=(10 ** 6,)), str(tmp_path))


def test_star_grid_varies_one_dimension_at_a_time():
  s = _tiny_study(None, shapes=(), grid='star')
  s.star.centre = dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2)
  s.star.vary = dict(hidden_size=(16, 64), num_layers=(1, 3), mlp_dim=(32, 128))
  shapes = study_lib.grid_shapes(s)
  assert shapes[0] == dict(s.star.centre) and len(shapes) == 7
  for shape in shapes[1:]:
    changed = [k for k in s.star.centre if shape[k] != s.star.centre[k]]
    assert len(changed) == 1 and study_lib.star_dimension(s, shape) == changed[0]
  assert study_lib.star_dimension(s, shapes[0]) == 'centre'
  assert len(study_lib.expand(s)) == 7 * len(s.steps)


@pytest.mark.parametrize('change,match', [
    (dict(vary=dict(hidden_size=(16,))), 'at least 3 distinct'),
    (dict(vary=dict(patch_size=(2, 8))), 'does not set'),
    (dict(vary=dict(hidden_size=(15, 64))), 'multiples of'),
])
def test_star_errors_name_the_field(change, match):
  s = _tiny_study(None, shapes=(), grid='star')
  s.star.centre = dict(hidden_size=32, num_layers=2, num_heads=2)
  s.star.vary = change['vary']
  with pytest.raises(ValueError, match=match):
    study_lib.expand(s)
  s = _tiny_study(None, grid='star')  # A star with study.shapes set is refused too.
  s.star.centre = dict(hidden_size=32, num_layers=2, num_heads=2)
  s.star.vary = dict(num_layers=(1, 3))
  with pytest.raises(ValueError, match='leave study.shapes empty'):
    study_lib.expand(s)


def test_digits_star_study_expands():
  path = ROOT / 'experiments' / 'scaling_laws' / 'configs' / 'digits_star.py'
  s = cf_impl._ConfigFileParser(name='config').parse(str(path))  # pylint: disable=protected-access
  runs = study_lib.expand(s)
  assert s.grid == 'star' and len(runs) == len(study_lib.grid_shapes(s)) * len(s.steps)


def _sleeper_launcher(codes, log):
  """A launcher of short real processes (no training) that exit with codes[lane] (default 0), recording each start
  with how many lanes were then still running."""
  procs = []

  def launch(lane, log_path):
    assert log_path.parent.name == runner.LOGS_DIRNAME and log_path.name == f'lane_{lane}.log'
    log.append((lane, sum(p.poll() is None for p in procs)))
    procs.append(subprocess.Popen([sys.executable, '-c',
                                   f'import sys, time; time.sleep(0.3); sys.exit({codes.get(lane, 0)})']))
    return procs[-1]
  return launch


def test_lanes_keep_each_trunk_with_its_branches_and_balance_the_steps():
  study = _tiny_study(None, steps=(8, 16, 32), shapes=tuple(
      dict(hidden_size=w, num_layers=1, mlp_dim=32, num_heads=2) for w in (8, 16, 24)))
  runs = study_lib.expand(study)
  lanes = runner.split_lanes(runs, 2)
  assert sorted(r.name for lane in lanes for r in lane) == sorted(r.name for r in runs)  # Each run once.
  for lane in lanes:
    names = [r.name for r in lane]
    for i, run in enumerate(lane):
      if run.trunk:
        assert run.trunk in names[:i], f'{run.name} is not after its trunk in the same lane'
  trained = [sum(r.steps - r.branch_step for r in lane) for lane in lanes]
  assert sorted(len(lane) for lane in lanes) == [3, 6] and max(trained) <= 2 * min(trained)
  assert runner.split_lanes(runs, 1) == [runs]  # Equal costs: the study's own order.
  with pytest.raises(ValueError, match='--parallel=0 must be >= 1'):
    runner.split_lanes(runs, 0)


def test_parallel_sweep_runs_every_lane_at_once_and_names_a_failed_one(tmp_path):
  study = _tiny_study(None)
  log = []
  runner.run_parallel(study, str(tmp_path), workers=2, launch=_sleeper_launcher({}, log), poll_seconds=0.05)
  assert log == [(0, 0), (1, 1)]  # Both lanes started, the second while the first was still running.
  with pytest.raises(RuntimeError, match=r'lane 1 \(exit 3, log .*logs/lane_1.log\).*rerun the same command'):
    runner.run_parallel(study, str(tmp_path), workers=2, launch=_sleeper_launcher({1: 3}, []), poll_seconds=0.05)
  with pytest.raises(runner.RunPreempted, match=r'preempted lanes: \[0\]\). Rerun the same command'):
    runner.run_parallel(study, str(tmp_path), workers=2, launch=_sleeper_launcher({0: 1}, []), poll_seconds=0.05)
