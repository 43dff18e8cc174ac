"""The family tests' short main job, run in the test process.

`short_run_config` is the config that `python -m vit_jax.main --config=configs/default.py --config.model.name=NAME
--config.model.KEY=VALUE --config.total_steps=3 ...` builds. The command line itself (flag parsing, exit codes,
signals) is tested in test_train.py and test_reliability.py; a family's checks (it trains, its BatchNorm statistics
reach the checkpoint, its parameter count) need only `train.train_and_evaluate`, which saves each test a Python +
TensorFlow start-up and shares the test worker's dataset and compilation caches.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from configs import default


def short_run_config(data_dir: str, model_name: str, batch_size: int = 16,
                     **model_overrides: Any) -> ml_collections.ConfigDict:
  """configs/default.py for `model_name` (with `model_overrides` as model.* keys) on digits in `data_dir`: 3 steps
  of `batch_size`, logged every step, one eval and one checkpoint at the end."""
  config = default.get_config()
  config.dataset.data_dir = data_dir
  config.total_steps, config.batch_size, config.log_every, config.eval_every, config.checkpoint_every = (
      3, batch_size, 1, 3, 3)
  config.optimizer.warmup_steps = 1
  config.model.name = model_name
  with config.unlocked():
    config.model.update(model_overrides)
  return config
