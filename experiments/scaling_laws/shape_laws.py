"""SoViT shape laws (Alabdulmohsin et al. 2023) fitted to a star study (study.grid = 'star').

For each varied shape dimension x_k (width, depth, MLP size) with the others at the star's centre, and t the
training compute (FLOPs), the paper's law is
    f_k(x_k, t) = alpha_k x_k^-a_k + (beta_k x_k^b_k + xi_k) t^-c_k + eps_k.
The first term is the error of a too-small dimension with unlimited compute; the second, the cost of a finite
budget, which grows with x_k (at fixed compute a bigger model sees fewer examples). Setting df/dx_k = 0 at fixed t:
    x_k*(t) = (a_k alpha_k / (b_k beta_k))^(1 / (a_k + b_k)) t^s_k,   s_k = c_k / (a_k + b_k),
the dimension's compute-optimal scaling exponent. Each f_k is fitted to the centre's runs and the runs varying x_k
(least squares on log error; for fixed exponents (a, b, c) the law is linear in (alpha, beta, xi, eps) >= 0, so a
grid over the exponents with non-negative least squares there gives the starts), with 95% intervals from a
parametric bootstrap (refits to the fitted law times resampled log residuals, scaled up for the fitted constants).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Optional

import numpy as np
from scipy import optimize

SHAPE_DIMS = ('hidden_size', 'num_layers', 'mlp_dim')
PARAMS = ('alpha', 'a', 'beta', 'b', 'xi', 'c', 'eps')
EXPONENT_LIMITS = (0.01, 4.0)
_GRID = np.array([0.1, 0.25, 0.5, 0.8, 1.2, 2.0])
_FLOOR = np.log(1e-12)
N_PARAMS = len(PARAMS)


def shape_law(x: np.ndarray, t: np.ndarray, alpha: float, a: float, beta: float, b: float, xi: float, c: float,
              eps: float) -> np.ndarray:
  """f(x, t) = alpha x^-a + (beta x^b + xi) t^-c + eps."""
  x, t = np.asarray(x, np.float64), np.asarray(t, np.float64)
  return alpha * x ** -a + (beta * x ** b + xi) * t ** -c + eps


def optimal_x(params: dict[str, float], t: np.ndarray) -> np.ndarray:
  """x*(t) = (a alpha / (b beta))^(1 / (a + b)) t^(c / (a + b)); inf where beta = 0 (no optimum: bigger is better)."""
  a, b, c = params['a'], params['b'], params['c']
  with np.errstate(divide='ignore'):
    lead = (a * params['alpha'] / (b * params['beta'])) ** (1.0 / (a + b)) if params['beta'] > 0 else np.inf
  return lead * np.asarray(t, np.float64) ** (c / (a + b))


def exponent(params: dict[str, float]) -> float:
  """s = c / (a + b): x* grows as C^s."""
  return params['c'] / (params['a'] + params['b'])


@dataclasses.dataclass
class ShapeFit:
  """One dimension's fitted law (constants in the units of x and t), its data and fit diagnostics."""
  dim: str
  params: dict[str, float]
  x: np.ndarray
  t: np.ndarray
  y: np.ndarray
  rmse_log: float
  at_bound: tuple[str, ...]

  def predict(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
    return shape_law(x, t, **self.params)


def fit_shape_law(x: np.ndarray, t: np.ndarray, y: np.ndarray, *, dim: str = 'x',
                  init: Optional[dict[str, float]] = None, starts: int = 3) -> ShapeFit:
  """Log-error least-squares fit of the SoViT law, from the `starts` best grid points (and `init`)."""
  x, t, y = (np.asarray(v, np.float64) for v in (x, t, y))
  if len(y) <= N_PARAMS or len(np.unique(x)) < 3 or len(np.unique(t)) < 2:
    raise ValueError(f'The {dim} shape law has {N_PARAMS} constants: it needs more than {N_PARAMS} runs over 3 or '
                     f'more values of {dim} and 2 or more training lengths; got {len(y)} runs, '
                     f'{len(np.unique(x))} values and {len(np.unique(t))} compute values. Add values to '
                     f'study.star.vary.{dim} or lengths to study.steps.')
  if np.any(y <= 0):
    raise ValueError(f'The {dim} shape law is fitted in log space: every error must be positive.')
  sx, st = float(np.exp(np.mean(np.log(x)))), float(np.exp(np.mean(np.log(t))))
  u, v, log_y = x / sx, t / st, np.log(y)

  log_u, log_v = np.log(u), np.log(v)

  def terms(theta):
    log_al, a, log_be, b, log_xi, c, log_eps = theta
    decay = np.exp(-c * log_v)
    return (np.exp(log_al - a * log_u), np.exp(log_be + b * log_u) * decay, np.exp(log_xi) * decay,
            np.full_like(u, np.exp(log_eps)))

  def residuals(theta):
    return np.log(sum(terms(theta))) - log_y

  def jacobian(theta):
    t_al, t_be, t_xi, t_eps = terms(theta)
    total = t_al + t_be + t_xi + t_eps
    return np.stack([t_al, -log_u * t_al, t_be, log_u * t_be, t_xi, -log_v * (t_be + t_xi), t_eps], 1) / total[:, None]

  def to_theta(coef, a, b, c):
    al, be, xi, ep = np.maximum(coef, 1e-12)
    return np.array([np.log(al), a, np.log(be), b, np.log(xi), c, np.log(ep)])

  candidates = []
  for a, b, c in itertools.product(_GRID, _GRID, _GRID):
    basis = np.stack([u ** -a, u ** b * v ** -c, v ** -c, np.ones_like(u)], 1) / y[:, None]
    coef, cost = optimize.nnls(basis, np.ones_like(y))
    candidates.append((cost, to_theta(coef, a, b, c)))
  thetas = [th for _, th in sorted(candidates, key=lambda z: z[0])[:starts]]
  if init is not None:
    p = init
    thetas.append(to_theta(np.array([p['alpha'] * sx ** -p['a'], p['beta'] * sx ** p['b'] * st ** -p['c'],
                                     p['xi'] * st ** -p['c'], p['eps']]), p['a'], p['b'], p['c']))
  lo, hi = EXPONENT_LIMITS
  lower = [_FLOOR, lo, _FLOOR, lo, _FLOOR, lo, _FLOOR]
  upper = [20.0, hi, 20.0, hi, 20.0, hi, np.log(y.min())]
  best = None
  for theta0 in thetas:
    theta0 = np.clip(theta0, np.nextafter(np.array(lower), np.inf), np.nextafter(np.array(upper), -np.inf))
    r = optimize.least_squares(residuals, theta0, jac=jacobian, bounds=(lower, upper), method='trf', x_scale='jac',
                               max_nfev=400)
    if best is None or r.cost < best.cost:
      best = r
  log_al, a, log_be, b, log_xi, c, log_eps = best.x
  unfloor = lambda v: float(np.exp(v)) if v > _FLOOR + 1e-3 else 0.0
  params = {'alpha': unfloor(log_al) * sx ** a, 'a': float(a), 'beta': unfloor(log_be) * sx ** -b * st ** c,
            'b': float(b), 'xi': unfloor(log_xi) * st ** c, 'c': float(c), 'eps': unfloor(log_eps)}
  near = lambda value, limit: abs(value - limit) <= 1e-4
  at_bound = tuple(k for k in ('a', 'b', 'c') if near(params[k], lo) or near(params[k], hi))
  at_bound += tuple(k for k in ('alpha', 'beta') if params[k] == 0.0)
  rmse = float(np.sqrt(np.mean(residuals(best.x) ** 2)))
  return ShapeFit(dim, params, x, t, y, rmse, at_bound)


def bootstrap_shape(fit: ShapeFit, *, samples: int, seed: int = 0) -> list[dict[str, float]]:
  """Refits to the fitted law times resampled log residuals, inflated by sqrt(n / (n - p)) for the p fitted
  constants (a parametric residual bootstrap: a star has too few runs per dimension to resample runs)."""
  rng = np.random.default_rng(seed)
  fitted = fit.predict(fit.x, fit.t)
  n = len(fit.y)
  resid = np.log(fit.y / fitted) * np.sqrt(n / max(n - N_PARAMS, 1))
  draws = []
  for _ in range(samples):
    y = fitted * np.exp(rng.choice(resid, n, replace=True))
    draws.append(fit_shape_law(fit.x, fit.t, y, dim=fit.dim, init=fit.params, starts=1).params)
  return draws


def _interval(values: np.ndarray, level: float = 0.95) -> list[float]:
  values = np.asarray(values, np.float64)
  if len(values) < 10:
    return [float('nan'), float('nan')]
  tail = 100 * (1 - level) / 2
  return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]


