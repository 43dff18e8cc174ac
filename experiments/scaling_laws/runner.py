"""Executes a study's runs: skip finished ones, resume unfinished ones, seed branches from trunk checkpoints.

Used by the sweep CLI (sweep.py); see study.py for how runs, trunks and branches are laid out.
"""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import jax
import ml_collections
from absl import logging
from etils import epath

from vit_jax import checkpoint, input_pipeline, train

from experiments.scaling_laws import ledger, study as study_lib


def run_dir_of(root: epath.Path, run: study_lib.Run) -> epath.Path:
  return root / study_lib.RUNS_DIRNAME / run.name


class RunPreempted(RuntimeError):
  """A run stopped early on preemption; its checkpoint is saved and rerunning the same command resumes it."""


def finished_metrics(run_dir: epath.Path, total_steps: int) -> Optional[dict[str, Any]]:
  """final_metrics.json of a run that reached `total_steps`, else None."""
  path = run_dir / train.FINAL_METRICS_FILENAME
  if not path.exists():
    return None
  final = json.loads(path.read_text())
  return final if final.get('step') == total_steps else None


def seed_branch(root: epath.Path, run: study_lib.Run, trunk: study_lib.Run) -> None:
  """Gives a branch run the trunk's checkpoint at its branch step, unless it already has checkpoints of its own.

  The trunk's workdir must hold `trunk`'s config: a changed study must never seed from an old trunk.
  """
  run_dir = run_dir_of(root, run)
  ckpt_dir = run_dir / checkpoint.CHECKPOINT_DIRNAME
  if ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
    return  # Resume the branch's own progress.
  trunk_dir = run_dir_of(root, trunk)
  source = trunk_dir / checkpoint.CHECKPOINT_DIRNAME / str(run.branch_step)
  if not source.exists():
    raise FileNotFoundError(
        f'Branch {run.name} starts from step {run.branch_step} of run {trunk.name}, but {source} does not exist. '
        f'Train {trunk.name} first (a local sweep does; with --emit_commands run stage 1 before stage 2).')
  ledger.check_identity(trunk_dir, trunk, required=True)
  checkpoint.claim_workdir(str(run_dir), run.config)
  tmp = run_dir / '.branch_seed_tmp'
  if tmp.exists():
    shutil.rmtree(tmp)  # Our own partial copy from an interrupted attempt.
  shutil.copytree(source, tmp)
  ckpt_dir.mkdir(parents=True, exist_ok=True)
  os.replace(tmp, ckpt_dir / str(run.branch_step))
  logging.info('Branch %s starts from %s.', run.name, source)


def train_run(root: epath.Path, run: study_lib.Run, trunk: Optional[study_lib.Run]) -> dict[str, Any]:
  """Trains (or resumes) `run`, adding the attempt's wall time even when it fails; raises RunPreempted."""
  run_dir = run_dir_of(root, run)
  if run.trunk:
    if trunk is None or trunk.name != run.trunk:
      raise ValueError(f'Branch {run.name} needs its trunk run {run.trunk}, got {trunk and trunk.name}.')
    seed_branch(root, run, trunk)
  start = time.time()
  try:
    final = train.train_and_evaluate(run.config, str(run_dir))
  finally:
    if run_dir.exists():
      ledger.record_wall_time(run_dir, time.time() - start, jax.device_count())
  if 'preempted_at_step' in final:
    raise RunPreempted(f'Run {run.name} was preempted at step {final["preempted_at_step"]} of '
                       f'{run.config.total_steps}; its checkpoint is saved and no ledger row was written. Rerun the '
                       'same command to resume.')
  return final


def execute(root: epath.Path, run: study_lib.Run, study: ml_collections.ConfigDict,
            trunk: Optional[study_lib.Run] = None) -> str:
  """Trains `run` (a branch from `trunk`) unless finished, then writes its ledger row.

  Returns 'skipped', 'reprobed' (finished, but the few-shot settings changed), 'trained' or 'row'.
  """
  run_dir = run_dir_of(root, run)
  ledger.check_identity(run_dir, run)
  row = ledger.read_row(run_dir)
  if row is not None:
    if ledger.probe_is_current(row, study):
      logging.info('Run %s is finished; skipped.', run.name)
      return 'skipped'
    ledger.write_row(run_dir, ledger.reprobe(row, run, study, run_dir))
    return 'reprobed'
  final = finished_metrics(run_dir, run.config.total_steps)
  outcome = 'row' if final is not None else 'trained'
  if final is None:
    final = train_run(root, run, trunk)
  ledger.write_row(run_dir, ledger.make_row(run, study, root, final))
  return outcome


