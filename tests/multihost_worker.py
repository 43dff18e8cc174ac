"""One process of the localhost multi-process tests (tests/test_multihost.py); not collected by pytest.

python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT DATA_DIR WORKDIR [RESTORE_WORKDIR OUT_NPZ]
trains `make_config` in WORKDIR, then restores RESTORE_WORKDIR's latest checkpoint onto another mesh shape and has
process 0 write its parameters to OUT_NPZ, then fine-tunes one step from WORKDIR (init_from) in WORKDIR_init_from
with parameters split over both hosts (FSDP across hosts).
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
INIT_FROM_SUFFIX = '_init_from'


def make_config(data_dir: str):
  """The default config, shortened to a dozen steps with one final eval and checkpoint, and two layers deep
  (compile time)."""
  sys.path.insert(0, str(ROOT))
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.dataset.data_dir = data_dir
  config.model.num_layers = 2
  config.total_steps = 12
  config.log_every = 4
  config.eval_every = 0
  config.checkpoint_every = 12
  config.optimizer.warmup_steps = 4
  return config


def restore_params(workdir: str, config, mesh_config):
  """The params of `workdir`'s latest checkpoint restored onto a mesh built from `mesh_config`, as host numpy."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint, input_pipeline, optim, sharding, train  # pylint: disable=g-import-not-at-top
  mesh = sharding.create_mesh(mesh_config)
  model = train.build_model(config, input_pipeline.get_dataset_info(config.dataset).num_classes)
  tx, _ = optim.create_optimizer(config.optimizer, config.total_steps)
  abstract, _ = train.abstract_train_state(model, tx, image_size=config.dataset.image_size, mesh=mesh)
  ckpt = checkpoint.Checkpointer(workdir, keep=1)
  state = ckpt.restore(abstract)
  ckpt.close()
  assert jax.tree.leaves(state.params)[0].sharding.mesh.shape == mesh.shape
  return sharding.to_host(state.params)


def main(argv):
  process_id, num_processes, port = int(argv[1]), int(argv[2]), int(argv[3])
  data_dir, workdir = argv[4], argv[5]
  sys.path.insert(0, str(ROOT))
  from vit_jax import main as cli  # pylint: disable=g-import-not-at-top
  cli.initialize_distributed(f'localhost:{port}', num_processes, process_id)
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  assert jax.process_count() == num_processes
  config = make_config(data_dir)
  train.train_and_evaluate(config, workdir)
  if len(argv) > 6:
    params = restore_params(argv[6], config, ml_collections.ConfigDict(
        dict(data=2, fsdp=-1, tensor=1, dcn_data=-1, dcn_fsdp=1, dcn_tensor=1)))
    if jax.process_index() == 0:
      np.savez(argv[7], **traverse_util.flatten_dict(params, sep='/'))
    finetune = make_config(data_dir)
    finetune.init_from, finetune.init_reinit_head = workdir, False
    finetune.total_steps = finetune.checkpoint_every = finetune.optimizer.warmup_steps = 1  # lr 0: params as loaded.
    finetune.mesh.update(dict(data=1, fsdp=-1, dcn_data=1, dcn_fsdp=-1))
    train.train_and_evaluate(finetune, workdir + INIT_FROM_SUFFIX)


if __name__ == '__main__':
  main(sys.argv)
