"""Our models against timm's of the same size (eager and `torch.compile`), side by side in one process.

  python -m experiments.benchmarks.compare --models vit_s16,swin_t --modes infer,train --batches 8,1 \
      --rounds 5 --table /tmp/compare.md

(Run it as a module from the repository root so that `vit_jax` is this checkout's.) For every model x mode x batch,
ours (the jitted step of `vit_jax.benchmark.build_step`: inference, or a train step with AdamW and cross-entropy),
timm's model in eager PyTorch and the same model under `torch.compile` are timed in alternating rounds (ours, eager,
compiled, ours, ...), so that background load hits all alike; each gets the median step time over all rounds.
Compilation (XLA's and torch's) happens in untimed warm-up calls and is reported separately.

Honesty: the 1-minute load average is printed before and after. Above `LOAD_LIMIT_PER_CORE` per core the script
refuses to run unless `--allow_load`, and then marks every row, the table and the JSON "LOADED (load X.X)"; a run
whose load rose past the limit while it ran is marked the same way. Ratios of two frameworks measured under load
mostly measure how each copes with contention (torch's OpenMP threads suffer more than XLA's), not the code.

torch's intra-op threads are set to the core count (`--threads`, printed); XLA's CPU client uses all cores by
default. `--dtype bfloat16` runs ours with bf16 compute (float32 parameters) and timm under CPU autocast to bf16;
`--xla_flags` appends to XLA_FLAGS before JAX starts, so flag experiments run through the same script. Without torch
or timm only our numbers are measured. Output: one line per measurement, a markdown table (`--table FILE`, for the
README), and the last line one JSON object (also to `--json FILE`).
"""
from __future__ import annotations

import importlib
import json
import os
import platform
import sys
import time
from typing import Any, Callable, Optional, Sequence

from absl import flags

from vit_jax.models import attention

LOAD_LIMIT_PER_CORE = 1.5
MODES = ('infer', 'train')
DTYPES = ('float32', 'bfloat16')
TIMM_VARIANTS = ('eager', 'compiled')

Step = Callable[[], None]


def core_count() -> int:
  """CPU cores this process may run on (the affinity mask where the OS has one)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # macOS.
    return os.cpu_count() or 1


def load_note(load: float, cores: int, limit_per_core: float = LOAD_LIMIT_PER_CORE) -> Optional[str]:
  """'LOADED (load X.X)' when the 1-minute load average exceeds `limit_per_core` x `cores`, else None."""
  return f'LOADED (load {load:.1f})' if load > limit_per_core * cores else None


def check_load(load: float, cores: int, allow_load: bool) -> Optional[str]:
  """The load note for a run about to start; raises when the machine is loaded and `allow_load` is not given."""
  note = load_note(load, cores)
  if note and not allow_load:
    raise RuntimeError(
        f'Load average {load:.1f} on {cores} cores is above {LOAD_LIMIT_PER_CORE} per core: timings now measure '
        'the contention, not the code. Wait for an idle machine, or pass --allow_load to measure anyway (every row '
        'is then marked LOADED).')
  return note


def validate_args(*, model_names: Sequence[str], modes: Sequence[str], batches: Sequence[int], dtype: str,
                  xla_flags: str, timm_variants: Sequence[str], known_models: Sequence[str]) -> None:
  """Raises ValueError naming the bad argument and the fix; checks need neither torch nor a compiled model."""
  if not model_names:
    raise ValueError('--models is empty: give registered names, e.g. --models vit_s16,swin_t.')
  unknown = [m for m in model_names if m not in known_models]
  if unknown:
    raise ValueError(f'--models: {unknown} are not registered models (python -c "from vit_jax import models; '
                     'print(models.list_models())" lists them).')
  if not modes or any(m not in MODES for m in modes):
    raise ValueError(f'--modes must be a non-empty subset of {list(MODES)}, got {list(modes)}.')
  if not batches or any(b < 1 for b in batches):
    raise ValueError(f'--batches must be positive integers, e.g. --batches 8,1; got {list(batches)}.')
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {list(DTYPES)}, got {dtype!r}.')
  if any(v not in TIMM_VARIANTS for v in timm_variants):
    raise ValueError(f'--timm must be a subset of {list(TIMM_VARIANTS)} (empty: ours only), got {list(timm_variants)}.')
  bad = [f for f in xla_flags.split() if not f.startswith('--')]
  if bad:
    raise ValueError(f'--xla_flags takes XLA flags separated by spaces, each starting with "--" '
                     f'(e.g. "--xla_cpu_use_thunk_runtime=false"); got {bad}.')


def apply_xla_flags(extra: str) -> str:
  """Appends `extra` to XLA_FLAGS; must run before JAX creates its backends (which read XLA_FLAGS once)."""
  if not extra:
    return os.environ.get('XLA_FLAGS', '')
  if 'jax' in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      raise RuntimeError('--xla_flags given after JAX started its backends: the flags would be ignored.')
  os.environ['XLA_FLAGS'] = ' '.join(f for f in (os.environ.get('XLA_FLAGS', ''), extra) if f)
  return os.environ['XLA_FLAGS']


def _fmt(x: Optional[float], digits: int = 1) -> str:
  return '-' if x is None else f'{x:.{digits}f}'


def _ratio(ours: Optional[float], theirs: Optional[float]) -> str:
  return '-' if not ours or not theirs else f'{ours / theirs:.2f}x'


def markdown_table(rows: Sequence[dict[str, Any]], preamble: Sequence[str] = ()) -> str:
  """The README table: one row per model x mode x batch with images/s and ours/timm throughput ratios (> 1: ours
  is faster); the last column is the row's load note ('idle' when below the limit)."""
  lines = list(preamble) + ([''] if preamble else [])
  lines.append('| model | mode | batch | ours img/s | timm eager img/s | timm compiled img/s | ours / eager | '
               'ours / compiled | load |')
  lines.append('|---|---|---:|---:|---:|---:|---:|---:|---|')
  for r in rows:
    ours, eager, compiled = r.get('img_per_s_ours'), r.get('img_per_s_timm_eager'), r.get('img_per_s_timm_compiled')
    lines.append(f"| {r['model']} | {r['mode']} | {r['batch_size']} | {_fmt(ours)} | {_fmt(eager)} | "
                 f"{_fmt(compiled)} | {_ratio(ours, eager)} | {_ratio(ours, compiled)} | {r.get('load') or 'idle'} |")
  return '\n'.join(lines) + '\n'


