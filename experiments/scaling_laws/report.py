"""report.md of a scaling study: the answers first (the laws, the exponents with their 95% intervals, the
compute-optimal model and length for the next budgets, the shape exponents of a star study), then what the data do
not support (constants at search limits, unbounded or wide intervals, poor extrapolation), then the plots."""
from __future__ import annotations

import math
from typing import Any

from experiments.scaling_laws import laws

AXIS_UNITS = {'compute': 'C (FLOPs)', 'params': 'N (parameters)', 'examples_seen': 'D (examples seen)'}
POOR_EXTRAPOLATION = 0.1  # Mean relative error of the held-out prediction above which the report flags it.


def _fmt(v: float) -> str:
  return f'{v:.4g}' if isinstance(v, (int, float)) and math.isfinite(v) else 'n/a'


def _ci(pair: list[float]) -> str:
  return f'[{_fmt(pair[0])}, {_fmt(pair[1])}]'


def _joint_answers(j: dict[str, Any], metric: str) -> list[str]:
  p, ci, e, eci = j['params'], j['ci95'], j['exponents'], j['exponents_ci95']
  lines = [f'- **Joint law** over all {j["n_runs"]} runs (Huber on log error, {j["bootstrap_samples"]} bootstrap '
           f'refits): {metric} = E0 + A N^-alpha + B D^-beta with E0 = {_fmt(p["E0"])} {_ci(ci["E0"])}, '
           f'alpha = {p["alpha"]:.3f} {_ci(ci["alpha"])}, beta = {p["beta"]:.3f} {_ci(ci["beta"])} '
           f'(A = {_fmt(p["A"])}, B = {_fmt(p["B"])}; RMS log residual {j["rmse_log"]:.3f}).',
           f'- **Compute-optimal allocation** ({j["compute_model"]}): N* ~ C^{e["a"]:.3f} {_ci(eci["a"])}, '
           f'D* ~ C^{e["b"]:.3f} {_ci(eci["b"])}; on that frontier {metric} - E0 ~ C^-{e["b_E"]:.3f} '
           f'{_ci(eci["b_E"])}.', '',
           f'| budget | C (FLOPs) | N* (parameters) | D* (examples seen) | predicted {metric} |',
           '|---|---|---|---|---|']
  for b in j['budgets']:
    lines.append(f'| {b["factor"]:g}x the largest run | {_fmt(b["compute"])} | {_fmt(b["N"])} {_ci(b["N_ci95"])} | '
                 f'{_fmt(b["D"])} {_ci(b["D_ci95"])} | {_fmt(b["E"])} {_ci(b["E_ci95"])} |')
  return lines + ['']


def _shape_answers(s: dict[str, Any]) -> list[str]:
  lines = [f'- **Shape laws** (SoViT star; {s["law"]}): each dimension\'s compute-optimal exponent s_k '
           f'(x_k* ~ C^s_k, the other dimensions at the star\'s centre) and its optimum at {s["budget_factor"]:g}x '
           f'the largest run ({_fmt(s["budget"])} FLOPs):', '',
           '| dimension | runs | s_k [95%] | optimum at largest run | optimum at next budget [95%] | trusted? |',
           '|---|---|---|---|---|---|']
  for dim, r in s['dims'].items():
    if 'skipped' in r:
      lines.append(f'| {dim} | | skipped: {r["skipped"]} | | | no |')
      continue
    lines.append(f'| {dim} | {r["n_runs"]} | {r["s"]:.3f} {_ci(r["s_ci95"])} | {_fmt(r["x_opt_at_largest"])} | '
                 f'{_fmt(r["x_opt_at_budget"])} {_ci(r["x_opt_at_budget_ci95"])} | '
                 f'{"yes" if r["trusted"] else "no"} |')
  return lines + ['']


def _axis_table(results: dict[str, Any]) -> list[str]:
  lines = ['| x | runs fitted | a | b | c | d | RMS log residual |', '|---|---|---|---|---|---|---|']
  for axis, fit in results['fits'].items():
    if 'a' not in fit:
      lines.append(f'| {AXIS_UNITS[axis]} | {fit["n_fitted"]} | skipped: {fit["skipped"]} | | | | |')
      continue
    cells = [_fmt(fit[k]) + ' ' + _ci(fit['ci95'][k]) for k in laws.PARAM_NAMES]
    lines.append(f'| {AXIS_UNITS[axis]} | {fit["n_fitted"]} ({fit["runs_fitted"]}) | ' + ' | '.join(cells) +
                 f' | {fit["rmse_log"]:.3f} |')
  return lines


