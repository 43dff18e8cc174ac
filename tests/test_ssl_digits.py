"""experiments/ssl_digits.py: its configs are valid runs of the registered tasks, and its statistics and table."""
import numpy as np
import pytest

from experiments import ssl_digits
from vit_jax import config_schema, tasks


@pytest.mark.parametrize('build, task', [(ssl_digits.classifier_config, 'classification'),
                                         (ssl_digits.mae_config, 'mae'), (ssl_digits.dino_config, 'dino')])
def test_configs_validate(build, task):
  if task not in tasks.list_tasks():
    pytest.skip(f'task {task!r} is not on this branch yet')
  config = build(100, 1, 128, None)
  config_schema.validate_config(config, num_devices=8)
  assert config.dataset.name == 'cluttered_digits' and config.seed == 1 and config.total_steps == 100
  for key, value in ssl_digits.ENCODER.items():  # Every objective trains the same encoder.
    assert config.model[key] == value


def test_summary_and_table():
  per_seed = {0: {'a': 0.5, 'b': 0.25}, 1: {'a': 0.75, 'b': 0.25}, 2: {'a': 1.0, 'b': 0.25}}
  summary = ssl_digits.summarise(per_seed)
  assert summary['a'] == {'mean': 0.75, 'sd': 0.25, 'min': 0.5, 'max': 1.0, 'n': 3}
  assert summary['b']['sd'] == 0.0 and np.isclose(summary['b']['mean'], 0.25)
  text = ssl_digits.table({'parts': {'x': {'per_seed': per_seed, 'summary': summary}}})
  assert '| a | 0.5000 | 0.7500 | 1.0000 | 0.7500 +- 0.2500 |' in text.splitlines()
