"""Trains a scaling study's grid and writes its ledger.

  python -m experiments.scaling_laws.sweep --config=experiments/scaling_laws/configs/NAME.py --workdir=DIR
      [--config.base.dataset.data_dir=...] [--parallel=N] [--emit_commands] [--only=RUN] [--ledger_only]

Locally the runs train one after another (trunks before the branches that start from their checkpoints; see
study.py) and DIR/ledger.csv is rewritten after each; --parallel=N trains N lanes at once, each a process of its own
that trains its share one run after another (a trunk and its branches in one lane; logs in DIR/logs/), which suits
small runs on a multi-core CPU. A run whose ledger row exists is skipped; an unfinished one
resumes from its latest checkpoint (vit_jax.train does that). --emit_commands prints one command per run for a
cluster scheduler, in stages: stage 2 (branches) needs stage 1 (trunks) finished, and the last command builds the
ledger. A run's workdir is DIR/runs/NAME; a workdir that holds a different config is refused before anything trains,
and nothing is changed. A preempted run exits with status 1: rerun the same command to resume it. Changed
study.fewshot settings recompute only the probe of finished runs.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Study config (experiments/scaling_laws/configs/NAME.py).',
                                          lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Study directory: runs/, ledger.csv.')
_EMIT = flags.DEFINE_bool('emit_commands', False, 'Print one command per run (for a cluster scheduler); train nothing.')
_ONLY = flags.DEFINE_string('only', None, 'Train only this run (a name printed by --emit_commands).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'Lanes of runs to train at once, each a process of its own (1: all '
                                 'in this process). A small run keeps about one core busy.', lower_bound=1)
_LANE = flags.DEFINE_integer('lane', None, 'Internal (started by --parallel): train only this lane of the runs.')
_LEDGER_ONLY = flags.DEFINE_bool('ledger_only', False, 'Train nothing; rebuild DIR/ledger.csv from finished runs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Imported after flag parsing, so --help is fast and TensorFlow loads only when needed.
  import jax  # pylint: disable=g-import-not-at-top
  from experiments.scaling_laws import runner, study as study_lib  # pylint: disable=g-import-not-at-top

  # Runs of one shape compile the same init, eval and feature functions (and the same train step for equal
  # lengths): a persistent compilation cache in the study directory compiles each once, across processes too.
  jax.config.update('jax_compilation_cache_dir', os.path.join(_WORKDIR.value, '.jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

  if _EMIT.value:
    print('\n'.join(runner.emit_commands(study_lib.expand(_CONFIG.value), _WORKDIR.value, sys.argv[1:])))
    return
  try:
    if _LANE.value is not None:
      runner.run_lane(_CONFIG.value, _WORKDIR.value, lane=_LANE.value, lanes=_PARALLEL.value)
      return
    if _PARALLEL.value > 1 and not (_ONLY.value or _LEDGER_ONLY.value):
      path, count, total = runner.run_parallel(_CONFIG.value, _WORKDIR.value, workers=_PARALLEL.value,
                                               launch=runner.sweep_launcher(_WORKDIR.value, sys.argv[1:],
                                                                            _PARALLEL.value))
    else:
      path, count, total = runner.run_study(_CONFIG.value, _WORKDIR.value, only=_ONLY.value,
                                            ledger_only=_LEDGER_ONLY.value)
  except runner.RunPreempted as e:
    sys.exit(f'Preempted: {e}')  # Exit status 1: the scheduler should rerun this command.
  if path:
    missing = total - count
    print(f'Ledger: {path} ({count} of {total} runs' +
          (f'; {missing} not finished or with a stale probe, see the log)' if missing else ')'))


if __name__ == '__main__':
  app.run(main)
