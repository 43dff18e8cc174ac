"""The joint law E(N, D) = E0 + A N^-alpha + B D^-beta over all runs, and the compute-optimal allocation it implies.

N is parameters, D examples seen. As in Hoffmann et al. 2022 (approach 3): a Huber loss on the log error (robust to
a few runs off the law), started from a grid of initialisations, with intervals from refits to bootstrap
resamples of the runs. Every run is used: a small model trained long is as informative about the law as a
compute-optimal one, and nothing is selected on its noisy error (the frontier's bias, see calibration.py).

Compute model: C = k N D with k the median over the study's runs of train_flops / (N D), i.e. the study's own FLOP
count (vit_jax.flops: 6 x forward MACs per image; about 6 x tokens per image for a ViT, since attention and the
head add little at these sizes). Minimising E at fixed C gives
  N*(C) = G (C / k)^(beta / (alpha + beta)),   D*(C) = (C / k)^(alpha / (alpha + beta)) / G,
  G = (alpha A / (beta B))^(1 / (alpha + beta)),
and the compute-optimal frontier E*(C) = E0 + const C^-(alpha beta / (alpha + beta)).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional

import numpy as np
from scipy import optimize

PARAMS = ('E0', 'A', 'alpha', 'B', 'beta')
EXPONENT_LIMITS = (0.02, 3.0)  # alpha and beta searched here; a fit that ends on one is flagged.
HUBER_DELTA = 1e-3             # Hoffmann et al.'s delta on log error: residuals above it count linearly.
_GRID = np.linspace(0.05, 1.5, 10)  # Initial alphas and betas; (E0, A, B) solved for at each pair.
MIN_RUNS = 8


def joint_law(n: np.ndarray, d: np.ndarray, E0: float, A: float, alpha: float, B: float,  # pylint: disable=invalid-name
              beta: float) -> np.ndarray:
  """E = E0 + A N^-alpha + B D^-beta."""
  return E0 + A * np.power(np.asarray(n, np.float64), -alpha) + B * np.power(np.asarray(d, np.float64), -beta)


@dataclasses.dataclass
class JointFit:
  """Fitted constants (in the units of N and D), the data, the log-space RMS residual and limits reached."""
  params: dict[str, float]
  n: np.ndarray
  d: np.ndarray
  y: np.ndarray
  rmse_log: float
  at_bound: tuple[str, ...]

  def predict(self, n: np.ndarray, d: np.ndarray) -> np.ndarray:
    return joint_law(n, d, **self.params)


def _check(n: np.ndarray, d: np.ndarray, y: np.ndarray) -> None:
  if len(y) < MIN_RUNS or len(np.unique(n)) < 3 or len(np.unique(d)) < 3:
    raise ValueError(f'The joint law needs at least {MIN_RUNS} runs with 3 or more distinct parameter counts and '
                     f'3 or more distinct lengths; got {len(y)} runs, {len(np.unique(n))} sizes and '
                     f'{len(np.unique(d))} lengths. Add shapes or training lengths to the study.')
  if np.any(y <= 0) or np.any(n <= 0) or np.any(d <= 0):
    raise ValueError('Errors, parameters and examples seen must be positive to fit in log space.')


def _linear_start(u: np.ndarray, v: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> tuple[np.ndarray, float]:
  """(E0, A, B) >= 0 minimising relative residuals at fixed exponents (non-negative least squares), and its cost."""
  basis = np.stack([np.ones_like(u), u ** -alpha, v ** -beta], 1) / y[:, None]
  coef, resid = optimize.nnls(basis, np.ones_like(y))
  return coef, float(resid)


def fit_joint(n: np.ndarray, d: np.ndarray, y: np.ndarray, *, init: Optional[dict[str, float]] = None,
              starts: int = 3) -> JointFit:
  """Huber-on-log-error fit of E0 + A N^-alpha + B D^-beta, from the `starts` best points of a grid over
  (alpha, beta) (with (E0, A, B) solved for there) and from `init` when given (bootstrap refits)."""
  n, d, y = (np.asarray(v, np.float64) for v in (n, d, y))
  _check(n, d, y)
  sn, sd = float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(d))))
  u, v, log_y = n / sn, d / sd, np.log(y)
  floor = np.log(1e-12)

  log_u, log_v = np.log(u), np.log(v)

  def terms(theta):
    log_e0, log_a, alpha, log_b, beta = theta
    return np.exp(log_e0), np.exp(log_a - alpha * log_u), np.exp(log_b - beta * log_v)

  def residuals(theta):
    return np.log(sum(terms(theta))) - log_y

  def jacobian(theta):
    e0, a_term, b_term = terms(theta)
    total = e0 + a_term + b_term
    return np.stack([np.broadcast_to(e0, total.shape), a_term, -log_u * a_term, b_term, -log_v * b_term],
                    1) / total[:, None]

  def to_theta(e0, a, alpha, b, beta):
    return np.array([np.log(max(e0, 1e-12)), np.log(max(a, 1e-12)), alpha, np.log(max(b, 1e-12)), beta])

  candidates = []
  for alpha, beta in itertools.product(_GRID, _GRID):
    coef, cost = _linear_start(u, v, y, alpha, beta)
    candidates.append((cost, to_theta(coef[0], coef[1], alpha, coef[2], beta)))
  thetas = [t for _, t in sorted(candidates, key=lambda c: c[0])[:starts]]
  if init is not None:
    thetas.append(to_theta(init['E0'], init['A'] * sn ** -init['alpha'], init['alpha'],
                           init['B'] * sd ** -init['beta'], init['beta']))
  lower = [floor, floor, EXPONENT_LIMITS[0], floor, EXPONENT_LIMITS[0]]
  upper = [np.log(y.min()), 30.0, EXPONENT_LIMITS[1], 30.0, EXPONENT_LIMITS[1]]
  best = None
  for theta0 in thetas:
    theta0 = np.clip(theta0, np.nextafter(np.array(lower), np.inf), np.nextafter(np.array(upper), -np.inf))
    result = optimize.least_squares(residuals, theta0, jac=jacobian, bounds=(lower, upper), loss='huber',
                                    f_scale=HUBER_DELTA, method='trf', x_scale='jac', max_nfev=500)
    if best is None or result.cost < best.cost:
      best = result
  log_e0, log_a, alpha, log_b, beta = best.x
  params = {'E0': float(np.exp(log_e0)) if log_e0 > floor + 1e-6 else 0.0,
            'A': float(np.exp(log_a) * sn ** alpha), 'alpha': float(alpha),
            'B': float(np.exp(log_b) * sd ** beta), 'beta': float(beta)}
  near = lambda value, limit: abs(value - limit) <= 1e-4
  at_bound = tuple(k for k, value in (('alpha', alpha), ('beta', beta))
                   if near(value, EXPONENT_LIMITS[0]) or near(value, EXPONENT_LIMITS[1]))
  rmse = float(np.sqrt(np.mean(residuals(best.x) ** 2)))
  return JointFit(params, n, d, y, rmse, at_bound)


def bootstrap_joint(fit: JointFit, *, samples: int, seed: int = 0) -> list[dict[str, float]]:
  """Constants refitted to `samples` resamples of the runs (with replacement), started from the point fit.

  A resample with fewer than 3 distinct sizes or lengths is redrawn.
  """
  rng = np.random.default_rng(seed)
  draws, attempts = [], 0
  while len(draws) < samples and attempts < 20 * samples:
    attempts += 1
    idx = rng.integers(0, len(fit.y), len(fit.y))
    if len(np.unique(fit.n[idx])) < 3 or len(np.unique(fit.d[idx])) < 3:
      continue
    draws.append(fit_joint(fit.n[idx], fit.d[idx], fit.y[idx], init=fit.params, starts=0).params)
  return draws


def optimal_allocation(params: dict[str, float], compute: np.ndarray, k: float) -> dict[str, np.ndarray]:
  """Compute-optimal N*, D* and the error there at budgets `compute` (FLOPs) under C = k N D."""
  alpha, beta = params['alpha'], params['beta']
  g = (alpha * params['A'] / (beta * params['B'])) ** (1.0 / (alpha + beta))
  nd = np.asarray(compute, np.float64) / k
  n_opt = g * nd ** (beta / (alpha + beta))
  d_opt = nd / n_opt
  return {'N': n_opt, 'D': d_opt, 'E': joint_law(n_opt, d_opt, **params)}


def exponents(params: dict[str, float]) -> dict[str, float]:
  """N* ~ C^a, D* ~ C^b and the frontier's E* - E0 ~ C^-b_E."""
  alpha, beta = params['alpha'], params['beta']
  return {'a': beta / (alpha + beta), 'b': alpha / (alpha + beta), 'b_E': alpha * beta / (alpha + beta)}


