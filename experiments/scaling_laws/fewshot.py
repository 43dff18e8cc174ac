"""The study's few-shot probe: the pre-logit features of a run's checkpoint at a given step, probed with
`vit_jax.evaluators.fewshot` (big_vision's closed-form ridge few-shot evaluator; its protocol is documented there).
"""
from __future__ import annotations

from typing import Any, Iterable

import ml_collections

from vit_jax import checkpoint, evaluators, input_pipeline, sharding, train
from vit_jax.evaluators.fewshot import fewshot_errors


def restore_params(config: ml_collections.ConfigDict, workdir: str, step: int) -> tuple[Any, Any]:
  """(model, params) of the run `config` at checkpoint `step` of `workdir`, restored without running an init
  (the trainer's own set-up, `train.setup_run`, on shapes only)."""
  run = train.setup_run(config, abstract=True)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    if step not in ckpt.all_steps():
      raise FileNotFoundError(f'{workdir} has no checkpoint at step {step} (has {ckpt.all_steps()}) for the few-shot '
                              'probe; rerun the sweep to finish this run.')
    state = ckpt.restore(run.state, step=step)
  finally:
    ckpt.close()
  return run.model, state.params


def probe_run(config: ml_collections.ConfigDict, workdir: str, *, train_split: str, shots: Iterable[int],
              l2_reg: float, seeds: int) -> dict[int, float]:
  """Few-shot errors of the final checkpoint of the run in `workdir`: probe fitted on `train_split`, tested on the
  run's eval split."""
  info = input_pipeline.get_dataset_info(config.dataset)
  model, params = restore_params(config, workdir, config.total_steps)
  feature_fn, variables = evaluators.pre_logits_fn(model), {'params': params}
  kw = dict(batch_size=config.batch_size, mesh=sharding.create_mesh(config.mesh))
  train_set = evaluators.extract_features(feature_fn, variables, config.dataset, train_split, **kw)
  test_set = evaluators.extract_features(feature_fn, variables, config.dataset, config.dataset.eval_split, **kw)
  return fewshot_errors(train_set.features, train_set.labels, test_set.features, test_set.labels,
                        num_classes=info.num_classes, shots=shots, l2_reg=l2_reg, seeds=seeds)
