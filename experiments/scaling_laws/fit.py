"""Fits scaling laws to a study's ledger and writes plots, report.md and fits.json.

  python -m experiments.scaling_laws.fit --ledger=DIR/ledger.csv --out=DIR/report [--metric=eval_error]

For each axis x in (training FLOPs, parameters, examples seen) it fits E = a * (x + d)^(-b) + c (laws.py) with 95%
profile-likelihood intervals (intervals.py; their coverage is measured by calibration.py): the compute law over the
Pareto frontier of (error, compute) (the default) or over every run (--compute_runs=all, when every run is near
compute-optimal); the parameter and data laws over their frontiers (the best error at each size). Over all runs, the
joint law E(N, D) is the unbiased fit. The joint law E(N, D) and its compute-optimal
allocation come from joint.py, and a star study's shape laws from shape_laws.py (both in report.md when the ledger
supports them). The extrapolation check refits the compute law without the highest-compute runs and reports how
well it predicts them. Output files in --out are rewritten on every call; nothing else there is touched.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any

from absl import app, flags
import numpy as np

from experiments.scaling_laws import intervals, joint, laws, plots, report, shape_laws

AXES = {'compute': 'train_flops', 'params': 'num_params', 'examples_seen': 'examples_seen'}


def read_ledger(path: str) -> list[dict[str, Any]]:
  """Rows of a ledger CSV (ledger.py) with numeric fields as floats; the run names stay strings."""
  def convert(key: str, value: str) -> Any:
    if key in ('run', 'trunk', 'star_dim'):
      return value
    try:
      return float(value)
    except ValueError:
      return value
  with open(path, newline='') as f:
    return [{k: convert(k, v) for k, v in row.items()} for row in csv.DictReader(f)]


def fit_axis(rows: list[dict[str, Any]], x_key: str, metric: str, *, samples: int, seed: int,
             runs: str = 'frontier') -> tuple[dict[str, Any], list[dict[str, float]]]:
  """The fit of one axis with 95% profile-likelihood intervals (or the reason it was skipped), and bootstrap draws
  for the plot's band. `runs`: 'all' fits every run, 'frontier' the empirical Pareto frontier of (x, error)."""
  if runs not in ('all', 'frontier'):
    raise ValueError(f"runs={runs!r} must be 'all' or 'frontier'.")
  x = np.array([r[x_key] for r in rows], np.float64)
  y = np.array([r[metric] for r in rows], np.float64)
  front = laws.pareto_frontier(x, y)
  used = np.argsort(x, kind='stable') if runs == 'all' else front
  out: dict[str, Any] = {'x': x_key, 'n_runs': len(rows), 'n_frontier': int(len(front)), 'runs_fitted': runs,
                         'n_fitted': int(len(used)), 'frontier_runs': [rows[i]['run'] for i in front],
                         'frontier_x': x[front].tolist(), 'frontier_y': y[front].tolist(),
                         'fitted_x': x[used].tolist(), 'fitted_y': y[used].tolist()}
  distinct = len(np.unique(x[used]))
  if distinct < laws.MIN_POINTS:
    out['skipped'] = f'{distinct} distinct x among the fitted runs; a fit needs at least {laws.MIN_POINTS}.'
    return out, []
  fit_d = distinct >= laws.MIN_POINTS_FOR_D
  fit = laws.fit_power_law(x[used], y[used], fit_d=fit_d)
  ci = intervals.profile_intervals(fit)
  boot = laws.bootstrap(x[used], y[used], fit, samples=samples, seed=seed, fit_d=fit_d)
  out.update(fit.params(), ci95={k: [v.low, v.high] for k, v in ci.items()},
             ci95_open={k: [v.open_low, v.open_high] for k, v in ci.items()}, rmse_log=fit.rmse_log,
             bootstrap_samples=len(boot.draws), d_fitted=fit_d, at_bound=list(fit.at_bound))
  warnings = []
  if not fit_d:
    warnings.append(f'only {distinct} distinct x, so d is fixed at 0 (E = a x^-b + c); '
                    f'{laws.MIN_POINTS_FOR_D} or more fit all four constants. Add grid points along this axis.')
  if fit.at_bound:
    warnings.append(f'the fit itself ended on the optimiser limit of {", ".join(fit.at_bound)}: the data do not '
                    'pin it down.')
  if fit.a <= 0:
    warnings.append('a = 0: the best fit is a constant, with no power-law term; the data show no scaling.')
  unbounded = [f'{k} {side}' for k, v in ci.items() for side, flag in (('below', v.open_low), ('above', v.open_high))
               if flag]
  if unbounded:
    warnings.append(f'the 95% interval is not bounded by the data for {", ".join(unbounded)}: its end there is the '
                    'search limit (e.g. b = 10), not an estimate.')
  if runs == 'frontier':
    warnings.append('fitted on the empirical frontier, whose selection of the luckiest runs biases c downward and '
                    'narrows the intervals (calibration.py measures by how much).')
  out['warning'] = ' Also, '.join(warnings) if warnings else ''
  if not out['warning']:
    del out['warning']
  return out, boot.draws