def _interval(values: list[float], level: float = 0.95) -> list[float]:
  if len(values) < 10:
    return [float('nan'), float('nan')]
  tail = 100 * (1 - level) / 2
  return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def analyse_joint(rows: list[dict[str, Any]], metric: str, *, samples: int, seed: int,
                  budget_factors: tuple[float, ...] = (10.0, 100.0)) -> tuple[dict[str, Any], list[dict[str, float]]]:
  """The joint fit of `metric` over the ledger rows, its bootstrap intervals, the compute-optimal exponents and
  the predicted optimal (N, D) at `budget_factors` x the study's largest training compute. Also returns the draws."""
  n = np.array([r['num_params'] for r in rows], np.float64)
  d = np.array([r['examples_seen'] for r in rows], np.float64)
  y = np.array([r[metric] for r in rows], np.float64)
  flops = np.array([r['train_flops'] for r in rows], np.float64)
  fit = fit_joint(n, d, y)
  draws = bootstrap_joint(fit, samples=samples, seed=seed)
  k = float(np.median(flops / (n * d)))
  out: dict[str, Any] = {
      'law': 'E = E0 + A N^-alpha + B D^-beta', 'n_runs': len(rows), 'params': fit.params,
      'ci95': {p: _interval([s[p] for s in draws]) for p in PARAMS}, 'rmse_log': fit.rmse_log,
      'at_bound': list(fit.at_bound), 'bootstrap_samples': len(draws),
      'compute_model': f'C = k N D, k = {k:.4g} FLOPs per parameter per example (median of train_flops / (N D) '
                       'over the runs)', 'k': k,
      'exponents': exponents(fit.params),
      'exponents_ci95': {e: _interval([exponents(s)[e] for s in draws]) for e in ('a', 'b', 'b_E')}}
  warnings = []
  if fit.at_bound:
    warnings.append(f'{", ".join(fit.at_bound)} ended on the search limit {EXPONENT_LIMITS}: the data do not pin '
                    'it down, and the allocation built on it is not supported.')
  bounded = [p for p in ('alpha', 'beta') if np.mean([min(abs(s[p] - l) for l in EXPONENT_LIMITS) < 1e-3
                                                      for s in draws] or [0]) >= 0.025]
  if bounded:
    warnings.append(f'{", ".join(bounded)}: 2.5% or more of the bootstrap refits ended on a search limit, so that '
                    'end of the interval is the limit, not the data.')
  if fit.params['E0'] == 0.0:
    warnings.append('E0 = 0: the fit finds no irreducible error within the data; E0 is not identified.')
  budgets = []
  largest = float(flops.max())
  for factor in budget_factors:
    c = largest * factor
    point = optimal_allocation(fit.params, np.array([c]), k)
    boot = [optimal_allocation(s, np.array([c]), k) for s in draws]
    budgets.append({'factor': factor, 'compute': c,
                    **{key: float(point[key][0]) for key in ('N', 'D', 'E')},
                    **{f'{key}_ci95': _interval([float(b[key][0]) for b in boot]) for key in ('N', 'D', 'E')}})
  out['budgets'] = budgets
  out['largest_compute'] = largest
  wide = [e for e, (lo, hi) in out['exponents_ci95'].items() if np.isfinite(lo) and hi - lo > 0.5]
  if wide:
    warnings.append(f'the 95% intervals of the allocation exponent(s) {", ".join(wide)} are wider than 0.5: the '
                    'study does not say whether to grow the model or the training length faster.')
  if warnings:
    out['warning'] = ' Also, '.join(warnings)
  return out, draws
