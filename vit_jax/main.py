"""Command-line entry: `python -m vit_jax.main --config=configs/NAME.py --workdir=DIR [--config.key=value]`."""
from __future__ import annotations

import faulthandler
import os
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags

from vit_jax import preemption

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# New attributes are accepted at parse time so that model.* hyperparameters can be overridden; misspelt keys are then
# rejected by config_schema.validate_config (and model.* by models.create_model) with the key named.
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/NAME.py[:arg]).',
                                          lock_config=False, accept_new_attributes=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard events and metrics.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'Multi-host: host:port of process 0. Omit on TPU pods and SLURM (auto-detected).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host: number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-host: this process\'s index.')
_MULTIHOST = flags.DEFINE_bool('multihost', False, 'Call jax.distributed.initialize() (auto-detects TPU/SLURM).')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Joins this process to a multi-process JAX job (call before any other JAX use).

  With no arguments jax.distributed auto-detects TPU pods and SLURM (srun) jobs; otherwise give all three. CPU
  processes talk through gloo collectives (jax's CPU backend has none by default); accelerators are unaffected.
  """
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  faulthandler.enable()  # A native abort (XLA, TensorFlow, TensorStore) prints every Python thread's stack.
  if not (_MULTIHOST.value or _COORDINATOR.value):  # Multi-host leaves SIGTERM to JAX's preemption notifier.
    preemption.catch_signals_early()  # A SIGTERM / Ctrl-C during the slow set-up still stops the run cleanly.
  # Imports after flag parsing keep `--help` fast and TF out of the way until needed.
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import console, train  # pylint: disable=g-import-not-at-top

  console.configure_logging(flags.FLAGS.verbosity)  # Library INFO logs off unless --verbosity=1 or more.

  if _MULTIHOST.value or _COORDINATOR.value:
    initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  config = _CONFIG.value  # train_and_evaluate validates it, once, before anything is built or compiled.
  logging.info('JAX process %d/%d, %d local / %d global devices (%s).', jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
  result = train.train_and_evaluate(config, _WORKDIR.value)
  if 'preempted_at_step' in result:  # Checkpointed and stopped on request: exit 0 so schedulers requeue cleanly.
    logging.info('Exiting after preemption at step %d.', result['preempted_at_step'])


if __name__ == '__main__':
  app.run(main)