def _time(step: Step, n: int) -> list[float]:
  times = []
  for _ in range(n):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  return times


def _warm(step: Step, n: int) -> float:
  """Seconds of `n` untimed calls (compilation, first-call allocations)."""
  start = time.perf_counter()
  for _ in range(n):
    step()
  return time.perf_counter() - start


def our_step(model_name: str, *, mode: str, batch_size: int, image_size: int, dtype: str, num_classes: int,
             attention_impl: Optional[str]) -> Step:
  """Our compiled train or inference step (vit_jax.benchmark.build_step), blocking until its result is ready."""
  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax import benchmark  # pylint: disable=g-import-not-at-top
  run, _, _ = benchmark.build_step(model_name=model_name, batch_size=batch_size, image_size=image_size, dtype=dtype,
                                   mode=mode, num_classes=num_classes, attention_impl=attention_impl)

  def step():
    jax.block_until_ready(run())
  return step


def timm_steps(timm_name: str, *, mode: str, batch_size: int, image_size: int, dtype: str, num_classes: int,
               variants: Sequence[str]) -> dict[str, Step]:
  """{variant: step} for timm's model in eager PyTorch ('eager') and under torch.compile ('compiled').

  Train: AdamW (torch's default implementation, eager) on cross-entropy; with torch.compile only the model is
  compiled (forward and backward), as a training script would. bfloat16: autocast on the CPU, float32 parameters.
  """
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
  images = torch.randn(batch_size, 3, image_size, image_size)
  labels = torch.arange(batch_size) % max(num_classes, 1)
  steps = {}
  for variant in variants:
    torch.manual_seed(0)
    model = timm.create_model(timm_name.split('.')[0], pretrained=False, num_classes=num_classes,
                              img_size=image_size)
    model.train(mode == 'train')
    net = torch.compile(model) if variant == 'compiled' else model
    if mode == 'train':
      opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

      def step(net=net, opt=opt):
        opt.zero_grad(set_to_none=True)
        with autocast():
          loss = torch.nn.functional.cross_entropy(net(images).float(), labels)
        loss.backward()
        opt.step()
    else:
      def step(net=net):
        with torch.inference_mode(), autocast():
          net(images)
    steps[variant] = step
  return steps