def star_rows(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """Per varied dimension, the centre's rows and that dimension's (from the ledger's star_dim column)."""
  centre = [r for r in rows if r.get('star_dim') == 'centre']
  dims = sorted({r['star_dim'] for r in rows if r.get('star_dim') not in (None, '', 'centre')})
  return {k: centre + [r for r in rows if r.get('star_dim') == k] for k in dims}


def analyse_shapes(rows: list[dict[str, Any]], metric: str, *, samples: int, seed: int,
                   budget_factor: float = 10.0) -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
  """Each dimension's law, s_k with its interval, the predicted optimal x_k at `budget_factor` x the study's
  largest compute, and whether the data are informative enough to trust s_k (see `_verdict`)."""
  groups = star_rows(rows)
  if not groups:
    raise ValueError("The ledger has no star rows (column star_dim): run a study with study.grid='star'.")
  largest = max(r['train_flops'] for r in rows)
  budget = largest * budget_factor
  out: dict[str, Any] = {'law': 'f_k = alpha x^-a + (beta x^b + xi) t^-c + eps, t = training FLOPs',
                         'budget_factor': budget_factor, 'budget': budget, 'largest_compute': largest, 'dims': {}}
  all_draws = {}
  for dim, group in groups.items():
    x = np.array([r[dim] for r in group], np.float64)
    t = np.array([r['train_flops'] for r in group], np.float64)
    y = np.array([r[metric] for r in group], np.float64)
    try:
      fit = fit_shape_law(x, t, y, dim=dim)
    except ValueError as e:
      out['dims'][dim] = {'skipped': str(e)}
      continue
    draws = bootstrap_shape(fit, samples=samples, seed=seed)
    all_draws[dim] = draws
    s_draws = np.array([exponent(d) for d in draws])
    x_star = float(optimal_x(fit.params, budget))
    x_star_draws = np.array([float(optimal_x(d, budget)) for d in draws])
    x_now = float(optimal_x(fit.params, largest))
    finite = np.isfinite(x_star_draws)
    result = {'n_runs': len(y), 'values': sorted(set(x.tolist())), 'x': x.tolist(), 't': t.tolist(), 'y': y.tolist(),
              'params': {k: float(v) for k, v in fit.params.items()},
              'ci95': {p: _interval([d[p] for d in draws]) for p in PARAMS}, 'rmse_log': fit.rmse_log,
              'at_bound': list(fit.at_bound), 's': exponent(fit.params), 's_ci95': _interval(s_draws),
              'x_opt_at_largest': x_now, 'x_opt_at_budget': x_star,
              'x_opt_at_budget_ci95': _interval(x_star_draws[finite]) if finite.mean() >= 0.9 else
                                      [float('nan'), float('nan')],
              'finite_optimum_fraction': float(finite.mean()) if draws else float('nan'),
              'bootstrap_samples': len(draws)}
    result.update(_verdict(result, x))
    out['dims'][dim] = result
  return out, all_draws


def _verdict(result: dict[str, Any], x: np.ndarray) -> dict[str, Any]:
  """Whether s_k is supported: every check must pass (each failing one is named)."""
  s, (lo, hi) = result['s'], result['s_ci95']
  problems = []
  if result['at_bound']:
    problems.append(f'{", ".join(result["at_bound"])} ended on a search limit or at 0')
  if not result['finite_optimum_fraction'] >= 0.9:
    problems.append(f'only {100 * result["finite_optimum_fraction"]:.0f}% of bootstrap refits have an optimum '
                    '(beta > 0)')
  if not (np.isfinite(lo) and hi - lo < abs(s)):
    problems.append(f's 95% interval [{lo:.3g}, {hi:.3g}] is wider than s itself')
  if not x.min() <= result['x_opt_at_largest'] <= x.max():
    problems.append(f'the optimum at the study\'s largest compute ({result["x_opt_at_largest"]:.3g}) lies outside '
                    f'the sampled values [{x.min():g}, {x.max():g}], so it is extrapolated, not observed')
  return {'trusted': not problems, 'problems': problems}
