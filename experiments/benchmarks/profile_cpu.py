"""Where one compiled step spends its time: a jax.profiler trace broken down per XLA op, with each op's HLO.

  python -m experiments.benchmarks.profile_cpu                      # ViT-S/16 inference, batch 8, 224 px, CPU
  python -m experiments.benchmarks.profile_cpu --model swin_t --mode train --batch_size 8 --top 30
  python -m experiments.benchmarks.profile_cpu --trace_dir DIR --keep_trace   # also keep the trace for Perfetto

Builds the step of `vit_jax.benchmark.build_step`, warms it up, traces `--steps` steps with `jax.profiler.trace`
and reads the trace back (`jax.profiler.ProfileData`, no TensorBoard needed). On the CPU, XLA's runtime records one
event per executed thunk (a fusion, a dot, a YNNPACK/oneDNN call), named after its HLO instruction; on a GPU the
device plane's "XLA Ops" line does the same for kernels. Each op is joined to the optimised HLO
(`Compiled.as_text()`) for its category and source location (the Flax scope in its metadata), then printed:
- the top ops by share of the summed op time, with milliseconds per step, shape, the computing opcodes fused into
  the op (a YNNPACK fusion can hold the attention softmax next to its dots) and scope;
- the same summed by category (matmul by library, softmax, LayerNorm, GELU, layout transposes/copies, concat, ...);
- the same summed by source op with layer indices removed (all 12 blocks' `MlpBlock_0/Dense_0` together).

Shares are ratios within one run, so they stay meaningful on a loaded machine (every op is slowed roughly alike;
multi-threaded matmuls somewhat more), unlike absolute times. The categories are a heuristic over each fusion's
opcodes, in order: a dot with an exp is fused attention, any other dot or convolution (or a library call) a matmul,
then exp -> softmax, erf/tanh -> GELU, rsqrt -> LayerNorm, concatenate -> concat, only transposes/copies -> layout.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Optional, Sequence

from absl import flags

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\(')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_LAYOUT_OPS = {'transpose', 'copy', 'bitcast', 'reshape', 'parameter', 'broadcast', 'slice', 'tuple',
               'get-tuple-element', 'constant'}
_HOST_SKIP = ('ThunkExecutor', 'ThreadpoolListener')


def parse_hlo(text: str) -> dict[str, dict[str, Any]]:
  """{instruction name: {'shape', 'opcode', 'opcodes' (its own and, for a fusion, its computation's), 'target',
  'scope'}} for every instruction of an optimised HLO module's text."""
  computations: dict[str, list[str]] = {}
  instructions: dict[str, dict[str, Any]] = {}
  current: Optional[str] = None
  for line in text.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(1)
      computations[current] = []
      continue
    m = _INSTRUCTION.match(line)
    if not m or current is None:
      continue
    name, shape, opcode = m.groups()
    computations[current].append(opcode)
    calls, op_name, target = _CALLS.search(line), _OP_NAME.search(line), _TARGET.search(line)
    instructions[name] = dict(shape=shape, opcode=opcode, calls=calls.group(1) if calls else None,
                              scope=op_name.group(1) if op_name else '', target=target.group(1) if target else '')
  for info in instructions.values():
    info['opcodes'] = {info['opcode'], *computations.get(info.pop('calls') or '', ())}
  return instructions


def categorise(name: str, info: Optional[dict[str, Any]]) -> str:
  """A coarse category for the op `name` with HLO facts `info` (None: not in the module, e.g. a runtime event)."""
  if info is None:
    return 'other (not an HLO instruction)'
  ops, target = info['opcodes'] - {'fusion'}, info['target'].lower()
  library = ('YNNPACK' if name.startswith('ynn') or 'ynn' in target else 'XNNPACK' if 'xnn' in target
             else 'oneDNN' if 'onednn' in target else 'cuBLAS/cuDNN' if ('cublas' in target or 'cudnn' in target)
             else 'XLA')
  if 'dot' in ops and 'exponential' in ops:  # E.g. YNNPACK fuses scores, softmax and the weighted sum.
    return f'attention: dot + softmax fused ({library})'
  if ops & {'dot', 'convolution'} or (info['opcode'] == 'custom-call' and library != 'XLA'):
    return f'matmul/conv ({library})'
  if 'exponential' in ops:
    return 'softmax (exp)'
  if ops & {'erf', 'tanh'}:
    return 'GELU (erf/tanh)'
  if 'rsqrt' in ops:
    return 'LayerNorm (rsqrt)'
  if 'concatenate' in ops:
    return 'concat'
  if ops <= _LAYOUT_OPS:
    return 'layout (transpose/copy)'
  if ops & {'reduce', 'reduce-window'}:
    return 'other reduce'
  return 'other elementwise'


def op_times(xspace_path: str) -> dict[str, float]:
  """Summed seconds per XLA op name in one trace file: the GPU plane's 'XLA Ops' line when there is one, else
  the host's XLA runtime threads (thunk events; executor and thread-pool bookkeeping skipped)."""
  import jax  # pylint: disable=g-import-not-at-top
  data = jax.profiler.ProfileData.from_file(xspace_path)
  totals: collections.Counter[str] = collections.Counter()
  planes = list(data.planes)
  device = [p for p in planes if p.name.startswith('/device:GPU')]
  if device:
    for plane in device:
      for line in plane.lines:
        if line.name == 'XLA Ops':
          for event in line.events:
            totals[event.name] += event.duration_ns * 1e-9
    return dict(totals)
  for plane in planes:
    if plane.name != '/host:CPU':
      continue
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):
        continue
      for event in line.events:
        if not event.name.startswith(_HOST_SKIP):
          totals[event.name] += event.duration_ns * 1e-9
  return dict(totals)


