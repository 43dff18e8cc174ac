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
