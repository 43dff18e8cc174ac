"""Saturating power laws E = a * (x + d)^(-b) + c (Zhai et al. 2021), fitted by variable projection.

x is compute (training FLOPs), parameters or examples seen; E an error rate. The noise of an error is roughly
relative, so a fit minimises the relative residuals sum(((E - f) / E)^2) (log residuals to first order). For fixed
(b, d) the law is linear in (a, c), so those two have a closed-form bounded least-squares solution; only (b, d) are
searched: a grid, then Nelder-Mead from the best grid point. That makes a fit a few milliseconds, fast enough for
profile-likelihood intervals (intervals.py) and for calibrating them on hundreds of synthetic studies
(calibration.py). x is rescaled by its geometric mean internally; a and d are reported in the units of x.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from scipy import optimize

PARAM_NAMES = ('a', 'b', 'c', 'd')
MIN_POINTS = 4         # Distinct x values needed for any fit (3 constants + 1 degree of freedom)...
MIN_POINTS_FOR_D = 6   # ... and for fitting d as well (with fewer, d = 0).
# Optimiser limits. A constant that ends on one was stopped by the limit, not by the data. c's limits, 0 and
# min(E), and d >= 0 are physical (no negative floor or offset, no floor above an observed error) and are not
# flagged; neither is a = 0 (no power-law term at all), which the report flags on its own.
_B_LIMITS, _D_LIMIT_FACTOR = (1e-4, 10.0), 1e3
_GRID_B, _GRID_D = 120, 24  # Grid points in log b and in the d coordinate (see Problem.d_of).


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


class Problem:
  """One fit's data in rescaled units, and the closed-form solve for (a, c) at given nonlinear constants.

  The nonlinear constants are z = (log b, delta) with d = u_min * expm1(delta) (delta = 0 is d = 0; equal steps in
  delta are roughly equal steps in log d above u_min), or z = (log b,) when d is fixed at 0.
  """

  def __init__(self, x: np.ndarray, y: np.ndarray, fit_d: bool):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or len(np.unique(x)) < 3:
      raise ValueError(f'A saturating power law needs at least 3 distinct x values, got {len(np.unique(x))}.')
    if np.any(y <= 0) or np.any(x <= 0) or not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
      raise ValueError('Errors and x must be positive and finite to fit a relative-error law.')
    self.x, self.y, self.fit_d = x, y, fit_d
    self.scale = float(np.exp(np.mean(np.log(x))))
    self.u = x / self.scale
    self.w = 1.0 / y
    self.c_max = float(y.min()) * (1 - 1e-9)
    self.u_min = float(self.u.min())
    self.delta_max = float(np.log1p(_D_LIMIT_FACTOR * self.u.max() / self.u_min)) if fit_d else 0.0
    self.lower = np.array([np.log(_B_LIMITS[0]), 0.0][:self.dim])
    self.upper = np.array([np.log(_B_LIMITS[1]), self.delta_max][:self.dim])

  @property
  def dim(self) -> int:
    return 2 if self.fit_d else 1

  @property
  def n_params(self) -> int:
    return 2 + self.dim

  def d_of(self, delta: np.ndarray) -> np.ndarray:
    return self.u_min * np.expm1(delta)

  def solve(self, log_b: np.ndarray, delta: np.ndarray, *, a: Optional[float] = None,
            c: Optional[float] = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, c, rss) minimising the weighted squared residuals at each (log b, delta) (broadcast arrays), with
    a >= 0 and 0 <= c <= c_max; `a` or `c` given holds that constant fixed (a in rescaled units)."""
    log_b, delta = np.asarray(log_b, np.float64)[..., None], np.asarray(delta, np.float64)[..., None]
    g = np.power(self.u + self.d_of(delta), -np.exp(log_b)) * self.w
    norm = np.sqrt(np.sum(g * g, axis=-1))  # Columns scaled to unit norm: b up to 10 spans 30 decades.
    g = g / norm[..., None]
    o, yw = self.w, self.y * self.w
    s_go, s_oo = np.sum(g * o, axis=-1), float(np.sum(o * o))
    s_gy, s_oy, s_yy = np.sum(g * yw, axis=-1), float(np.sum(o * yw)), float(np.sum(yw * yw))

    def rss(an, cc):
      return s_yy - 2 * an * s_gy - 2 * cc * s_oy + an * an + 2 * an * cc * s_go + cc * cc * s_oo

    if c is not None:
      an = np.maximum(s_gy - c * s_go, 0.0)
      cc = np.full_like(an, c)
    elif a is not None:
      an = a * norm
      cc = np.clip((s_oy - an * s_go) / s_oo, 0.0, self.c_max)
    else:  # The box-constrained 2-variable QP: the interior optimum if feasible, else the best edge.
      det = s_oo - s_go * s_go
      with np.errstate(divide='ignore', invalid='ignore'):
        a_int = (s_gy * s_oo - s_oy * s_go) / det
        c_int = (s_oy - s_gy * s_go) / det
      feasible = (a_int >= 0) & (c_int >= 0) & (c_int <= self.c_max) & np.isfinite(a_int) & np.isfinite(c_int)
      a_lo = np.maximum(s_gy, 0.0)
      a_hi = np.maximum(s_gy - self.c_max * s_go, 0.0)
      c_a0 = np.clip(s_oy / s_oo, 0.0, self.c_max)
      cands_a = np.stack([np.where(feasible, a_int, 0.0), a_lo, a_hi, np.zeros_like(a_lo)])
      cands_c = np.stack([np.where(feasible, c_int, 0.0), np.zeros_like(a_lo), np.full_like(a_lo, self.c_max),
                          np.broadcast_to(c_a0, a_lo.shape)])
      values = rss(cands_a, cands_c)
      values[0] = np.where(feasible, values[0], np.inf)
      best = np.argmin(values, axis=0)
      an = np.take_along_axis(cands_a, best[None], 0)[0]
      cc = np.take_along_axis(cands_c, best[None], 0)[0]
    return an / norm, cc, np.maximum(rss(an, cc), 0.0)

  def rss(self, z: np.ndarray, **fixed) -> np.ndarray:
    """The weighted RSS at nonlinear constants z (..., dim), with (a, c) solved for (or fixed, see `solve`)."""
    z = np.clip(z, self.lower, self.upper)
    return self.solve(z[..., 0], z[..., 1] if self.fit_d else 0.0, **fixed)[2]

  def minimize(self, z0: np.ndarray, *, free: Optional[tuple[bool, ...]] = None, width: Optional[np.ndarray] = None,
               a: Optional[np.ndarray] = None, c: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Local minima (z, rss) of the weighted RSS from each start in z0 (B, dim), over the `free` coordinates.

    A shrinking grid search (5 points a free dimension, centred on the best point so far, 0.6x narrower each
    round), vectorised over the B starts: about 30 numpy rounds in all, and it follows the narrow (b, d) valley of
    these laws without tuning. `a` or `c` (B,) hold that constant fixed per start (profiles, intervals.py).
    """
    z = np.clip(np.atleast_2d(np.asarray(z0, np.float64)), self.lower, self.upper)
    free = np.array(free if free is not None else (True,) * self.dim)
    offsets = np.linspace(-1.0, 1.0, 5)
    grid = np.stack(np.meshgrid(*[offsets if f else np.zeros(1) for f in free], indexing='ij'), -1)
    grid = grid.reshape(-1, self.dim)
    h = np.array(width if width is not None else (self.upper - self.lower) / 2.0, np.float64) * free
    fixed = {k: np.asarray(v, np.float64).reshape(-1, 1) for k, v in (('a', a), ('c', c)) if v is not None}
    rows = np.arange(len(z))
    while np.any(h > 1e-5):
      points = np.clip(z[:, None, :] + grid[None] * h, self.lower, self.upper)
      values = self.rss(points, **fixed)
      z = points[rows, np.argmin(values, axis=1)]
      h = h * 0.6
    return z, self.rss(z[:, None, :], **fixed)[:, 0]

  def grid_starts(self, count: int = 2) -> list[np.ndarray]:
    """The `count` best points of a grid over z."""
    log_b = np.linspace(self.lower[0], self.upper[0], _GRID_B)
    delta = np.linspace(0.0, self.delta_max, _GRID_D) if self.fit_d else np.zeros(1)
    lb, dd = np.meshgrid(log_b, delta, indexing='ij')
    values = self.solve(lb, dd)[2].ravel()
    order = np.argsort(values)[:count]
    return [np.array([lb.ravel()[i], dd.ravel()[i]][:self.dim]) for i in order]

  def constants(self, z: np.ndarray) -> dict[str, float]:
    """The law's constants in the units of x at z."""
    delta = z[1] if self.fit_d else 0.0
    a, c, _ = self.solve(z[0], delta)
    b = float(np.exp(z[0]))
    return {'a': float(a) * self.scale ** b, 'b': b, 'c': float(c), 'd': float(self.d_of(delta)) * self.scale}


@dataclasses.dataclass
class Fit:
  """A fitted law: constants in the units of x, the points it was fitted to, its log-space RMS residual and its
  weighted residual sum of squares (the criterion the fit minimised)."""
  a: float
  b: float
  c: float
  d: float
  x: np.ndarray
  y: np.ndarray
  rmse_log: float
  at_bound: tuple[str, ...] = ()  # Constants the optimiser's limits stopped (see _B_LIMITS ...).
  rss: float = float('nan')
  fit_d: bool = True
  z: Optional[np.ndarray] = None  # The nonlinear constants (Problem) at the optimum.

  def params(self) -> dict[str, float]:
    return {k: float(getattr(self, k)) for k in PARAM_NAMES}

  def predict(self, x: np.ndarray) -> np.ndarray:
    return power_law(x, self.a, self.b, self.c, self.d)


def fit_power_law(x: np.ndarray, y: np.ndarray, *, init: Optional[dict[str, float]] = None,
                  fit_d: bool = True) -> Fit:
  """Relative least-squares fit of E = a (x + d)^-b + c with a >= 0, b in [1e-4, 10], 0 <= c < min(E), d >= 0.

  fit_d=False fixes d = 0 (E = a x^-b + c), for data with too few distinct x to identify four constants. Searches
  from the two best points of a grid over (b, d), and from `init` when given (bootstrap refits).
  """
  problem = Problem(x, y, fit_d)
  starts = problem.grid_starts()
  if init is not None and init['b'] > 0:
    starts.append(np.array([np.log(init['b']), np.log1p(init['d'] / problem.scale / problem.u_min)][:problem.dim]))
  width = (problem.upper - problem.lower) / np.array([_GRID_B, _GRID_D][:problem.dim]) * 2.0
  zs, values = problem.minimize(np.stack(starts), width=width)
  z, rss = zs[int(np.argmin(values))], float(values.min())
  k = problem.constants(z)
  near = lambda v, limit: abs(v - limit) <= 1e-6 * max(1.0, abs(limit))
  at_bound = tuple(name for name, i in (('b', 0), ('d', 1)) if i < problem.dim and (
      near(z[i], problem.upper[i]) or (name == 'b' and near(z[i], problem.lower[i]))))
  pred = power_law(problem.x, **k)
  rmse = float(np.sqrt(np.mean(np.log(np.maximum(pred, 1e-300) / problem.y) ** 2)))
  return Fit(**k, x=problem.x, y=problem.y, rmse_log=rmse, at_bound=at_bound, rss=rss, fit_d=fit_d, z=z)


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


def extrapolation_check(x: np.ndarray, y: np.ndarray, *, holdout_fraction: float, runs: str = 'frontier') -> dict:
  """Fits all but the highest-x runs (all of them, or their frontier: `runs`) and predicts the held-out runs (all,
  or the frontier points among them).

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
  front_kept = kept[pareto_frontier(x[kept], y[kept])] if runs == 'frontier' else kept
  result: dict = {'holdout_fraction': holdout_fraction, 'runs': runs, 'x_cut': cut, 'n_fit_runs': int(len(kept)),
                  'n_held_out_runs': int(len(held))}
  distinct = len(np.unique(x[front_kept]))
  if distinct < MIN_POINTS:
    result['skipped'] = f'only {distinct} distinct x below the cut; need at least {MIN_POINTS}.'
    return result
  fit = fit_power_law(x[front_kept], y[front_kept], fit_d=distinct >= MIN_POINTS_FOR_D)
  frontier_all = pareto_frontier(x, y) if runs == 'frontier' else np.arange(len(x))
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