def _source(scope: str) -> str:
  """The Flax scope of an op without the jit wrapper, model prefix and layer indices: 'encoderblock_*/...'."""
  if not scope:
    return '(no source metadata)'
  parts = scope.split('/')[2:] or [scope]
  return re.sub(r'(block|layers|stage|blocks)_\d+', r'\1_*', '/'.join(parts[-3:]))


def breakdown(times: dict[str, float], hlo: dict[str, dict[str, Any]], steps: int) -> dict[str, Any]:
  """Per op, per category and per source: milliseconds per step and share of the summed op time, largest first."""
  total = sum(times.values()) or 1.0
  ops, categories, sources = [], collections.Counter(), collections.Counter()
  for name, seconds in times.items():
    info = hlo.get(name)
    category = categorise(name, info)
    source = _source(info['scope']) if info else '-'
    categories[category] += seconds
    sources[f'{source} [{category}]'] += seconds
    fused = ' '.join(sorted(info['opcodes'] - _LAYOUT_OPS - {'fusion'})) if info else ''
    ops.append(dict(name=name, category=category, ms_per_step=1e3 * seconds / steps, share=seconds / total,
                    shape=info['shape'] if info else '', source=source, fused=f'({fused})' if fused else ''))
  ops.sort(key=lambda o: -o['share'])
  ranked = lambda c: [dict(name=k, ms_per_step=1e3 * v / steps, share=v / total) for k, v in c.most_common()]
  return dict(ops=ops, categories=ranked(categories), sources=ranked(sources), op_ms_per_step=1e3 * total / steps)


def _print_ranked(title: str, rows: Sequence[dict[str, Any]], top: int, extra: Sequence[str] = ()) -> None:
  print(f'\n{title}')
  for r in rows[:top]:
    print(f"  {100 * r['share']:5.1f}%  {r['ms_per_step']:8.2f} ms  {r['name']}"
          + ''.join(f'  {r[k]}' for k in extra if r.get(k)))