def measure(model_name: str, *, mode: str, batch_size: int, image_size: int, dtype: str, rounds: int,
            steps_per_round: int, num_classes: int, attention_impl: Optional[str], timm_variants: Sequence[str],
            timm_available: bool) -> dict[str, Any]:
  """One table row: warm-up (compile) each contender, then `rounds` alternating rounds; medians as images/s."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  from vit_jax import models  # pylint: disable=g-import-not-at-top
  spec = models.get_model_spec(model_name)
  row: dict[str, Any] = dict(model=model_name, mode=mode, batch_size=batch_size, timm_model=spec.timm_name)
  start = time.perf_counter()
  steps: dict[str, Step] = {'ours': our_step(model_name, mode=mode, batch_size=batch_size, image_size=image_size,
                                             dtype=dtype, num_classes=num_classes, attention_impl=attention_impl)}
  row['compile_s_ours'] = round(time.perf_counter() - start, 2)  # Init and XLA compilation (ahead of time).
  if not spec.timm_name:
    row['timm_missing'] = 'no timm_name in the registry spec'
  elif timm_available and timm_variants:
    theirs = timm_steps(spec.timm_name, mode=mode, batch_size=batch_size, image_size=image_size, dtype=dtype,
                           num_classes=num_classes, variants=timm_variants)
    steps.update({f'timm_{k}': v for k, v in theirs.items()})
  for key in list(steps):  # Compilation (XLA; torch.compile, which may recompile once for the mode) is untimed.
    try:
      row[f'warmup_s_{key}'] = round(_warm(steps[key], 3 if key == 'timm_compiled' else 2), 2)
    except Exception as e:  # pylint: disable=broad-except  (torch.compile can fail on a model or platform)
      if key == 'ours':
        raise
      row[f'{key}_failed'] = f'{type(e).__name__}: {str(e)[:300]}'
      del steps[key]
  times: dict[str, list[float]] = {k: [] for k in steps}
  for _ in range(rounds):
    for key, step in steps.items():
      times[key] += _time(step, steps_per_round)
  for key, ts in times.items():
    ms = 1e3 * float(np.median(ts))
    row[f'ms_{key}'] = round(ms, 2)
    row[f'img_per_s_{key}'] = round(batch_size / ms * 1e3, 2)
  return row


FLAGS = flags.FlagValues()
flags.DEFINE_list('models', ['vit_s16'], 'registered model names (those with a timm_name get a timm column)',
                  flag_values=FLAGS)
flags.DEFINE_list('modes', ['infer', 'train'], f'subset of {list(MODES)}', flag_values=FLAGS)
flags.DEFINE_list('batches', ['8'], 'batch sizes, e.g. 8,1', flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'input resolution', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string('dtype', 'float32', f'compute dtype, one of {list(DTYPES)} (timm: CPU autocast)',
                    flag_values=FLAGS)
flags.DEFINE_string('xla_flags', '', 'extra XLA flags appended to XLA_FLAGS before JAX starts', flag_values=FLAGS)
flags.DEFINE_enum('attention_impl', None, attention.IMPLEMENTATIONS,
                  "our attention kernel (model option attention_impl); default: the model's", flag_values=FLAGS)
flags.DEFINE_list('timm', list(TIMM_VARIANTS), 'timm variants to time (empty: ours only, e.g. for flag '
                  'experiments)', flag_values=FLAGS)
flags.DEFINE_integer('rounds', 5, 'alternating rounds', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('steps_per_round', 2, 'timed steps per contender per round', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('num_classes', 1000, 'classifier outputs', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('threads', 0, 'torch intra-op threads (0: the core count)', lower_bound=0, flag_values=FLAGS)
flags.DEFINE_bool('allow_load', False, f'measure even above load {LOAD_LIMIT_PER_CORE} per core (rows marked '
                  'LOADED)', flag_values=FLAGS)
flags.DEFINE_string('table', None, 'write the markdown table to this file', flag_values=FLAGS)
flags.DEFINE_string('json', None, 'write the JSON result to this file', flag_values=FLAGS)
flags.DEFINE_multi_string('preimport', [], 'module imported before timm (repeatable), e.g. a torchvision stub',
                          flag_values=FLAGS)


def parse(argv: Sequence[str]) -> flags.FlagValues:
  """Parses arguments (without the program name) into FLAGS; bad values exit naming the flag and the fix."""
  FLAGS.unparse_flags()
  try:
    rest = FLAGS(['compare', *argv])
    if len(rest) > 1:
      raise ValueError(f'unexpected arguments {rest[1:]}')
    try:
      batches = [int(b) for b in FLAGS.batches]
    except ValueError as e:
      raise ValueError(f'--batches must be integers, e.g. --batches 8,1; got {FLAGS.batches}.') from e
    from vit_jax import models  # pylint: disable=g-import-not-at-top
    validate_args(model_names=FLAGS.models, modes=FLAGS.modes, batches=batches, dtype=FLAGS.dtype,
                  xla_flags=FLAGS.xla_flags, timm_variants=FLAGS.timm, known_models=models.list_models())
  except (flags.Error, ValueError) as e:
    sys.exit(f'compare: {e}')
  return FLAGS


def _import_torch(preimport: Sequence[str], threads: int) -> Optional[str]:
  """Imports timm and torch and sets torch's threads; returns their versions, or None (printed why) if missing."""
  try:
    for module in preimport:
      importlib.import_module(module)
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    print(f'timm comparison skipped: {e}', flush=True)
    return None
  torch.set_num_threads(threads)
  return f'torch {torch.__version__} ({torch.get_num_threads()} threads) / timm {timm.__version__}'


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse(sys.argv[1:] if argv is None else argv)
  cores = core_count()
  load_before = os.getloadavg()
  print(f'load average (1, 5, 15 min) before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} '
        f'on {cores} cores (limit {LOAD_LIMIT_PER_CORE} per core)', flush=True)
  try:
    note = check_load(load_before[0], cores, args.allow_load)
  except RuntimeError as e:
    sys.exit(f'compare: {e}')
  xla_flags = apply_xla_flags(args.xla_flags)
  import jax  # pylint: disable=g-import-not-at-top
  threads = args.threads or cores
  torch_info = _import_torch(args.preimport, threads) if args.timm else None
  env = (f'jax {jax.__version__} ({jax.devices()[0].platform}, XLA_FLAGS={xla_flags!r}, XLA default threads: all '
         f'{cores} cores), {torch_info or "no timm"}; {platform.processor() or platform.machine()}')
  print(env, flush=True)
  rows = []
  for model_name in args.models:
    for batch_size in [int(b) for b in args.batches]:
      for mode in args.modes:
        row = measure(model_name, mode=mode, batch_size=batch_size, image_size=args.image_size, dtype=args.dtype,
                      rounds=args.rounds, steps_per_round=args.steps_per_round, num_classes=args.num_classes,
                      attention_impl=args.attention_impl, timm_variants=args.timm,
                      timm_available=torch_info is not None)
        row['load'] = note or load_note(os.getloadavg()[0], cores)
        rows.append(row)
        print(f"{model_name} {mode} batch {batch_size}: " + ', '.join(
            f"{k[len('img_per_s_'):]} {v} img/s" for k, v in row.items() if k.startswith('img_per_s_'))
            + ''.join(f", {k}: {v}" for k, v in row.items() if k.endswith('_failed') or k == 'timm_missing')
            + (f" [{row['load']}]" if row['load'] else ''), flush=True)
  load_after = os.getloadavg()
  print(f'load average (1, 5, 15 min) after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}',
        flush=True)
  note = note or load_note(load_after[0], cores)
  for row in rows:  # A load that rose past the limit during the run taints every row of it.
    row['load'] = row['load'] or note
  preamble = [f'{"**" + note + "** - not a valid measurement. " if note else ""}{args.dtype}, {args.image_size} px, '
              f'our attention {args.attention_impl or "default"}, '
              f'{args.rounds} alternating rounds x {args.steps_per_round} steps, medians; '
              f'load {load_before[0]:.1f} before, {load_after[0]:.1f} after, {cores} cores.', env]
  table = markdown_table(rows, preamble)
  print(table, flush=True)
  if args.table:
    with open(args.table, 'w') as f:
      f.write(table)
  result = dict(load=note, rows=rows, dtype=args.dtype, image_size=args.image_size, rounds=args.rounds,
                steps_per_round=args.steps_per_round, attention_impl=args.attention_impl, xla_flags=xla_flags,
                cores=cores, torch_threads=threads if torch_info else None, environment=env,
                load_average_before=[round(x, 2) for x in load_before],
                load_average_after=[round(x, 2) for x in load_after])
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)
  print(json.dumps(result), flush=True)
  return result


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main()
