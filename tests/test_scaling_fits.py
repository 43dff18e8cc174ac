"""Scaling-law fits: optimiser limits are reported, bootstrap refits identify the same constants as the point fit,
and ledgers a log-space fit cannot use get a clear error (tests/test_scaling_laws.py has the recovery test)."""
import csv
import json

import numpy as np
import pytest

from experiments.scaling_laws import fit, laws


def test_a_law_beyond_the_exponent_limit_is_flagged():
  x = np.logspace(9, 12, 8)
  steep = laws.fit_power_law(x, 1e120 * x ** -12.0 + 0.01)  # b = 12 lies beyond the optimiser's limit of 10.
  assert steep.b == pytest.approx(10.0) and 'b' in steep.at_bound
  shallow = laws.fit_power_law(x, 50.0 * (x + 2e8) ** -0.25 + 0.03)
  assert shallow.at_bound == () and shallow.b == pytest.approx(0.25, rel=0.05)


@pytest.mark.parametrize('fit_d', [True, False])
def test_bootstrap_refits_have_as_many_distinct_points_as_the_fit_needs(monkeypatch, fit_d):
  x = np.logspace(9, 12, 7)
  y = 50.0 * (x + 2e8) ** -0.25 + 0.03
  point_fit = laws.fit_power_law(x, y, fit_d=fit_d)
  seen = []
  real = laws.fit_power_law
  def recording(xs, ys, **kw):
    seen.append(len(np.unique(xs)))
    return real(xs, ys, **kw)
  monkeypatch.setattr(laws, 'fit_power_law', recording)
  boot = laws.bootstrap(x, y, point_fit, samples=20, seed=0, fit_d=fit_d)
  assert len(boot.draws) == 20 and min(seen) >= laws.min_points(fit_d)
  assert all(boot.intervals[k][0] <= boot.intervals[k][1] for k in laws.PARAM_NAMES)
  assert set(boot.at_bound_fraction) == set(laws.PARAM_NAMES) and boot.at_bound_fraction['b'] == 0.0


def test_too_few_points_for_a_bootstrap_give_no_interval_rather_than_a_zero_width_one():
  x = np.logspace(9, 12, laws.MIN_POINTS)
  y = 50.0 * x ** -0.25 + 0.03
  boot = laws.bootstrap(x, y, laws.fit_power_law(x, y, fit_d=False), samples=10, fit_d=False)
  assert boot.draws == [] and all(np.isnan(boot.intervals[k]).all() for k in laws.PARAM_NAMES)


def _rows(errors):
  return [dict(run=f'r{i}', trunk='', train_flops=1e9 * 2 ** i, num_params=1e3 * 2 ** i, examples_seen=1e4 * 2 ** i,
               train_examples=1000, eval_error=e) for i, e in enumerate(errors)]


def test_a_metric_no_row_can_use_is_named_with_the_fix():
  with pytest.raises(ValueError, match="positive, finite 'fewshot_25shot_error'.*rerun the sweep"):
    fit.analyse([{**r, 'fewshot_25shot_error': ''} for r in _rows([0.5] * 8)], 'fewshot_25shot_error', samples=5)


def test_zero_error_runs_are_reported_not_silently_dropped(tmp_path):
  errors = list(0.03 + 0.5 * 2.0 ** (-0.5 * np.arange(9)))
  errors[-1] = 0.0
  path = tmp_path / 'ledger.csv'
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(_rows(errors)[0]))
    writer.writeheader()
    writer.writerows(_rows(errors))
  out = tmp_path / 'report'
  fit.write_report(fit.read_ledger(str(path)), str(path), str(out), metric='eval_error', samples=10,
                   holdout_fraction=0.2, seed=0)
  results = json.loads((out / 'fits.json').read_text())
  assert results['zero_error_runs'] == ['r8'] and results['n_runs'] == 8
  assert 'r8' in (out / 'report.md').read_text().split('eval_error = 0')[1]
  assert set(results['fits']['compute']['ci95_open']) == set(laws.PARAM_NAMES)
  assert 'NaN' not in (out / 'fits.json').read_text()  # Standard JSON: missing intervals are null.


# --- Calibrated intervals, joint law, shape laws.

from experiments.scaling_laws import calibration, intervals, joint, plots, shape_laws  # noqa: E402


def test_profile_intervals_cover_the_truth_in_synthetic_studies():
  """20 digits-like studies (10 at 1%, 10 at 3% noise) of E = 50 C^-0.3 + 0.05, fitted over all runs: the 95%
  intervals of b and c must cover the truth in at least 80% (calibration.py runs the full benchmark)."""
  rows = [calibration.calibrate(calibration.LAWS[0], 10, noise, 'all', seed=1) for noise in (0.01, 0.03)]
  for k in ('b', 'c'):
    assert np.mean([r[f'coverage_{k}'] for r in rows]) >= 0.8, rows
  assert rows[0]['median_rel_error_b'] <= 0.05, rows[0]


