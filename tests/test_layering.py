"""The package's layers: models know nothing of training or TensorFlow, so they run on a JAX-only machine."""
import subprocess
import sys

import pytest

HEAVY = ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections', 'orbax')


@pytest.mark.parametrize('module', ['vit_jax.models', 'vit_jax.pretrained'])
def test_module_imports_no_training_stack(module):
  code = (f'import sys, {module}; '
          f'print(",".join(m for m in {HEAVY!r} if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True, timeout=120)
  assert out.stdout.strip() == '', f'{module} imports {out.stdout.strip()} at module level'