def _limits(results: dict[str, Any]) -> list[str]:
  """What the data do not support, one bullet each."""
  metric, out = results['metric'], []
  for axis, fit in results['fits'].items():
    if fit.get('warning'):
      out.append(f'- {axis} law: {fit["warning"]}')
    elif 'skipped' in fit:
      out.append(f'- {axis} law: skipped, {fit["skipped"]}')
  j = results.get('joint', {})
  if 'skipped' in j:
    out.append(f'- Joint law: skipped, {j["skipped"]}')
  elif j.get('warning'):
    out.append(f'- Joint law: {j["warning"]}')
  for dim, r in results.get('shapes', {}).get('dims', {}).items():
    if r.get('problems'):
      out.append(f'- Shape law of {dim}: s_k is not supported: ' + '; '.join(r['problems']) + '.')
  e = results['extrapolation']
  if 'mean_rel_error' in e and e['mean_rel_error'] > POOR_EXTRAPOLATION:
    out.append(f'- Extrapolation: the compute law fitted without the top {e["n_held_out_runs"]} runs misses them by '
               f'{100 * e["mean_rel_error"]:.1f}% on average (above {100 * POOR_EXTRAPOLATION:.0f}%): predictions '
               'beyond the study are not reliable.')
  if results['zero_error_runs']:
    out.append(f'- {len(results["zero_error_runs"])} runs reached {metric} = 0, which a log-space fit cannot use: '
               'they are left out, so the frontier is drawn through the runs they beat. Use a harder eval or a '
               f'finer metric (e.g. eval_loss). Runs: {", ".join(results["zero_error_runs"])}.')
  return out or ['- Nothing flagged: no constant at a search limit, every interval bounded, extrapolation within '
                 f'{100 * POOR_EXTRAPOLATION:.0f}%.']


def _extrapolation(e: dict[str, Any]) -> list[str]:
  lines = ['## Extrapolation check', '',
           f'Held out the {e["n_held_out_runs"]} highest-compute runs (C >= {_fmt(e["x_cut"])} FLOPs); fitted '
           f'{"the frontier of " if e["runs"] == "frontier" else ""}the other {e["n_fit_runs"]}.', '']
  if 'skipped' in e:
    return lines + [f'Skipped: {e["skipped"]}', '']
  f = e['fit']
  lines += [f'Fit without them: a={_fmt(f["a"])}, b={f["b"]:.3f}, c={f["c"]:.4f}, d={_fmt(f["d"])}.', '',
            '| C (FLOPs) | actual | predicted | abs error | rel error |', '|---|---|---|---|---|']
  lines += [f'| {_fmt(p["x"])} | {p["actual"]:.4f} | {p["predicted"]:.4f} | {p["abs_error"]:.4f} | '
            f'{100 * p["rel_error"]:.1f}% |' for p in e['points']]
  return lines + ['', f'Mean absolute prediction error {e["mean_abs_error"]:.4f} '
                  f'({100 * e["mean_rel_error"]:.1f}% relative).', '']


def report_markdown(results: dict[str, Any], ledger_path: str) -> str:
  """The whole report.md."""
  metric = results['metric']
  lines = [f'# Scaling-law report: {metric}', '',
           f'Ledger: `{ledger_path}` ({results["n_runs"]} runs'
           + (f'; dropped without a positive {metric}: {", ".join(results["dropped_runs"])}' if results['dropped_runs']
              else '') + ').', '', '## Answers', '']
  if 'params' in results.get('joint', {}):
    lines += _joint_answers(results['joint'], metric)
  c = results['fits']['compute']
  if 'a' in c:
    lines += [f'- **Compute law** ({c["runs_fitted"]} runs, {c["n_fitted"]} fitted): {metric} = {_fmt(c["a"])} · '
              f'(C + {_fmt(c["d"])})^-{c["b"]:.3f} + {c["c"]:.4f}, b {_ci(c["ci95"]["b"])}, '
              f'c {_ci(c["ci95"]["c"])} (95% profile likelihood).', '']
  if 'shapes' in results:
    lines += _shape_answers(results['shapes'])
  lines += ['## What the data do not support', ''] + _limits(results) + ['']
  lines += ['## Per-axis laws', '',
            f'{metric} = a * (x + d)^(-b) + c (Zhai et al. 2021), relative least squares; 95% profile-likelihood '
            'intervals with the noise scale estimated from the residuals (calibration.py measures their coverage).',
            ''] + _axis_table(results) + ['']
  lines += _extrapolation(results['extrapolation'])
  plots = [('error vs compute', 'error_vs_compute.png'), ('error vs parameters', 'error_vs_params.png'),
           ('error vs examples seen', 'error_vs_examples.png'), ('iso-FLOP curves', 'isoflop.png'),
           ('residuals', 'residuals.png')]
  if 'params' in results.get('joint', {}):
    plots.insert(0, ('joint law: iso-loss contours and compute-optimal frontier', 'joint.png'))
  if any('params' in r for r in results.get('shapes', {}).get('dims', {}).values()):
    plots.insert(1, ('shape laws', 'shapes.png'))
  lines += ['## Plots', ''] + [f'![{title}]({name})\n' for title, name in plots]
  return '\n'.join(lines)
