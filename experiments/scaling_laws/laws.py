"""Saturating power laws E = a * (x + d)^(-b) + c (Zhai et al. 2021) fitted to Pareto frontiers, with bootstrap CIs.

x is compute (training FLOPs), parameters or examples seen; E an error rate. Fits minimise squared residuals of
log E (the errors span orders of magnitude and their noise is roughly relative), by bounded least squares from
several starts. x is rescaled by its geometric mean internally; a and d are reported in the units of x.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from scipy import optimize

PARAM_NAMES = ('a', 'b', 'c', 'd')
MIN_POINTS = 4         # Frontier points needed for any fit (3 constants + 1 degree of freedom)...
MIN_POINTS_FOR_D = 6   # ... and for fitting d as well (with fewer, d = 0).
# Optimiser limits (rescaled units). A constant that ends on one was stopped by the limit, not by the data. c's
# limits, 0 and min(E), and d >= 0 are physical (no negative floor or offset, no floor above an observed error) and
# are not flagged.
_LOG_A_LIMIT, _B_LIMITS, _D_LIMIT_FACTOR = 50.0, (1e-4, 10.0), 1e3


def min_points(fit_d: bool) -> int:
  """Distinct x values a fit needs: MIN_POINTS_FOR_D with d free, MIN_POINTS with d fixed at 0."""
  return MIN_POINTS_FOR_D if fit_d else MIN_POINTS


def power_law(x: np.ndarray, a: float, b: float, c: float, d: float) -> np.ndarray:
  """E = a * (x + d)^(-b) + c."""
  return a * np.power(np.asarray(x, np.float64) + d, -b) + c


def pareto_frontier(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Indices, by increasing x, of the points no other point beats on both axes (lower x and lower y)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  order = np.lexsort((y, x))
  keep, best = [], np.inf
  for i in order:
    if y[i] < best:
      keep.append(i)
      best = y[i]
  return np.asarray(keep, dtype=int)


@dataclasses.dataclass
class Fit:
  """A fitted law: constants in the units of x, the points it was fitted to, and its log-space RMS residual."""
  a: float
  b: float
  c: float
  d: float
  x: np.ndarray
  y: np.ndarray
  rmse_log: float
  at_bound: tuple[str, ...] = ()  # Constants the optimiser's limits stopped (see _LOG_A_LIMIT ...).

  def params(self) -> dict[str, float]:
    return {k: float(getattr(self, k)) for k in PARAM_NAMES}

  def predict(self, x: np.ndarray) -> np.ndarray:
    return power_law(x, self.a, self.b, self.c, self.d)


def fit_power_law(x: np.ndarray, y: np.ndarray, *, init: Optional[dict[str, float]] = None,
                  fit_d: bool = True) -> Fit:
  """Least-squares fit of log E = log(a (x + d)^-b + c) with a > 0, b in (0, 10], 0 <= c < min(E), d >= 0.

  fit_d=False fixes d = 0 (E = a x^-b + c), for frontiers with too few points to identify four constants.
  Starts from `init` only when given (bootstrap refits), else from a grid of 12 starts.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if len(x) < 3 or len(np.unique(x)) < 3:
    raise ValueError(f'A saturating power law needs at least 3 distinct x values, got {len(np.unique(x))}.')
  if np.any(y <= 0) or np.any(x <= 0):
    raise ValueError('Errors and x must be positive to fit in log space.')
  scale = float(np.exp(np.mean(np.log(x))))
  u, log_y = x / scale, np.log(y)
  c_max = float(y.min()) * (1 - 1e-9)

  def residuals(theta: np.ndarray) -> np.ndarray:
    log_a, b, c = theta[:3]
    d = theta[3] if fit_d else 0.0
    return np.log(np.exp(log_a) * np.power(u + d, -b) + c) - log_y

  n = 4 if fit_d else 3  # theta = (log a, b, c[, d]) in rescaled units.
  lower = [-_LOG_A_LIMIT, _B_LIMITS[0], 0.0, 0.0][:n]
  upper = [_LOG_A_LIMIT, _B_LIMITS[1], c_max, _D_LIMIT_FACTOR * float(u.max())][:n]
  starts = []
  if init is not None:
    starts.append([np.log(init['a'] * scale ** -init['b']), init['b'], min(init['c'], 0.9 * c_max),
                   init['d'] / scale][:n])
  for b0 in (0.1, 0.3, 0.7, 1.5) if init is None else ():
    for c_frac in (0.0, 0.5, 0.9):
      c0 = c_frac * c_max
      # a chosen so the law passes through the geometric-mean point at d = 0.
      a0 = max(float(np.exp(np.mean(np.log(np.maximum(y - c0, 1e-12))))), 1e-12)
      starts.append([np.log(a0), b0, c0, 0.0][:n])
  best = None
  for theta0 in starts:
    theta0 = np.clip(theta0, lower, np.nextafter(np.asarray(upper), -np.inf))
    try:
      result = optimize.least_squares(residuals, theta0, bounds=(lower, upper), method='trf', x_scale='jac',
                                      max_nfev=2000)
    except (ValueError, FloatingPointError):
      continue
    if np.isfinite(result.cost) and (best is None or result.cost < best.cost):
      best = result
  if best is None:
    raise RuntimeError('The power-law fit failed from every start.')
  log_a, b, c = best.x[:3]
  d = best.x[3] if fit_d else 0.0
  near = lambda v, limit: abs(v - limit) <= 1e-6 * max(1.0, abs(limit))
  # d = 0 (no offset) is a physical lower end, like c's; the other limits are the optimiser's.
  at_bound = tuple(k for k, i in (('a', 0), ('b', 1), ('d', 3))
                   if i < n and (near(best.x[i], upper[i]) or (k != 'd' and near(best.x[i], lower[i]))))
  return Fit(a=float(np.exp(log_a) * scale ** b), b=float(b), c=float(c), d=float(d * scale), x=x, y=y,
             rmse_log=float(np.sqrt(np.mean(best.fun ** 2))), at_bound=at_bound)


