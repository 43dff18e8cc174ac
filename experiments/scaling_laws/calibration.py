"""Measures how often the fitted laws' 95% intervals cover the truth, on synthetic studies from known laws.

  python -m experiments.scaling_laws.calibration [--studies=100] [--noise=0.01,0.03] [--selection=all,frontier]

Each synthetic study is a digits-like grid (6 model sizes from 3.5k to 140k parameters x 5 training lengths of 100
to 1,600 steps at batch 64, C = 6 N D training FLOPs), every run's error drawn from a known law
E = a (C + d)^-b + c times log-normal noise of the given relative scale. Two laws: issue 18's E = 50 C^-0.3 + 0.05,
and E = 20 (C + 1e9)^-0.25 + 0.02, whose offset d lies inside the grid's compute range (1.3e8 to 8.6e10 FLOPs), so
the curve bends within the data and b trades off against d. Each study is
fitted as `fit.py` does (d free with 6 or more distinct C), over all runs or over the empirical Pareto frontier only,
with profile-likelihood intervals (intervals.py). The table gives, per law, noise level and selection, the coverage
of b and c, the median relative error of b and c, and the median relative width of b's interval.
"""
from __future__ import annotations

import time
from typing import Any

from absl import app, flags
import numpy as np

from experiments.scaling_laws import intervals, laws

LAWS = (dict(a=50.0, b=0.3, c=0.05, d=0.0), dict(a=20.0, b=0.25, c=0.02, d=1e9))
SIZES = np.geomspace(3.5e3, 1.4e5, 6)            # Parameters N, like the digits study's six shapes.
EXAMPLES = 64 * np.array([100, 200, 400, 800, 1600])  # Examples seen D = steps x batch.


def grid_compute() -> np.ndarray:
  """Training FLOPs C = 6 N D of every (size, length) grid point."""
  return (6.0 * SIZES[:, None] * EXAMPLES[None, :]).ravel()


def fit_study(x: np.ndarray, y: np.ndarray, selection: str) -> tuple[laws.Fit, dict[str, intervals.Interval]]:
  """The fit and the b and c intervals of one study, over all runs or the empirical frontier."""
  if selection == 'frontier':
    keep = laws.pareto_frontier(x, y)
    x, y = x[keep], y[keep]
  elif selection != 'all':
    raise ValueError(f"selection={selection!r} must be 'all' or 'frontier'.")
  fit = laws.fit_power_law(x, y, fit_d=len(np.unique(x)) >= laws.MIN_POINTS_FOR_D)
  return fit, intervals.profile_intervals(fit, ('b', 'c'))


def law_name(law: dict[str, float]) -> str:
  return f'{law["a"]:g} (C + {law["d"]:g})^-{law["b"]:g} + {law["c"]:g}'.replace(' + 0)', ')').replace('(C)', 'C')


def calibrate(law: dict[str, float], studies: int, noise: float, selection: str, *, seed: int = 0) -> dict[str, Any]:
  """Coverage and error statistics over `studies` synthetic studies drawn from `law`."""
  rng = np.random.default_rng(seed)
  x = grid_compute()
  covered = {'b': [], 'c': []}
  rel_err = {'b': [], 'c': []}
  width_b = []
  start = time.time()
  for i in range(studies):
    y = laws.power_law(x, **law) * np.exp(rng.normal(0.0, noise, x.shape))
    fit, iv = fit_study(x, y, selection)
    for k in ('b', 'c'):
      covered[k].append(iv[k].low <= law[k] <= iv[k].high)
      rel_err[k].append(abs(getattr(fit, k) / law[k] - 1.0))
    width_b.append((iv['b'].high - iv['b'].low) / law['b'])
  return {'law': law_name(law), 'noise': noise, 'selection': selection, 'studies': studies,
          'coverage_b': float(np.mean(covered['b'])), 'coverage_c': float(np.mean(covered['c'])),
          'median_rel_error_b': float(np.median(rel_err['b'])), 'median_rel_error_c': float(np.median(rel_err['c'])),
          'median_rel_width_b': float(np.median(width_b)), 'seconds_per_study': (time.time() - start) / studies}


def table(rows: list[dict[str, Any]]) -> str:
  """The rows as a markdown table."""
  lines = ['| law | noise | runs fitted | studies | b covered | c covered | median rel. error b | '
           'median rel. error c | median rel. width of b interval |', '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    lines.append(f'| E = {r["law"]} | {100 * r["noise"]:.0f}% | {r["selection"]} | {r["studies"]} | '
                 f'{100 * r["coverage_b"]:.0f}% | {100 * r["coverage_c"]:.0f}% | '
                 f'{100 * r["median_rel_error_b"]:.1f}% | {100 * r["median_rel_error_c"]:.1f}% | '
                 f'{100 * r["median_rel_width_b"]:.1f}% |')
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  rows = []
  for selection in flags.FLAGS.selection:
    for law in LAWS:
      for noise in flags.FLAGS.noise:
        rows.append(calibrate(law, flags.FLAGS.studies, float(noise), selection, seed=flags.FLAGS.seed))
      print(table(rows[-1:]).splitlines()[-1], f'({rows[-1]["seconds_per_study"]:.2f} s a study)', flush=True)
  print(table(rows))


if __name__ == '__main__':
  # Defined here, not at import: the tests import this module next to fit.py, which has its own --seed.
  flags.DEFINE_integer('studies', 100, 'Synthetic studies per law, noise level and selection.')
  flags.DEFINE_list('noise', ['0.01', '0.03'], 'Relative noise levels (log-normal sigma).')
  flags.DEFINE_list('selection', ['all', 'frontier'], "Runs each fit uses: 'all' or 'frontier'.")
  flags.DEFINE_integer('seed', 0, 'Seed of the synthetic noise.')
  app.run(main)
