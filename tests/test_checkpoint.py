"""Workdir identity: a run resumes only into its own workdir and never overwrites another run."""
import json

import pytest

from vit_jax import checkpoint
from vit_jax.config_schema import base_config


def test_claim_records_and_recognises_the_run(tmp_path):
  config = base_config()
  assert checkpoint.claim_workdir(str(tmp_path), config) is False
  assert json.loads((tmp_path / 'config.json').read_text())['total_steps'] == config.total_steps
  assert checkpoint.claim_workdir(str(tmp_path), config) is True


def test_different_config_is_refused_and_nothing_changes(tmp_path):
  config = base_config()
  checkpoint.claim_workdir(str(tmp_path), config)
  before = (tmp_path / 'config.json').read_text()
  other = base_config()
  other.optimizer.lr = 0.5
  with pytest.raises(checkpoint.WorkdirConflictError, match=r'optimizer.lr: 0.001 -> 0.5'):
    checkpoint.claim_workdir(str(tmp_path), other)
  assert (tmp_path / 'config.json').read_text() == before


def test_checkpoints_without_config_are_refused(tmp_path):
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  with pytest.raises(checkpoint.WorkdirConflictError, match='cannot be identified'):
    checkpoint.claim_workdir(str(tmp_path), base_config())
  assert not (tmp_path / 'config.json').exists()


def test_config_differences_lists_added_and_removed_keys():
  diffs = checkpoint.config_differences({'a': 1, 'b': {'c': 2}}, {'a': 1, 'b': {'d': 3}})
  assert diffs == ['b.c: 2 -> <absent>', 'b.d: <absent> -> 3']
