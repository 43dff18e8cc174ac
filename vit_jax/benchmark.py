"""Throughput, MFU and memory of one model's compiled train or inference step.

  python -m vit_jax.benchmark --model vit_b16 --batch_size 256 --image_size 224 --dtype bfloat16 --mode train

Times the jitted step on synthetic data already on the devices (data-parallel over all local devices), after
warm-up, and prints a summary; the last line is one JSON object. `--end_to_end --config configs/X.py` times the real
training loop instead (input pipeline, prefetch, trainer step) and reports how long each step waits for data.

Module-level imports are only jax, flax, optax, numpy and absl (optax's own dependency), so this runs on a box
without TensorFlow (the end-to-end mode imports the trainer lazily).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax import compile_options, flops, models
from vit_jax.models import attention

# Dense peak TFLOP/s per chip by compute dtype, matched against `device.device_kind` (first match wins).
# float32 on NVIDIA GPUs runs matmuls as TF32 by default (XLA), on TPUs as bfloat16 passes.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    ('H100 PCIe', {'bfloat16': 756.0, 'float32': 378.0}),
    ('H100', {'bfloat16': 989.0, 'float32': 494.0}),  # SXM.
    ('H200', {'bfloat16': 989.0, 'float32': 494.0}),
    ('A100', {'bfloat16': 312.0, 'float32': 156.0}),
    ('TPU v4', {'bfloat16': 275.0, 'float32': 275.0}),
    ('TPU v5 lite', {'bfloat16': 197.0, 'float32': 197.0}),  # v5e.
    ('TPU v5e', {'bfloat16': 197.0, 'float32': 197.0}),
)
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def peak_tflops(device: jax.Device, dtype: str) -> Optional[float]:
  """The table's dense peak for `device` at `dtype`, or None when the device is not in it (CPUs, unknown chips)."""
  kind = getattr(device, 'device_kind', '')
  for pattern, peaks in PEAK_TFLOPS:
    if pattern.lower() in kind.lower():
      return peaks.get(dtype)
  return None


def mfu(flops_per_step: float, step_seconds: float, peak: Optional[float], num_devices: int) -> Optional[float]:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' summed peak; None when the peak is unknown."""
  if not peak or step_seconds <= 0:
    return None
  return flops_per_step / step_seconds / (peak * 1e12 * num_devices)


def timed_steps(step: Callable[[], Any], *, warmup: int, steps: int) -> list[float]:
  """Seconds of each of `steps` calls of `step` (blocking on its result), after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(step())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return times


def _memory(compiled: Any, device: jax.Device) -> dict[str, Optional[int]]:
  """Peak device memory where the runtime reports it (GPU/TPU); XLA's compiled memory analysis always."""
  out: dict[str, Optional[int]] = {'peak_memory_bytes': None, 'compiled_memory_bytes': None}
  stats = device.memory_stats() if hasattr(device, 'memory_stats') else None
  if stats and 'peak_bytes_in_use' in stats:
    out['peak_memory_bytes'] = int(stats['peak_bytes_in_use'])
  try:
    mem = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    mem = None
  if mem is not None:  # Arguments + outputs + scratch, minus outputs aliased (donated) onto arguments.
    out['compiled_memory_bytes'] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return out


def build_step(*, model_name: str, batch_size: int, image_size: int, dtype: str = 'float32', mode: str = 'train',
               num_classes: int = 1000, attention_impl: Optional[str] = None,
               devices: Optional[Sequence[jax.Device]] = None) -> tuple[Callable[[], Any], Any, Any]:
  """(run, compiled, model): `run()` executes one compiled train (AdamW update, donated state) or inference step
  of `model_name` on synthetic data already on the devices (batch split over `devices`, default all local ones)."""
  if mode not in ('train', 'infer'):
    raise ValueError(f"--mode must be 'train' or 'infer', got {mode!r}.")
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.')
  devices = list(devices or jax.local_devices())
  if batch_size % len(devices):
    raise ValueError(f'--batch_size={batch_size} must be a multiple of the {len(devices)} devices it is split over.')
  overrides: dict[str, Any] = {'dtype': DTYPES[dtype]}
  if attention_impl is not None:
    overrides['attention_impl'] = attention_impl
  model = models.create_model(model_name, num_classes=num_classes, **overrides)

  mesh = Mesh(np.asarray(devices), ('data',))
  replicated, batch_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))
  images = jax.device_put(jax.random.normal(jax.random.key(0), (batch_size, image_size, image_size, 3)),
                          batch_sharding)
  labels = jax.device_put(jnp.arange(batch_size, dtype=jnp.int32) % max(num_classes, 1), batch_sharding)
  init = jax.jit(lambda key: model.init(key, images[:1], train=False), out_shardings=replicated)
  variables = init(jax.random.key(1))
  params = variables['params']  # float32 parameters; `dtype` is the compute dtype.
  model_state = {k: v for k, v in variables.items() if k != 'params'}  # BatchNorm statistics, for the conv families.
  tx = optax.adamw(1e-4)

  def loss_fn(p, x, y, key):
    if model_state:  # Train-mode BatchNorm updates its statistics; the benchmark times that and drops them.
      logits, _ = model.apply({'params': p, **model_state}, x, train=True, rngs={'dropout': key},
                              mutable=list(model_state))
    else:
      logits = model.apply({'params': p}, x, train=True, rngs={'dropout': key})
    logits = logits[0] if isinstance(logits, tuple) else logits  # DeiT distilled: (cls, dist) heads in training.
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()

  def train_step(state, x, y):
    p, opt_state, step = state
    grads = jax.grad(loss_fn)(p, x, y, jax.random.fold_in(jax.random.key(2), step))
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, step + 1

  if mode == 'train':
    state = (params, tx.init(params), jnp.zeros((), jnp.int32))
    compiled = jax.jit(train_step, donate_argnums=0).lower(state, images, labels).compile()
    holder = [state]

    def run():
      holder[0] = compiled(holder[0], images, labels)
      return holder[0]
  else:
    compiled = compile_options.jit_inference(
        lambda p, x: model.apply({'params': p, **model_state}, x, train=False)).lower(params, images).compile()
    run = lambda: compiled(params, images)
  return run, compiled, model


