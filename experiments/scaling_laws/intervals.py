"""Profile-likelihood intervals for the constants of a saturating power law (laws.py).

For a constant theta, the profile P(theta) is the fit's weighted residual sum of squares with theta held fixed and
every other constant refitted. With Gaussian relative noise of unknown scale, the likelihood-ratio interval at
level L is {theta : P(theta) <= RSS_min * (1 + F_L(1, n - p) / (n - p))}, n points and p constants: the noise
scale is estimated from the residuals, and the F quantile (t squared) accounts for estimating it. Unlike Wald or
bootstrap-percentile intervals, a profile interval follows the curved, lopsided confidence regions of these laws
(b and d trade off along a narrow valley; c is bounded by 0 and min(E)); calibration.py measures its coverage.

Each profile is evaluated on a grid of theta values in one vectorised search (laws.Problem.minimize), then on a
finer grid inside the two brackets where it crosses the threshold; the ends are interpolated linearly.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
from scipy import stats

from experiments.scaling_laws import laws

_COARSE, _FINE = 31, 11  # Profile points on the whole range, then inside each bracket.


@dataclasses.dataclass
class Interval:
  """An interval's ends in the units of x; `open_low` / `open_high` mark an end that is a limit of the search
  (e.g. b = 10, d at its upper limit, c = 0), not a crossing: the data do not bound the constant on that side."""
  low: float
  high: float
  open_low: bool
  open_high: bool


def threshold(fit: laws.Fit, level: float) -> float:
  """RSS_min * (1 + F_level(1, n - p) / (n - p)): the largest profile RSS inside the interval."""
  n, p = len(fit.x), laws.Problem(fit.x, fit.y, fit.fit_d).n_params
  dof = max(n - p, 1)
  return fit.rss * (1.0 + stats.f.ppf(level, 1, dof) / dof)


def _profile_fn(problem: laws.Problem, z_hat: np.ndarray, name: str) -> tuple[Callable, float, float, float,
                                                                              Callable]:
  """For constant `name`: (P(t) over an array of coordinates t, t_hat, t_min, t_max, t -> value in x units).

  Coordinates: log b, the d coordinate delta, c, and log a (a in rescaled units).
  """
  consts = problem.constants(z_hat)
  full = (problem.upper - problem.lower) / 2.0
  if name in ('b', 'd'):
    i = 0 if name == 'b' else 1
    free = tuple(j != i for j in range(problem.dim))

    def profile(t):
      z0 = np.repeat(z_hat[None], len(t), 0)
      z0[:, i] = t
      return problem.minimize(z0, free=free, width=full)[1]
    to_value = (lambda t: np.exp(t)) if name == 'b' else (lambda t: problem.d_of(t) * problem.scale)
    return profile, float(z_hat[i]), float(problem.lower[i]), float(problem.upper[i]), to_value
  if name == 'c':
    def profile(t):
      return problem.minimize(np.repeat(z_hat[None], len(t), 0), width=full, c=t)[1]
    return profile, consts['c'], 0.0, problem.c_max, lambda t: t
  a_rescaled = float(problem.solve(z_hat[0], z_hat[1] if problem.fit_d else 0.0)[0])
  t_hat = np.log(a_rescaled)

  def profile(t):
    return problem.minimize(np.repeat(z_hat[None], len(t), 0), width=full, a=np.exp(t))[1]
  b_hat = consts['b']
  return profile, t_hat, t_hat - 25.0, t_hat + 25.0, lambda t: np.exp(t) * problem.scale ** b_hat


def profile_interval(fit: laws.Fit, name: str, *, level: float = 0.95) -> Interval:
  """The profile-likelihood interval of constant `name` ('a', 'b', 'c' or 'd') of `fit`."""
  if name == 'd' and not fit.fit_d:
    return Interval(0.0, 0.0, False, False)
  if name == 'a' and fit.a <= 0:  # No power-law term: a has no profile (fit.py warns about a = 0).
    return Interval(0.0, float('nan'), False, True)
  problem = laws.Problem(fit.x, fit.y, fit.fit_d)
  profile, t_hat, t_min, t_max, to_value = _profile_fn(problem, fit.z, name)
  limit = threshold(fit, level)
  coarse = np.unique(np.concatenate([np.linspace(t_min, t_max, _COARSE), [t_hat]]))
  values = profile(coarse)
  values[coarse == t_hat] = min(fit.rss, float(values[coarse == t_hat][0]))
  centre = int(np.flatnonzero(coarse == t_hat)[0])

  def end(direction: int) -> tuple[float, bool]:
    idx = range(centre + direction, len(coarse) if direction > 0 else -1, direction)
    outside = next((j for j in idx if values[j] > limit), None)
    if outside is None:
      return float(coarse[-1] if direction > 0 else coarse[0]), True
    inside = outside - direction
    fine = np.linspace(coarse[inside], coarse[outside], _FINE)
    fine_values = profile(fine)
    fine_values[0] = min(fine_values[0], values[inside])
    k = int(np.argmax(fine_values > limit))  # The first fine point outside (the last one is, by the coarse grid).
    if k == 0:
      return float(fine[0]), False
    t0, t1, v0, v1 = fine[k - 1], fine[k], fine_values[k - 1], fine_values[k]
    return float(t0 + (limit - v0) / (v1 - v0) * (t1 - t0)) if v1 > v0 else float(t1), False

  low, open_low = end(-1)
  high, open_high = end(+1)
  if name == 'c':  # c = 0 is a physical end, not a search limit; c_max (min E) likewise.
    open_low = open_high = False
  if name == 'd':  # d = 0 (no offset) is physical too.
    open_low = False
  return Interval(float(to_value(low)), float(to_value(high)), open_low, open_high)


def profile_intervals(fit: laws.Fit, names: tuple[str, ...] = laws.PARAM_NAMES, *,
                      level: float = 0.95) -> dict[str, Interval]:
  """`profile_interval` for each of `names`."""
  return {k: profile_interval(fit, k, level=level) for k in names}
