"""experiments/benchmarks/gemm.py: the products' shapes, and a one-round run that prints every row."""
import subprocess
import sys

import numpy as np

from experiments.benchmarks import gemm
from tests import xla_env


def test_products_are_forward_input_and_weight_gradients():
  (fwd, x_shape, w_shape, t0), (dgrad, dy_shape, wt_shape, t1), (wgrad, x2, dy2, t2) = gemm.products(10, 3, 5)
  assert (x_shape, w_shape, t0) == ((10, 3), (3, 5), False)  # X W -> (10, 5)
  assert (dy_shape, wt_shape, t1) == ((10, 5), (5, 3), False)  # dY W^T -> (10, 3)
  assert (x2, dy2, t2) == ((10, 3), (10, 5), True)  # X^T dY -> (3, 5), the weight's shape
  assert np.dot(np.zeros(x2).T, np.zeros(dy2)).shape == w_shape


def test_one_round_prints_every_product(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'experiments.benchmarks.gemm', '--rounds=1', '--iters=1',
                        '--batch_size=1'], capture_output=True, text=True, timeout=600,
                       env=xla_env.subprocess_env(), cwd=gemm.__file__.rsplit('/experiments/', 1)[0])
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [line for line in out.stdout.splitlines() if 'X W' in line or 'W^T' in line or 'X^T' in line]
  assert len(rows) == 3 * len(gemm.LAYERS), out.stdout
  assert 'load average' in out.stdout
