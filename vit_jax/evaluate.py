"""Command line: run evaluators (k-NN, linear probe, few-shot) on a trained or converted model; prints one JSON line.

  python -m vit_jax.evaluate --workdir DIR [--evals knn,linear_probe] [--step N]
      a training workdir: its config.json, its latest (or --step) checkpoint, the task's evaluation weights (the
      EMA when kept; DINO's teacher) and its `config.evals`;
  python -m vit_jax.evaluate --config configs/X.py --model NAME --init_from params.npz [--evals knn]
      a converted checkpoint (`python -m vit_jax.convert`) or an official .npz, on the config's dataset.

`--evals` lists entries of config.evals by name, or evaluator types (knn, linear_probe, fewshot) run with their
defaults; without it every entry of config.evals runs, or, if there is none, the kinds the task names as
suiting it (`Task.evaluators`, e.g. DINO's k-NN and linear probe). `--config.evals.knn.k=10`-style overrides work
with --config. Features are the task's (`Task.feature_fn`: the model's pooled pre-logits; DINO's: the backbone's
class token). The last line printed is one JSON object:
{"source": ..., "step": ..., "NAME/METRIC": value, ...}.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional, Sequence

from absl import app, flags
from ml_collections import config_flags
import ml_collections

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when this module runs as the program, so that importing it as a
  library (experiments/ssl_digits.py) leaves the importer's flags alone."""
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/NAME.py[:arg]) for --init_from mode.',
                                  lock_config=False, accept_new_attributes=True)
  flags.DEFINE_string('workdir', None, 'A training workdir: evaluate its latest (or --step) checkpoint.')
  flags.DEFINE_integer('step', None, 'With --workdir: the checkpoint step (default: the latest).')
  flags.DEFINE_string('model', None, 'With --init_from: the registered model name (sets config.model.name).')
  flags.DEFINE_string('init_from', None, 'Weights to evaluate: params.npz, an official .npz, or a workdir.')
  flags.DEFINE_list('evals', None, 'Names in config.evals or evaluator types (knn, linear_probe, fewshot).')
  flags.DEFINE_string('data_dir', None, 'Override config.dataset.data_dir (e.g. on another machine).')
  flags.DEFINE_integer('batch_size', None, 'Feature-extraction batch (default: config.batch_size).')


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples configs use."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _overlay(config: ml_collections.ConfigDict, saved: dict[str, Any]) -> None:
  """Writes the `saved` values over `config`, section by section (keys it lacks are added)."""
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _overlay(config[key], value)
    else:
      config[key] = value


def workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a training run recorded in `workdir`/config.json, over today's defaults (so a run recorded before a
  field existed reads it at its default)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, config_schema  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / checkpoint.CONFIG_FILENAME
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: --workdir must be a vit_jax training workdir. For a converted '
                            'checkpoint use --config, --model and --init_from instead.')
  config = config_schema.base_config()
  _overlay(config, _tuples(json.loads(path.read_text())))
  return config


def select_evaluators(config: ml_collections.ConfigDict, names: Optional[Sequence[str]]) -> dict[str, Any]:
  """{name: evaluator}: the named entries of config.evals, or evaluator types with their defaults; when `names`
  is empty, all of config.evals, else the task's suggested kinds (`Task.evaluators`)."""
  from vit_jax import evaluators, tasks  # pylint: disable=g-import-not-at-top
  entries = evaluators.build_evaluators(config.get('evals'))
  if not names:
    names = list(entries) or list(tasks.get_task(tasks.task_name(config)).evaluators)
    if not names:
      raise ValueError('The config has no config.evals entries and its task suggests none; pass --evals, e.g. '
                       '--evals knn,linear_probe.')
  out = {}
  for name in names:
    if name in entries:
      out[name] = entries[name]
    elif name in evaluators.EVALUATORS:
      out[name] = evaluators.build_evaluator(name, {'type': name})
    else:
      raise ValueError(f'--evals {name!r} is neither an entry of config.evals ({sorted(entries)}) nor an evaluator '
                       f'type ({sorted(evaluators.EVALUATORS)}).')
  return out


def _restore_workdir(config: ml_collections.ConfigDict, workdir: str, step: Optional[int]) -> tuple[Any, Any, int]:
  """(run setup, evaluation variables, step) of a workdir's checkpoint, restored without an init."""
  from vit_jax import checkpoint, train  # pylint: disable=g-import-not-at-top
  run = train.setup_run(config, abstract=True)
  ckpt = checkpoint.Checkpointer(workdir, keep=config.keep_checkpoints)
  try:
    steps = ckpt.all_steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      raise FileNotFoundError(f'{workdir} has no checkpoint at step {step} (it has {steps}).')
    state = ckpt.restore(run.state, step=step)
  finally:
    ckpt.close()
  return run, run.task.eval_variables(state), int(step)


def _load_converted(config: ml_collections.ConfigDict) -> tuple[Any, Any]:
  """(run setup, variables) of config.model with the weights of config.init_from."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import finetune, sharding, train  # pylint: disable=g-import-not-at-top
  run = train.setup_run(config)
  params = finetune.load_params(config.init_from, sharding.to_host(run.state.params), model=run.model)
  return run, {'params': jax.device_put(params, run.state_shardings.params)}


def evaluate(config: ml_collections.ConfigDict, *, workdir: Optional[str] = None, step: Optional[int] = None,
             names: Optional[Sequence[str]] = None, batch_size: Optional[int] = None) -> dict[str, Any]:
  """{'source', 'step', 'NAME/METRIC': value} of the evaluators `names` (see select_evaluators) on the checkpoint
  of `workdir` (config: its config.json) or, without a workdir, on config.model loaded from config.init_from."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import config_schema, evaluators  # pylint: disable=g-import-not-at-top
  config_schema.validate_config(config, num_devices=jax.device_count())
  chosen = select_evaluators(config, names)
  if workdir:
    run, variables, step = _restore_workdir(config, workdir, step)
    result: dict[str, Any] = {'source': workdir, 'step': step}
  else:
    if not config.init_from:
      raise ValueError('Without --workdir, give the weights with --init_from (and the model with --model).')
    run, variables = _load_converted(config)
    result = {'source': config.init_from, 'step': None}
  result.update(evaluators.run_evaluators(
      chosen, feature_fn=run.task.feature_fn(run.model), variables=variables, dataset_config=config.dataset,
      batch_size=batch_size or config.batch_size, mesh=run.mesh, num_classes=run.dataset_info.num_classes))
  return result


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if bool(FLAGS.workdir) == bool(FLAGS.init_from):
    raise app.UsageError('Give either --workdir DIR, or --config, --model and --init_from.')
  if FLAGS.workdir:
    config = workdir_config(FLAGS.workdir)
  else:
    if FLAGS.config is None:
      raise app.UsageError('--init_from needs --config (the dataset to evaluate on, and the model\'s overrides).')
    config = FLAGS.config
    config.init_from = FLAGS.init_from
    if FLAGS.model:
      config.model.name = FLAGS.model
  if FLAGS.data_dir:
    config.dataset.data_dir = FLAGS.data_dir
  result = evaluate(config, workdir=FLAGS.workdir, step=FLAGS.step, names=FLAGS.evals, batch_size=FLAGS.batch_size)
  print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
