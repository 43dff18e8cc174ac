"""Acceptance: a digits run killed with kill -9 at N random moments and restarted each time ends bitwise equal to
an uninterrupted run (params and optimizer state), with the same final_metrics.json (all fields except the
wall-clock ones, train_seconds and resumed_from_step).

  python experiments/reliability/kill9_resume.py [--task classification|dino|mae] [--kills 10] [--seed 0]
      [--out /tmp/vit_jax_kill9]

Runs the real CLI (`python -m vit_jax.main`, configs/default.py or, with --task dino, configs/dino_digits.py whose
state adds the teacher and the centre, or with --task mae, configs/mae_digits.py whose masks come from seed and
step) on one CPU device with a shortened
schedule (--steps, a checkpoint every 20 steps so kills also land mid-save). Each attempt is killed at a random
moment after it has trained past its resume point. Prints one JSON summary as its last line; exit status 1 if
anything differs.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import shutil
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
TIME_FIELDS = ('train_seconds', 'resumed_from_step')
# The digits config of each task (every task resumes exactly: its own state is part of the checkpoint).
TASK_CONFIGS = {'classification': 'configs/default.py', 'dino': 'configs/dino_digits.py',
                'mae': 'configs/mae_digits.py'}


flags.DEFINE_enum('task', 'classification', sorted(TASK_CONFIGS), 'which task\'s digits config to run')
flags.DEFINE_integer('kills', 10, 'how many times the run is killed', lower_bound=1)
flags.DEFINE_integer('seed', 0, 'seed of the kill moments')
flags.DEFINE_integer('steps', 600, 'train steps of the shortened schedule', lower_bound=1)
flags.DEFINE_float('max_delay', 8.0, 'kill uniform(0, max_delay) s after the attempt wrote its first new checkpoint')
flags.DEFINE_string('out', '/tmp/vit_jax_kill9', 'directory for the runs and logs (emptied first)')


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  args = flags.FLAGS

  out = pathlib.Path(args.out)
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2',
         'PYTHONPATH': f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}
  data_dir = out / 'tfds'
  subprocess.run([sys.executable, '-c', 'import tensorflow_datasets as tfds, vit_jax.datasets; '
                  f'tfds.builder("digits", data_dir="{data_dir}").download_and_prepare()'],
                 env=env, cwd=ROOT, check=True, capture_output=True)

  def cmd(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/{TASK_CONFIGS[args.task]}',
            f'--workdir={workdir}',
            f'--config.dataset.data_dir={data_dir}', f'--config.total_steps={args.steps}',
            '--config.checkpoint_every=20', '--config.eval_every=200', '--config.log_every=50']

  t0 = time.time()
  ref_dir = out / 'uninterrupted'
  subprocess.run(cmd(ref_dir), env=env, cwd=ROOT, check=True, capture_output=True)
  ref_seconds = time.time() - t0

  rng = random.Random(args.seed)
  run_dir, kills, t1 = out / 'killed', [], time.time()
  ckpts = run_dir / 'checkpoints'
  saved = lambda: sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []
  while len(kills) < args.kills:
    # Kill at a random moment once this attempt has trained (its first new checkpoint exists), up to
    # --max_delay seconds later: the moment falls anywhere in the step/save cycle, including mid-save.
    before = max(saved(), default=0)
    with open(out / f'attempt_{len(kills)}.log', 'w') as log:
      proc = subprocess.Popen(cmd(run_dir), env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
      started = time.time()
      while max(saved(), default=0) <= before and proc.poll() is None:
        time.sleep(0.05)
      delay = rng.uniform(0.0, args.max_delay)
      try:
        proc.wait(timeout=delay)
        raise SystemExit(f'The run finished before kill {len(kills) + 1}; use more --steps.')
      except subprocess.TimeoutExpired:
        proc.kill()  # SIGKILL
        proc.wait()
    leftovers = sorted(p.name for p in ckpts.iterdir() if 'tmp' in p.name)
    kills.append({'resumed_from': before, 'killed_after_s': round(time.time() - started, 2),
                  'checkpoints': saved(), 'unfinished_saves': leftovers})
    print(json.dumps(kills[-1]), flush=True)
  with open(out / 'final_attempt.log', 'w') as log:
    subprocess.run(cmd(run_dir), env=env, cwd=ROOT, check=True, stdout=log, stderr=subprocess.STDOUT)
  killed_seconds = time.time() - t1

  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  restore = lambda d: ocp.StandardCheckpointer().restore(d / 'checkpoints' / str(args.steps) / 'default')
  a, b = restore(ref_dir), restore(run_dir)
  leaves_a, leaves_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  differing = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(leaves_a, leaves_b)
               if np.asarray(x).tobytes() != np.asarray(y).tobytes()]
  same_structure = [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  fa = json.loads((ref_dir / 'final_metrics.json').read_text())
  fb = json.loads((run_dir / 'final_metrics.json').read_text())
  metric_diffs = {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
                  if k not in TIME_FIELDS and fa.get(k) != fb.get(k)}
  quarantined = sorted(p.name for p in (run_dir / 'checkpoints_corrupt').iterdir()) \
      if (run_dir / 'checkpoints_corrupt').exists() else []
  summary = {
      'task': args.task, 'kills': len(kills), 'steps': args.steps, 'leaves_compared': len(leaves_a),
      'bitwise_equal_state': same_structure and not differing, 'differing_leaves': differing[:10],
      'final_metrics_equal': not metric_diffs, 'final_metrics_diffs': metric_diffs,
      'excluded_fields': list(TIME_FIELDS), 'quarantined': quarantined,
      'eval_accuracy': fb.get('eval_accuracy'), 'eval_loss': fb.get('eval_loss'),
      'resumed_from_step': fb.get('resumed_from_step'),
      'uninterrupted_s': round(ref_seconds, 1), 'killed_and_restarted_s': round(killed_seconds, 1),
  }
  print(json.dumps(summary))
  return 0 if summary['bitwise_equal_state'] and summary['final_metrics_equal'] else 1


if __name__ == '__main__':
  app.run(main)