def test_an_unidentified_constant_gets_an_open_interval_not_a_narrow_one():
  x = np.logspace(9, 12, 8)
  fit_ = laws.fit_power_law(x, 1e120 * x ** -12.0 + 0.01, fit_d=False)  # b beyond the search limit of 10.
  assert intervals.profile_interval(fit_, 'b').open_high


def _joint_runs(seed, noise=0.01):
  rng = np.random.default_rng(seed)
  n = np.repeat(calibration.SIZES, len(calibration.EXAMPLES))
  d = np.tile(calibration.EXAMPLES, len(calibration.SIZES)).astype(float)
  return n, d, rng, noise


TRUE_JOINT = dict(E0=0.03, A=5.0, alpha=0.4, B=8.0, beta=0.3)


def test_joint_law_recovers_known_exponents_and_its_allocation_is_optimal():
  n, d, rng, noise = _joint_runs(0)
  y = joint.joint_law(n, d, **TRUE_JOINT) * np.exp(rng.normal(0, noise, n.shape))
  fitted = joint.fit_joint(n, d, y)
  for k in ('alpha', 'beta'):
    assert abs(fitted.params[k] / TRUE_JOINT[k] - 1) < 0.1, fitted.params
  # N*(C) minimises the law along C = 6 N D (brute force over N).
  c = 1e13
  best = joint.optimal_allocation(fitted.params, np.array([c]), 6.0)
  grid = np.geomspace(best['N'][0] / 30, best['N'][0] * 30, 4001)
  assert abs(grid[np.argmin(joint.joint_law(grid, c / 6 / grid, **fitted.params))] / best['N'][0] - 1) < 0.01
  assert joint.exponents(TRUE_JOINT)['a'] == pytest.approx(0.3 / 0.7)


def test_joint_law_needs_sizes_and_lengths():
  with pytest.raises(ValueError, match='distinct lengths|3 or more distinct lengths'):
    joint.fit_joint(np.arange(1, 11) * 1e3, np.full(10, 1e5), np.full(10, 0.5))


TRUE_SHAPES = {  # Exponents a, b, c per dimension; optima x*(t) inside the sampled values.
    'hidden_size': dict(alpha=1.0, a=0.6, beta=15625.0, b=0.6, xi=1e4, c=0.6, eps=0.02),
    'num_layers': dict(alpha=0.5, a=0.9, beta=1.9e4, b=0.4, xi=5e3, c=0.5, eps=0.03),
}
STAR_VALUES = {'hidden_size': (8, 16, 32, 64, 128), 'num_layers': (1, 2, 4, 8, 16)}


def _star_ledger(seed=0, noise=0.005):
  """Rows of a star study (centre excluded for simplicity: each dimension's runs carry its name) from known laws."""
  rng = np.random.default_rng(seed)
  rows = []
  for dim, law in TRUE_SHAPES.items():
    for x in STAR_VALUES[dim]:
      for steps in (1e9, 3e9, 1e10, 3e10):
        t = steps * x / STAR_VALUES[dim][2]
        e = float(shape_laws.shape_law(x, t, **law) * np.exp(rng.normal(0, noise)))
        rows.append({'run': f'{dim}{x}_{steps:g}', 'star_dim': dim, dim: x, 'train_flops': t, 'eval_error': e})
  return rows


def test_shape_laws_recover_known_exponents(tmp_path):
  results, _ = shape_laws.analyse_shapes(_star_ledger(), 'eval_error', samples=0, seed=0)
  plots.plot_shapes(str(tmp_path / 'shapes.png'), results)
  assert (tmp_path / 'shapes.png').stat().st_size > 10_000
  for dim, law in TRUE_SHAPES.items():
    got = results['dims'][dim]
    assert abs(got['s'] / shape_laws.exponent(law) - 1) < 0.15, (dim, got['params'])
    assert abs(got['params']['c'] / law['c'] - 1) < 0.15, (dim, got['params'])
    assert not got['trusted'] and any('interval' in p for p in got['problems'])  # No bootstrap, no interval.


def test_shape_law_verdict_flags_an_optimum_outside_the_data():
  law = dict(TRUE_SHAPES['hidden_size'], beta=1e-3)  # Tiny size penalty: the optimum lies far above 128.
  rows = [r for r in _star_ledger() if r['star_dim'] == 'hidden_size']
  for r in rows:
    r['eval_error'] = float(shape_laws.shape_law(r['hidden_size'], r['train_flops'], **law))
  got = shape_laws.analyse_shapes(rows, 'eval_error', samples=0, seed=0)[0]['dims']['hidden_size']
  assert not got['trusted']