def analyse(rows: list[dict[str, Any]], metric: str, *, samples: int = 200, holdout_fraction: float = 0.2,
            seed: int = 0, compute_runs: str = 'frontier') -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
  """All fits and the extrapolation check of `metric` over the ledger rows (those with a positive, finite metric)."""
  if not rows:
    raise ValueError('The ledger has no rows; run the sweep first.')
  if metric not in rows[0]:
    raise ValueError(f'The ledger has no column {metric!r}; its columns are {sorted(rows[0])}.')
  usable = [r for r in rows if isinstance(r[metric], float) and math.isfinite(r[metric]) and r[metric] > 0]
  if not usable:
    raise ValueError(f'No ledger row has a positive, finite {metric!r} (values: '
                     f'{sorted({repr(r[metric]) for r in rows})[:5]}). An empty column means the runs predate that '
                     'metric: rerun the sweep (it skips training) so every row gets it, or pick another --metric.')
  dropped = sorted(r['run'] for r in rows if r not in usable)
  perfect = sorted(r['run'] for r in rows if r[metric] == 0.0)
  results: dict[str, Any] = {'metric': metric, 'n_runs': len(usable), 'dropped_runs': dropped,
                             'zero_error_runs': perfect, 'law': 'E = a * (x + d)^(-b) + c', 'fits': {}}
  draws: dict[str, list[dict[str, float]]] = {}
  for axis, key in AXES.items():
    results['fits'][axis], draws[axis] = fit_axis(usable, key, metric, samples=samples, seed=seed,
                                                  runs=compute_runs if axis == 'compute' else 'frontier')
  x = np.array([r['train_flops'] for r in usable], np.float64)
  y = np.array([r[metric] for r in usable], np.float64)
  results['extrapolation'] = laws.extrapolation_check(x, y, holdout_fraction=holdout_fraction, runs=compute_runs)
  try:
    results['joint'], draws['joint'] = joint.analyse_joint(usable, metric, samples=samples, seed=seed)
  except ValueError as e:  # Too few sizes or lengths: the report says why.
    results['joint'] = {'skipped': str(e)}
  if any(r.get('star_dim') for r in usable):
    results['shapes'], draws['shapes'] = shape_laws.analyse_shapes(usable, metric, samples=samples, seed=seed)
  return results, draws