def check_before_training(root: epath.Path, runs: list[study_lib.Run], study: ml_collections.ConfigDict) -> None:
  """Refuses a changed study, or too few training examples, before any run trains."""
  for run in runs:
    ledger.check_identity(run_dir_of(root, run), run)
  largest = max(int(n) for n in study.train_examples)
  if largest:
    available = input_pipeline.get_dataset_info(study.base.dataset).num_train_examples
    if largest > available:
      raise ValueError(f'study.train_examples asks for {largest} examples, but {study.base.dataset.train_split!r} '
                       f'has only {available}; lower study.train_examples (0: the whole split).')


def _config_args(argv: list[str]) -> list[str]:
  """The --config and --config.* arguments of this command line, to repeat in emitted commands."""
  out, i = [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config'):
      if '=' in arg:
        out.append(arg)
      elif i + 1 < len(argv):
        out.append(f'{arg}={argv[i + 1]}')
        i += 1
    i += 1
  return out


def emit_commands(runs: list[study_lib.Run], workdir: str, argv: list[str]) -> list[str]:
  """One shell command per run, grouped in stages, then the ledger command."""
  base = ['python', '-m', 'experiments.scaling_laws.sweep', *_config_args(argv), f'--workdir={workdir}']

  def quote(parts: list[str]) -> str:
    return ' '.join(shlex.quote(p) for p in parts)

  lines = ['# Stage 1: trunks and independent runs (in parallel).']
  lines += [quote(base + [f'--only={r.name}']) for r in runs if not r.trunk]
  branches = [r for r in runs if r.trunk]
  if branches:
    lines.append('# Stage 2, after stage 1 has finished: cooldown branches (in parallel).')
    lines += [quote(base + [f'--only={r.name}']) for r in branches]
  lines.append('# Last, after all runs: the ledger.')
  lines.append(quote(base + ['--ledger_only']))
  return lines


def run_study(study: ml_collections.ConfigDict, workdir: str, *, only: Optional[str] = None,
              ledger_only: bool = False) -> tuple[str, int, int]:
  """Trains the study's runs in order (or just `only`), then rebuilds the ledger. Returns (ledger path, rows, runs).

  With `only`, the ledger is not written (concurrent cluster jobs); the final --ledger_only job writes it.
  """
  runs = study_lib.expand(study)
  by_name = {r.name: r for r in runs}
  root = epath.Path(workdir)
  if only is not None and only not in by_name:
    raise ValueError(f'--only={only} is not a run of this study; its runs are {list(by_name)}.')
  if not ledger_only:
    check_before_training(root, runs, study)
  if only is not None:
    run = by_name[only]
    execute(root, run, study, by_name.get(run.trunk))
    return '', 0, len(runs)
  root.mkdir(parents=True, exist_ok=True)
  if not ledger_only:
    start = time.time()
    for i, run in enumerate(runs):
      logging.info('Run %d/%d: %s', i + 1, len(runs), run.name)
      outcome = execute(root, run, study, by_name.get(run.trunk))
      path, count = ledger.write_ledger(root, runs, study)
      logging.info('Run %s: %s (%.0f s into the sweep); %s has %d rows.', run.name, outcome, time.time() - start,
                   path, count)
  path, count = ledger.write_ledger(root, runs, study)
  return path, count, len(runs)


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]  # Where `python -m experiments.scaling_laws.sweep` runs.
LOGS_DIRNAME = 'logs'

# launch(lane, log_path) -> a started process (subprocess.Popen-like: poll(), wait(), send_signal(), returncode).
Launcher = Callable[[int, pathlib.Path], Any]


def split_lanes(runs: list[study_lib.Run], lanes: int) -> list[list[study_lib.Run]]:
  """The runs in `lanes` independent queues: a trunk and its branches stay together, trunk first (so no lane waits on
  another), and each group goes to the lane with the fewest steps to train so far (a branch trains only its
  cooldown: steps - branch_step)."""
  if lanes < 1:
    raise ValueError(f'--parallel={lanes} must be >= 1.')
  groups: dict[str, list[study_lib.Run]] = {}
  for run in runs:
    groups.setdefault(run.trunk or run.name, []).append(run)
  cost = lambda group: sum(r.steps - r.branch_step for r in group)
  queues: list[list[study_lib.Run]] = [[] for _ in range(lanes)]
  for group in sorted(groups.values(), key=cost, reverse=True):
    lightest = min(range(lanes), key=lambda i: (cost(queues[i]), i))
    queues[lightest].extend(group)
  return queues


