"""The default scaling study: ViTs of 3.5k to 140k parameters on the offline `digits` dataset, on a CPU.

6 shapes x 4 training lengths x 2 training-set sizes = 48 ledger rows from 12 full runs and 36 short cooldown
branches (rsqrt schedule with linear cooldown). Six roughly geometric sizes, so that each axis's Pareto frontier has
enough points for a fit. About 10 minutes on an idle 2-core CPU (sweep 10:01, fit 8 s measured):

  python -m experiments.scaling_laws.sweep --config=experiments/scaling_laws/configs/digits.py --workdir=DIR
  python -m experiments.scaling_laws.fit --ledger=DIR/ledger.csv --out=DIR/report
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))  # The repo root, for configs/.

from configs import default  # noqa: E402  pylint: disable=g-import-not-at-top
from experiments.scaling_laws import study  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config():
  s = study.base_study()
  s.base = default.get_config()
  s.base.batch_size = 64
  s.base.model.drop_path_rate = 0.0  # These short runs underfit rather than overfit.
  s.base.eval_every = 0               # The final eval of each run is all the ledger needs.
  s.base.log_every = 50
  s.base.checkpoint_every = 1000      # Branches save only their final step (trunks get their own settings).
  s.base.keep_checkpoints = 1
  s.base.optimizer.schedule = 'rsqrt'
  s.base.optimizer.rsqrt_timescale = 200
  s.base.optimizer.warmup_steps = 50
  s.shapes = (
      dict(hidden_size=16, num_layers=1, mlp_dim=32, num_heads=2, patch_size=4),
      dict(hidden_size=24, num_layers=2, mlp_dim=48, num_heads=2, patch_size=4),
      dict(hidden_size=32, num_layers=2, mlp_dim=64, num_heads=2, patch_size=4),
      dict(hidden_size=40, num_layers=3, mlp_dim=80, num_heads=2, patch_size=4),
      dict(hidden_size=48, num_layers=3, mlp_dim=96, num_heads=3, patch_size=4),
      dict(hidden_size=64, num_layers=4, mlp_dim=128, num_heads=4, patch_size=4),
  )
  s.steps = (100, 200, 400, 800)     # An 8x span, so models of neighbouring sizes overlap in compute.
  s.train_examples = (360, 0)         # A quarter of the 1,437 training digits, and all of them.
  s.cooldown_fraction = 0.2
  s.fewshot.shots = (5, 10)
  return s