def _finite_or_null(tree: Any) -> Any:
  """`tree` with NaN/inf floats as None: fits.json stays standard JSON (no interval is null, not NaN)."""
  if isinstance(tree, dict):
    return {k: _finite_or_null(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_finite_or_null(v) for v in tree]
  return None if isinstance(tree, float) and not math.isfinite(tree) else tree


def write_report(rows: list[dict[str, Any]], ledger_path: str, out: str, *, metric: str, samples: int,
                 holdout_fraction: float, seed: int, compute_runs: str = 'frontier') -> dict[str, Any]:
  """Runs `analyse` and writes the plots, report.md and fits.json into `out`; returns the results."""
  results, draws = analyse(rows, metric, samples=samples, holdout_fraction=holdout_fraction, seed=seed,
                           compute_runs=compute_runs)
  os.makedirs(out, exist_ok=True)
  usable = [r for r in rows if r['run'] not in set(results['dropped_runs'])]
  fits = results['fits']
  plots.plot_axis(os.path.join(out, 'error_vs_compute.png'), usable, 'train_flops', metric, fits['compute'],
                  draws['compute'], color_key='num_params', color_label='parameters',
                  extrapolation=results['extrapolation'])
  plots.plot_axis(os.path.join(out, 'error_vs_params.png'), usable, 'num_params', metric, fits['params'],
                  draws['params'], color_key='examples_seen', color_label='examples seen')
  plots.plot_axis(os.path.join(out, 'error_vs_examples.png'), usable, 'examples_seen', metric,
                  fits['examples_seen'], draws['examples_seen'], color_key='num_params', color_label='parameters')
  results['isoflop'] = plots.plot_isoflop(os.path.join(out, 'isoflop.png'), usable, metric)
  plots.plot_residuals(os.path.join(out, 'residuals.png'), fits, results['extrapolation'])
  if 'params' in results['joint']:
    plots.plot_joint(os.path.join(out, 'joint.png'), usable, metric, results['joint'], draws['joint'])
  if any('params' in r for r in results.get('shapes', {}).get('dims', {}).values()):
    plots.plot_shapes(os.path.join(out, 'shapes.png'), results['shapes'])
  with open(os.path.join(out, 'report.md'), 'w') as f:
    f.write(report.report_markdown(results, ledger_path))
  with open(os.path.join(out, 'fits.json'), 'w') as f:
    json.dump(_finite_or_null(results), f, indent=2)
  return results


_LEDGER = flags.DEFINE_string('ledger', None, 'The study ledger (DIR/ledger.csv).')
_OUT = flags.DEFINE_string('out', None, 'Report directory (plots, report.md, fits.json).')
_METRIC = flags.DEFINE_string('metric', 'eval_error', 'Ledger column to fit, e.g. fewshot_10shot_error.')
_BOOTSTRAP = flags.DEFINE_integer('bootstrap', 200, 'Bootstrap resamples per fit (the plots\' bands and the joint '
                                  'and shape laws\' intervals).')
_HOLDOUT = flags.DEFINE_float('holdout_fraction', 0.2, 'Fraction of runs (highest compute) the extrapolation '
                              'check holds out.')
_SEED = flags.DEFINE_integer('seed', 0, 'Bootstrap seed.')
_COMPUTE_RUNS = flags.DEFINE_enum(
    'compute_runs', 'frontier', ['all', 'frontier'], 'Runs the compute law is fitted to: the empirical Pareto '
    'frontier (right when some runs are far from compute-optimal, but biased: see calibration.py), or all (right '
    'only when every run is near compute-optimal, as in calibration.py\'s synthetic studies).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not os.path.exists(_LEDGER.value):
    raise app.UsageError(f'--ledger={_LEDGER.value} does not exist; run experiments.scaling_laws.sweep first.')
  results = write_report(read_ledger(_LEDGER.value), _LEDGER.value, _OUT.value, metric=_METRIC.value,
                         samples=_BOOTSTRAP.value, holdout_fraction=_HOLDOUT.value, seed=_SEED.value,
                         compute_runs=_COMPUTE_RUNS.value)
  c = results['fits']['compute']
  if 'a' in c:
    print(f'{_METRIC.value} = {c["a"]:.4g} * (C + {c["d"]:.4g})^(-{c["b"]:.4f}) + {c["c"]:.4f}  '
          f'(95% CI: b {c["ci95"]["b"]}, c {c["ci95"]["c"]})')
  print(f'Report: {os.path.join(_OUT.value, "report.md")}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['ledger', 'out'])
  app.run(main)
