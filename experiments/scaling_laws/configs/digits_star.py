"""A SoViT star study on the offline `digits` dataset, on a CPU: width, depth and MLP size varied one at a time.

Centre w48 d3 m96 (2 heads, patch 4); widths 24-64, depths 1-5, MLP sizes 24-192 (4 values each, centre included),
each at 3 training lengths on the whole train split: 10 shapes x 3 lengths = 30 ledger rows from 10 full runs and 20
cooldown branches. Measured on the 2-core CPU (2026-12-02): 17.4 minutes one run after another (a tiny run keeps
about one core busy), 9.8 minutes with --parallel=2 (two lanes), plus about 1 minute for the fit. Then the
per-dimension shape laws f_k(x_k, t) (shape_laws.py) give each dimension's compute-optimal exponent s_k:

  python -m experiments.scaling_laws.sweep --config=experiments/scaling_laws/configs/digits_star.py --workdir=DIR \
      --parallel=2
  python -m experiments.scaling_laws.fit --ledger=DIR/ledger.csv --out=DIR/report
"""
import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3]))  # The repo root, for configs/.

from experiments.scaling_laws.configs import digits  # noqa: E402  pylint: disable=g-import-not-at-top


def get_config():
  s = digits.get_config()
  s.shapes = ()
  s.grid = 'star'
  s.star.centre = dict(hidden_size=48, num_layers=3, mlp_dim=96, num_heads=2, patch_size=4)
  s.star.vary = dict(hidden_size=(24, 32, 64), num_layers=(1, 2, 5), mlp_dim=(24, 48, 192))
  s.steps = (150, 300, 600)          # A 4x span; cooldown starts 120 and 240 share the divisor 120.
  s.train_examples = (0,)
  return s