def benchmark_step(*, model_name: str, batch_size: int, image_size: int, dtype: str = 'float32',
                   mode: str = 'train', steps: int = 10, warmup: int = 2, num_classes: int = 1000,
                   attention_impl: Optional[str] = None, peak: Optional[float] = None,
                   devices: Optional[Sequence[jax.Device]] = None) -> dict[str, Any]:
  """Times `build_step`'s step: median over `steps` after `warmup`; FLOPs, MFU and memory as a flat dict."""
  devices = list(devices or jax.local_devices())
  run, compiled, model = build_step(model_name=model_name, batch_size=batch_size, image_size=image_size,
                                    dtype=dtype, mode=mode, num_classes=num_classes,
                                    attention_impl=attention_impl, devices=devices)
  times = timed_steps(run, warmup=warmup, steps=steps)
  step_s = float(np.median(times))
  fwd_flops, flops_method = flops.model_forward_flops(model, image_size)
  flops_per_img = flops.TRAIN_TO_FORWARD * fwd_flops if mode == 'train' else fwd_flops
  peak = peak if peak is not None else peak_tflops(devices[0], dtype)
  result = dict(
      model=model_name, mode=mode, batch_size=batch_size, image_size=image_size, dtype=dtype,
      attention_impl=attention_impl or 'einsum', img_per_s=round(batch_size / step_s, 2),
      step_ms_median=round(1e3 * step_s, 3), step_ms_min=round(1e3 * min(times), 3), steps=steps,
      gflops_per_img=round(flops_per_img / 1e9, 4), flops_method=flops_method,
      mfu=None, peak_tflops=peak, device=devices[0].device_kind, num_devices=len(devices))
  achieved = mfu(flops_per_img * batch_size, step_s, peak, len(devices))
  result['mfu'] = None if achieved is None else round(achieved, 4)
  result['tflops_per_s'] = round(flops_per_img * batch_size / step_s / 1e12, 4)
  result.update(_memory(compiled, devices[0]))
  result.update(_cost(compiled))
  return result


def _cost(compiled: Any) -> dict[str, Optional[float]]:
  """XLA's cost analysis of the compiled step (all devices' work as compiled for one): FLOPs and bytes accessed,
  whose ratio says whether the step is bound by compute or by memory traffic."""
  try:
    cost = compiled.cost_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    cost = None
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if not cost:
    return {'xla_gflops_per_step': None, 'xla_gbytes_accessed_per_step': None}
  return {'xla_gflops_per_step': round(float(cost.get('flops', 0.0)) / 1e9, 3),
          'xla_gbytes_accessed_per_step': round(float(cost.get('bytes accessed', 0.0)) / 1e9, 3)}


