"""Matplotlib figures of a scaling study (PNG, Agg backend): error vs compute, parameters and examples seen with
their frontiers and fits, iso-FLOP curves, and fit residuals."""
from __future__ import annotations

from typing import Any, Optional

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from experiments.scaling_laws import laws  # noqa: E402  pylint: disable=g-import-not-at-top

_AXIS_LABELS = {'train_flops': 'training compute (FLOPs)', 'num_params': 'parameters',
                'examples_seen': 'examples seen'}


def _band(x_grid: np.ndarray, draws: list[dict[str, float]], level: float = 0.95) -> Optional[tuple]:
  if len(draws) < 10:
    return None
  curves = np.array([laws.power_law(x_grid, **d) for d in draws])
  tail = 100 * (1 - level) / 2
  return np.percentile(curves, tail, axis=0), np.percentile(curves, 100 - tail, axis=0)


def _grid(x: np.ndarray, extend: float = 3.0) -> np.ndarray:
  return np.logspace(np.log10(x.min()) - 0.1, np.log10(x.max() * extend), 200)


def _law_label(fit: dict[str, Any], unit: str) -> str:
  return f'fit: {fit["a"]:.3g}·({unit} + {fit["d"]:.3g})^-{fit["b"]:.3f} + {fit["c"]:.4f}'


def plot_axis(path: str, rows: list[dict[str, Any]], x_key: str, metric: str, fit: dict[str, Any],
              draws: list[dict[str, float]], *, color_key: str, color_label: str,
              extrapolation: Optional[dict[str, Any]] = None) -> None:
  """Error vs `x_key` for every run (coloured by `color_key`), the frontier, the fit with its 95% band and, for
  compute, the held-out extrapolation fit."""
  x = np.array([r[x_key] for r in rows], np.float64)
  y = np.array([r[metric] for r in rows], np.float64)
  colors = np.array([r[color_key] for r in rows], np.float64)
  small = np.array([r['train_examples'] for r in rows]) < max(r['train_examples'] for r in rows)
  fig, ax = plt.subplots(figsize=(7, 5))
  norm = matplotlib.colors.LogNorm(colors.min(), colors.max()) if colors.min() > 0 else None
  for mask, marker, label in ((~small, 'o', 'whole train split'), (small, 's', 'train subset')):
    if mask.any():
      sc = ax.scatter(x[mask], y[mask], c=colors[mask], cmap='viridis', norm=norm, marker=marker, s=36,
                      edgecolors='none', alpha=0.85, label=f'runs ({label})')
  fig.colorbar(sc, ax=ax, label=color_label)
  front = laws.pareto_frontier(x, y)
  ax.plot(x[front], y[front], 'k--', lw=1, alpha=0.6)
  ax.scatter(x[front], y[front], facecolors='none', edgecolors='k', s=90, label='Pareto frontier')
  if 'a' in fit:
    grid = _grid(x)
    ax.plot(grid, laws.power_law(grid, fit['a'], fit['b'], fit['c'], fit['d']), 'r-', lw=2,
            label=_law_label(fit, 'x'))
    band = _band(grid, draws)
    if band is not None:
      ax.fill_between(grid, band[0], band[1], color='r', alpha=0.15, label='95% bootstrap band')
    if fit['c'] > 0.05 * y.min():  # A c far below every error is not worth stretching the axis for.
      ax.axhline(fit['c'], color='r', ls=':', lw=1, label=f'c = {fit["c"]:.4f} (irreducible)')
  if extrapolation is not None and 'fit' in extrapolation:
    grid = _grid(x)
    e = extrapolation['fit']
    ax.plot(grid, laws.power_law(grid, e['a'], e['b'], e['c'], e['d']), color='tab:orange', ls='-.', lw=1.5,
            label=f'fit below {extrapolation["x_cut"]:.2g} FLOPs (extrapolated)')
    ax.axvline(extrapolation['x_cut'], color='tab:orange', ls=':', lw=1)
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_ylim(y.min() / 4, y.max() * 1.5)  # Keep the data in view when a band or extrapolation runs far below.
  ax.set_xlabel(_AXIS_LABELS.get(x_key, x_key))
  ax.set_ylabel(metric)
  ax.set_title(f'{metric} vs {_AXIS_LABELS.get(x_key, x_key)}')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=7, loc='lower left', framealpha=0.8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_isoflop(path: str, rows: list[dict[str, Any]], metric: str, levels: int = 5) -> list[dict[str, Any]]:
  """Error vs parameters at fixed compute: each model's error-vs-compute curve (its training lengths, whole train
  split) is interpolated linearly in log-log space at up to `levels` compute values, chosen among those that at
  least two models reach. Returns the plotted points."""
  biggest = max(r['train_examples'] for r in rows)
  by_model: dict[float, list[tuple[float, float]]] = {}
  for r in rows:
    if r['train_examples'] == biggest:
      by_model.setdefault(r['num_params'], []).append((r['train_flops'], r[metric]))
  curves = {n: sorted(v) for n, v in by_model.items() if len(v) >= 2}
  fig, ax = plt.subplots(figsize=(7, 5))
  points: list[dict[str, Any]] = []
  if curves:
    lo = min(v[0][0] for v in curves.values())
    hi = max(v[-1][0] for v in curves.values())
    candidates = [c for c in np.logspace(np.log10(lo), np.log10(hi), 8 * levels)
                  if sum(v[0][0] <= c <= v[-1][0] for v in curves.values()) >= 2]
    if len(candidates) > levels:
      candidates = [candidates[int(i)] for i in np.linspace(0, len(candidates) - 1, levels).round()]
    cmap = plt.get_cmap('plasma')
    for i, c in enumerate(candidates):
      xs, ys = [], []
      for n, v in sorted(curves.items()):
        f, e = np.log([p[0] for p in v]), np.log([p[1] for p in v])
        if f[0] - 1e-9 <= np.log(c) <= f[-1] + 1e-9:
          xs.append(n)
          ys.append(float(np.exp(np.interp(np.log(c), f, e))))
      if len(xs) >= 2:
        color = cmap(i / max(len(candidates) - 1, 1))
        ax.plot(xs, ys, 'o-', color=color, label=f'{c:.2g} FLOPs')
        best = int(np.argmin(ys))
        ax.scatter([xs[best]], [ys[best]], marker='*', s=200, color=color, edgecolors='k', zorder=3)
        points += [{'flops': float(c), 'num_params': float(n), metric: e} for n, e in zip(xs, ys)]
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('parameters')
  ax.set_ylabel(f'{metric} (interpolated)')
  ax.set_title('Iso-FLOP curves (★: best model at that compute)')
  ax.grid(True, which='both', alpha=0.3)
  if points:
    ax.legend(fontsize=8)
  else:
    ax.text(0.5, 0.5, 'needs >= 2 training lengths per model', ha='center', transform=ax.transAxes)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return points