def run_lane(study: ml_collections.ConfigDict, workdir: str, *, lane: int, lanes: int) -> None:
  """Trains lane `lane` of `split_lanes(runs, lanes)` in this process, one run after another (no ledger: the
  process that started the lanes writes it)."""
  runs = study_lib.expand(study)
  queues = split_lanes(runs, lanes)
  if not 0 <= lane < lanes:
    raise ValueError(f'--lane={lane} must be in [0, {lanes}).')
  root = epath.Path(workdir)
  check_before_training(root, runs, study)
  by_name = {r.name: r for r in runs}
  for i, run in enumerate(queues[lane]):
    logging.info('Lane %d, run %d/%d: %s', lane, i + 1, len(queues[lane]), run.name)
    execute(root, run, study, by_name.get(run.trunk))


def sweep_launcher(workdir: str, argv: list[str], lanes: int) -> Launcher:
  """Starts `python -m experiments.scaling_laws.sweep <the same --config args> --parallel=N --lane=K`, its output
  to a log file."""
  base = [sys.executable, '-m', 'experiments.scaling_laws.sweep', *_config_args(argv), f'--workdir={workdir}',
          f'--parallel={lanes}']

  def launch(lane: int, log_path: pathlib.Path) -> subprocess.Popen:
    with open(log_path, 'ab') as log:
      return subprocess.Popen(base + [f'--lane={lane}'], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
  return launch


def run_parallel(study: ml_collections.ConfigDict, workdir: str, *, workers: int, launch: Launcher,
                 poll_seconds: float = 0.5) -> tuple[str, int, int]:
  """Trains the study in `workers` lanes at once, each a process of its own (`split_lanes`), then writes the ledger.

  For a machine with more cores than one small run keeps busy (a tiny model's step is mostly serial Python and
  dispatch). Each lane imports and compiles once for all its runs; its output goes to DIR/logs/lane_K.log. A lane
  that fails or is preempted does not stop the others; the error names it and its log. SIGTERM to this process is
  passed on to the lanes, so their runs checkpoint; rerunning the same command resumes, skipping finished runs.
  """
  runs = study_lib.expand(study)
  split_lanes(runs, workers)  # Checks `workers`.
  root = epath.Path(workdir)
  check_before_training(root, runs, study)
  root.mkdir(parents=True, exist_ok=True)
  logs = pathlib.Path(os.fspath(root)) / LOGS_DIRNAME
  logs.mkdir(exist_ok=True)
  log_paths = [logs / f'lane_{lane}.log' for lane in range(workers)]
  procs: list[Any] = []
  stopping = []
  previous = signal.getsignal(signal.SIGTERM)

  def on_sigterm(signum, frame):
    del frame
    stopping.append(signum)
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
  signal.signal(signal.SIGTERM, on_sigterm)
  start = time.time()
  try:
    for lane, log_path in enumerate(log_paths):
      procs.append(launch(lane, log_path))
      logging.info('Lane %d started; its output goes to %s.', lane, log_path)
    while any(proc.poll() is None for proc in procs):
      time.sleep(poll_seconds)
  finally:
    for proc in procs:  # Only on an exception here: let the runs checkpoint and exit.
      if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait()
    signal.signal(signal.SIGTERM, previous)
  path, count = ledger.write_ledger(root, runs, study)
  logging.info('Lanes finished in %.0f s; %s has %d of %d rows.', time.time() - start, path, count, len(runs))
  failed = {lane: proc.returncode for lane, proc in enumerate(procs) if proc.returncode != 0}
  crashed = {lane: code for lane, code in failed.items() if code != 1}
  if crashed:
    raise RuntimeError('Lanes failed: ' + '; '.join(f'lane {lane} (exit {code}, log {log_paths[lane]})'
                                                     for lane, code in crashed.items()) +
                       f'. {count} of {len(runs)} runs are finished. Fix the cause and rerun the same command: '
                       'finished runs are skipped.')
  if failed or stopping:
    raise RunPreempted(f'The sweep was stopped with {count} of {len(runs)} runs finished (preempted lanes: '
                       f'{sorted(failed) or "none"}). Rerun the same command to resume.')
  return str(path), count, len(runs)