def _load_config(path: str) -> Any:
  """`get_config(arg)` of a config file given as 'path.py' or 'path.py:ARG'."""
  path, _, arg = path.partition(':')
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  if spec is None or spec.loader is None:
    raise ValueError(f'--config={path!r} is not a Python config file (configs/NAME.py).')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def benchmark_end_to_end(config_path: str, *, steps: int = 20, warmup: int = 3) -> dict[str, Any]:
  """Times the trainer's step fed by the real input pipeline (with device prefetch) for `steps` steps.

  data_wait_ms: mean time the loop spends blocked in `next()` on the prefetched iterator per step, i.e. how long
  the step waits for data; step_ms: mean wall time per step with dispatch running ahead as in the trainer.
  """
  import functools  # pylint: disable=g-import-not-at-top

  from vit_jax import config_schema, sharding, train  # pylint: disable=g-import-not-at-top

  config = _load_config(config_path)
  config_schema.validate_config(config)
  run = train.setup_run(config)
  state, model = run.state, run.model
  constants = run.task.load_constants(config, run.mesh, run.rules)  # E.g. a distillation teacher.
  step_fn = jax.jit(functools.partial(train.train_step, dropout_key=jax.random.key(0), schedule=run.schedule,
                                      accum_steps=config.accum_steps, task=run.task),
                    in_shardings=(run.state_shardings, sharding.batch_sharding(run.mesh),
                                  jax.tree.map(lambda x: x.sharding, constants)),
                    out_shardings=(run.state_shardings, sharding.replicated(run.mesh)), donate_argnums=0)
  batches = sharding.prefetch_to_device(
      run.task.train_iterator(config, global_batch_size=config.batch_size, seed=config.seed), run.mesh)
  for _ in range(warmup):
    state, step_metrics = step_fn(state, next(batches), constants)
  jax.block_until_ready((state, step_metrics))
  wait = 0.0
  start = time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    batch = next(batches)
    wait += time.perf_counter() - t
    state, step_metrics = step_fn(state, batch, constants)
  jax.block_until_ready((state, step_metrics))
  wall = time.perf_counter() - start
  size = config.dataset.image_size
  fwd_flops, flops_method = flops.model_forward_flops(model, size)
  return dict(model=config.model.name, mode='train_end_to_end', batch_size=config.batch_size, image_size=size,
              dtype=jnp.dtype(getattr(model, 'dtype', jnp.float32)).name,
              img_per_s=round(config.batch_size * steps / wall, 2), step_ms_median=None,
              step_ms_mean=round(1e3 * wall / steps, 3), data_wait_ms=round(1e3 * wait / steps, 3),
              data_wait_fraction=round(wait / wall, 4),
              gflops_per_img=round(flops.TRAIN_TO_FORWARD * fwd_flops / 1e9, 4), flops_method=flops_method,
              mfu=None, dataset=config.dataset.name, steps=steps)


# Flags live in their own FlagValues so that importing this module next to another tool (vit_jax.main defines
# --config too) never clashes; `main(argv)` parses them.
FLAGS = flags.FlagValues()
flags.DEFINE_string('model', 'vit_b16', 'registered model name (vit_jax.models.list_models())', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 32, 'global batch, split over all local devices', lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'input resolution', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum('dtype', 'float32', sorted(DTYPES), 'compute dtype (params stay float32)', flag_values=FLAGS)
flags.DEFINE_enum('mode', 'train', ('train', 'infer'), 'time the train step or inference', flag_values=FLAGS)
flags.DEFINE_integer('steps', 10, 'timed steps (the median is reported)', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('warmup', 2, 'untimed steps after compilation', lower_bound=0, flag_values=FLAGS)
flags.DEFINE_integer('num_classes', 1000, 'classifier outputs', lower_bound=0, flag_values=FLAGS)
flags.DEFINE_enum('attention_impl', None, attention.IMPLEMENTATIONS,
                  "attention kernel (model option attention_impl); default: the model's ('einsum')",
                  flag_values=FLAGS)
flags.DEFINE_float('peak_tflops', None, 'peak dense TFLOP/s per device for MFU when the device is not in PEAK_TFLOPS',
                   flag_values=FLAGS)
flags.DEFINE_bool('end_to_end', False, 'time the real training loop of --config (input pipeline included)',
                  flag_values=FLAGS)
flags.DEFINE_string('config', 'configs/default.py', 'config file for --end_to_end ([:ARG])', flag_values=FLAGS)


def _parse(argv: Sequence[str]) -> flags.FlagValues:
  """Parses command-line arguments (without the program name) into FLAGS; bad values exit naming the flag."""
  FLAGS.unparse_flags()
  try:
    rest = FLAGS(['python -m vit_jax.benchmark', *argv])
  except flags.Error as e:
    sys.exit(f'python -m vit_jax.benchmark: {e}')
  if len(rest) > 1:
    sys.exit(f'python -m vit_jax.benchmark: unexpected arguments {rest[1:]}')
  return FLAGS


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = _parse(sys.argv[1:] if argv is None else argv)
  if args.end_to_end:
    result = benchmark_end_to_end(args.config, steps=args.steps, warmup=args.warmup)
  else:
    result = benchmark_step(model_name=args.model, batch_size=args.batch_size, image_size=args.image_size,
                            dtype=args.dtype, mode=args.mode, steps=args.steps, warmup=args.warmup,
                            num_classes=args.num_classes, attention_impl=args.attention_impl,
                            peak=args.peak_tflops)
  summary = {k: result.get(k) for k in ('model', 'mode', 'batch_size', 'image_size', 'dtype', 'img_per_s',
                                        'step_ms_median', 'gflops_per_img', 'mfu')}
  print(' '.join(f'{k}={v}' for k, v in summary.items()), flush=True)
  print(json.dumps(result), flush=True)
  return result


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main()