@dataclasses.dataclass
class Bootstrap:
  """Percentile intervals {name: (low, high)}, the per-resample constants, and per constant the fraction of
  refits that ended on an optimiser limit (an interval end that sits there is the limit, not the data)."""
  intervals: dict[str, tuple[float, float]]
  draws: list[dict[str, float]]
  at_bound_fraction: dict[str, float]


def bootstrap(x: np.ndarray, y: np.ndarray, fit: Fit, *, samples: int, seed: int = 0, level: float = 0.95,
              fit_d: bool = True) -> Bootstrap:
  """Refits to (x, y) pairs resampled with replacement.

  A resample with fewer distinct x than the point fit needed (`min_points(fit_d)`) is redrawn, so every refit
  identifies the same constants as the fit it qualifies. With no more distinct x than that, every such resample
  holds the same points and there is no interval to estimate: the intervals are NaN and there are no draws.
  """
  rng = np.random.default_rng(seed)
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  draws: list[dict[str, float]] = []
  bounded = {k: 0 for k in PARAM_NAMES}
  attempts = 0 if len(np.unique(x)) > min_points(fit_d) else 50 * samples
  while len(draws) < samples and attempts < 50 * samples:
    attempts += 1
    idx = rng.integers(0, len(x), len(x))
    if len(np.unique(x[idx])) < min_points(fit_d):
      continue
    try:
      refit = fit_power_law(x[idx], y[idx], init=fit.params(), fit_d=fit_d)
    except (ValueError, RuntimeError):
      continue
    draws.append(refit.params())
    for k in refit.at_bound:
      bounded[k] += 1
  if not draws:
    nan = (float('nan'), float('nan'))
    return Bootstrap({k: nan for k in PARAM_NAMES}, draws, {k: float('nan') for k in PARAM_NAMES})
  tail = 100 * (1 - level) / 2
  intervals = {k: (float(np.percentile([s[k] for s in draws], tail)),
                   float(np.percentile([s[k] for s in draws], 100 - tail))) for k in PARAM_NAMES}
  return Bootstrap(intervals, draws, {k: bounded[k] / len(draws) for k in PARAM_NAMES})


def extrapolation_check(x: np.ndarray, y: np.ndarray, *, holdout_fraction: float) -> dict:
  """Fits the frontier of all but the highest-x runs and predicts the frontier points among those held out.

  The top max(1, round(holdout_fraction * n)) runs by x are held out. Returns the cut, the fit, and per held-out
  frontier point the actual and predicted error with their absolute and relative differences.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  n_out = max(1, int(round(holdout_fraction * len(x))))
  order = np.argsort(x, kind='stable')
  held, kept = order[len(x) - n_out:], order[:len(x) - n_out]
  cut = float(x[held].min())
  kept = kept[x[kept] < cut]  # Ties with the cut are held out too.
  held = np.setdiff1d(np.arange(len(x)), kept)
  front_kept = kept[pareto_frontier(x[kept], y[kept])]
  result: dict = {'holdout_fraction': holdout_fraction, 'x_cut': cut, 'n_fit_runs': int(len(kept)),
                  'n_held_out_runs': int(len(held))}
  distinct = len(np.unique(x[front_kept]))
  if distinct < MIN_POINTS:
    result['skipped'] = f'only {distinct} frontier points below the cut; need at least {MIN_POINTS}.'
    return result
  fit = fit_power_law(x[front_kept], y[front_kept], fit_d=distinct >= MIN_POINTS_FOR_D)
  frontier_all = pareto_frontier(x, y)
  targets = [i for i in frontier_all if i in set(held.tolist())]
  if not targets:  # No held-out run improves on the best kept one: check the best held-out run instead.
    targets = [int(held[np.argmin(y[held])])]
  pred = fit.predict(x[targets])
  result.update(fit=fit.params(), points=[
      {'x': float(x[i]), 'actual': float(y[i]), 'predicted': float(p), 'abs_error': float(abs(p - y[i])),
       'rel_error': float(abs(p - y[i]) / y[i])} for i, p in zip(targets, pred)])
  result['mean_abs_error'] = float(np.mean([p['abs_error'] for p in result['points']]))
  result['mean_rel_error'] = float(np.mean([p['rel_error'] for p in result['points']]))
  return result