def profile(*, model_name: str, mode: str, batch_size: int, image_size: int, dtype: str, attention_impl: Optional[str],
            steps: int, trace_dir: str) -> dict[str, Any]:
  """Traces `steps` steps of the compiled step into `trace_dir` and returns `breakdown` plus the step wall time."""
  import time  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from vit_jax import benchmark  # pylint: disable=g-import-not-at-top
  run, compiled, _ = benchmark.build_step(model_name=model_name, batch_size=batch_size, image_size=image_size,
                                          dtype=dtype, mode=mode, attention_impl=attention_impl)
  for _ in range(2):
    jax.block_until_ready(run())
  with jax.profiler.trace(trace_dir):
    start = time.perf_counter()
    for _ in range(steps):
      jax.block_until_ready(run())
    wall = time.perf_counter() - start
  files = sorted(glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'), recursive=True), key=os.path.getmtime)
  if not files:
    raise RuntimeError(f'jax.profiler.trace wrote no .xplane.pb under {trace_dir}.')
  result = breakdown(op_times(files[-1]), parse_hlo(compiled.as_text()), steps)
  result.update(wall_ms_per_step=1e3 * wall / steps, trace_file=files[-1], device=jax.devices()[0].device_kind)
  return result


FLAGS = flags.FlagValues()
flags.DEFINE_string('model', 'vit_s16', 'registered model name', flag_values=FLAGS)
flags.DEFINE_enum('mode', 'infer', ('infer', 'train'), 'inference or train step', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 8, 'images per step', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'input resolution', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_enum('dtype', 'float32', ('float32', 'bfloat16'), 'compute dtype', flag_values=FLAGS)
flags.DEFINE_string('attention_impl', None, 'model option attention_impl (einsum, xla, cudnn)', flag_values=FLAGS)
flags.DEFINE_integer('steps', 5, 'traced steps', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer('top', 25, 'rows per listing', lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string('trace_dir', None, 'where the trace goes (default: a temporary folder)', flag_values=FLAGS)
flags.DEFINE_bool('keep_trace', False, 'keep the trace (view it in Perfetto / TensorBoard)', flag_values=FLAGS)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  FLAGS.unparse_flags()
  try:
    rest = FLAGS(['profile_cpu', *(sys.argv[1:] if argv is None else argv)])
  except flags.Error as e:
    sys.exit(f'profile_cpu: {e}')
  if len(rest) > 1:
    sys.exit(f'profile_cpu: unexpected arguments {rest[1:]}')
  trace_dir = FLAGS.trace_dir or tempfile.mkdtemp(prefix='vit_jax_trace_')
  load = os.getloadavg()[0]
  result = profile(model_name=FLAGS.model, mode=FLAGS.mode, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
                   dtype=FLAGS.dtype, attention_impl=FLAGS.attention_impl, steps=FLAGS.steps, trace_dir=trace_dir)
  print(f'{FLAGS.model} {FLAGS.mode}, batch {FLAGS.batch_size}, {FLAGS.image_size} px, {FLAGS.dtype}, '
        f'{result["device"]}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; load average {load:.1f} before, '
        f'{os.getloadavg()[0]:.1f} after on {os.cpu_count()} CPUs (shares stay meaningful under load; times do not)')
  print(f'{FLAGS.steps} traced steps: wall {result["wall_ms_per_step"]:.1f} ms/step, summed op time '
        f'{result["op_ms_per_step"]:.1f} ms/step (ops on parallel threads overlap; shares are of the sum)')
  _print_ranked('By category:', result['categories'], FLAGS.top)
  _print_ranked('By source op (layer indices merged):', result['sources'], FLAGS.top)
  _print_ranked('Top XLA ops:', [dict(o, name=f"{o['name']} [{o['category']}]") for o in result['ops']],
                FLAGS.top, extra=('shape', 'fused', 'source'))
  if FLAGS.keep_trace:
    print(f'\ntrace: {result["trace_file"]}')
  elif not FLAGS.trace_dir:
    shutil.rmtree(trace_dir, ignore_errors=True)
  return result


if __name__ == '__main__':
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  main()