def plot_residuals(path: str, fits: dict[str, dict[str, Any]], extrapolation: Optional[dict[str, Any]]) -> None:
  """log(actual / fitted) of every frontier point of each axis's fit, and of the held-out extrapolation points."""
  fig, axes = plt.subplots(1, len(fits), figsize=(4.5 * len(fits), 4), squeeze=False)
  for ax, (axis, fit) in zip(axes[0], fits.items()):
    if 'a' in fit:
      x, y = np.array(fit['fitted_x']), np.array(fit['fitted_y'])
      resid = np.log(y / laws.power_law(x, fit['a'], fit['b'], fit['c'], fit['d']))
      ax.scatter(x, resid, color='k', label='fitted runs')
      if axis == 'compute' and extrapolation is not None and 'points' in extrapolation:
        px = np.array([p['x'] for p in extrapolation['points']])
        pr = np.log([p['actual'] / p['predicted'] for p in extrapolation['points']])
        ax.scatter(px, pr, marker='^', color='tab:orange', s=60, label='held out (extrapolated)')
      ax.legend(fontsize=7)
    else:
      ax.text(0.5, 0.5, fit.get('skipped', 'no fit'), ha='center', wrap=True, transform=ax.transAxes, fontsize=8)
    ax.axhline(0, color='r', lw=1)
    ax.set_xscale('log')
    ax.set_xlabel(axis)
    ax.set_ylabel('log(actual / fitted)')
    ax.set_title(f'residuals: {axis}')
    ax.grid(True, which='both', alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_joint(path: str, rows: list[dict[str, Any]], metric: str, joint_fit: dict[str, Any],
               draws: list[dict[str, float]]) -> None:
  """The joint law's iso-loss contours over (parameters, examples seen) with every run, iso-FLOP lines, and the
  compute-optimal frontier N*(C), D*(C) (with its 95% bootstrap band) out to the largest budget in the table."""
  from experiments.scaling_laws import joint  # pylint: disable=g-import-not-at-top
  n = np.array([r['num_params'] for r in rows], np.float64)
  d = np.array([r['examples_seen'] for r in rows], np.float64)
  y = np.array([r[metric] for r in rows], np.float64)
  params, k = joint_fit['params'], joint_fit['k']
  top = max(b['compute'] for b in joint_fit['budgets'])
  budgets = np.logspace(np.log10(float((k * n * d).min())), np.log10(top), 60)
  opt = joint.optimal_allocation(params, budgets, k)
  n_lo, n_hi = min(n.min(), opt['N'].min()) / 2, max(n.max(), opt['N'].max()) * 2
  d_lo, d_hi = min(d.min(), opt['D'].min()) / 2, max(d.max(), opt['D'].max()) * 2
  gn, gd = np.meshgrid(np.logspace(np.log10(n_lo), np.log10(n_hi), 200),
                       np.logspace(np.log10(d_lo), np.log10(d_hi), 200))
  fig, ax = plt.subplots(figsize=(7, 5.5))
  surface = joint.joint_law(gn, gd, **params)
  levels = np.quantile(surface, np.linspace(0.02, 0.98, 12))
  contours = ax.contour(gn, gd, surface, levels=np.unique(levels), cmap='viridis', linewidths=1)
  ax.clabel(contours, fontsize=7, fmt='%.3f')
  sc = ax.scatter(n, d, c=y, cmap='viridis', edgecolors='k', s=40, zorder=3, label='runs (colour: error)')
  fig.colorbar(sc, ax=ax, label=metric)
  for c in np.logspace(np.log10(budgets[0]), np.log10(top), 6):
    ns = np.array([n_lo, n_hi])
    ax.plot(ns, c / (k * ns), color='gray', ls=':', lw=0.8)
  ax.plot(opt['N'], opt['D'], 'r-', lw=2, label='compute-optimal N*(C), D*(C)')
  if len(draws) >= 10:
    curves = np.array([joint.optimal_allocation(s, budgets, k)['N'] for s in draws])
    lo, hi = np.percentile(curves, 2.5, axis=0), np.percentile(curves, 97.5, axis=0)
    nd = budgets / k
    ax.fill(np.concatenate([lo, hi[::-1]]), np.concatenate([nd / lo, (nd / hi)[::-1]]), color='r', alpha=0.15,
            label='95% bootstrap band')
  for b in joint_fit['budgets']:
    ax.scatter([b['N']], [b['D']], marker='*', s=200, color='r', edgecolors='k', zorder=4)
    ax.annotate(f'{b["factor"]:g}x', (b['N'], b['D']), textcoords='offset points', xytext=(6, 4), fontsize=8)
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlim(n_lo, n_hi)
  ax.set_ylim(d_lo, d_hi)
  ax.set_xlabel('parameters N')
  ax.set_ylabel('examples seen D')
  ax.set_title('Joint law: iso-loss contours, iso-FLOP lines (dotted), compute-optimal frontier')
  ax.legend(fontsize=7, loc='upper left')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_shapes(path: str, shapes: dict[str, Any]) -> None:
  """Per star dimension: every run's error vs x_k (colour: training FLOPs), the fitted law at fixed compute for a
  few budgets, and its optimum x_k*(C) (stars)."""
  from experiments.scaling_laws import shape_laws  # pylint: disable=g-import-not-at-top
  dims = {k: v for k, v in shapes['dims'].items() if 'params' in v}
  fig, axes = plt.subplots(1, len(dims), figsize=(4.8 * len(dims), 4.2), squeeze=False)
  for ax, (dim, r) in zip(axes[0], dims.items()):
    x, t, y = (np.array(r[k], np.float64) for k in ('x', 't', 'y'))
    norm = matplotlib.colors.LogNorm(t.min(), t.max())
    ax.scatter(x, y, c=t, cmap='plasma', norm=norm, edgecolors='k', s=40, zorder=3)
    grid = np.geomspace(x.min() / 1.5, x.max() * 1.5, 100)
    for c in np.geomspace(t.min(), t.max(), 4):
      color = plt.get_cmap('plasma')(norm(c))
      ax.plot(grid, shape_laws.shape_law(grid, c, **r['params']), color=color, lw=1.2)
      x_opt = float(shape_laws.optimal_x(r['params'], c))
      if grid[0] <= x_opt <= grid[-1]:
        ax.scatter([x_opt], shape_laws.shape_law(x_opt, c, **r['params']), marker='*', s=160, color=color,
                   edgecolors='k', zorder=4)
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel(dim)
    ax.set_ylabel('error')
    ax.set_title(f'{dim}: s = {r["s"]:.2f} [{r["s_ci95"][0]:.2f}, {r["s_ci95"][1]:.2f}]'
                 + ('' if r['trusted'] else ' (not trusted)'), fontsize=9)
    ax.grid(True, which='both', alpha=0.3)
  fig.suptitle('Shape laws at fixed compute (curves) and their optima (stars)', fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
