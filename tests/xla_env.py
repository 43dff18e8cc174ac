"""XLA settings shared by the test process and the `python -m ...` processes that tests start.

Tests check correctness on tiny models, where XLA's compile time dominates the run time on CPU. Two settings cut it
without changing what a test computes:
- `--xla_backend_optimization_level=0` skips LLVM's optimisation of the generated CPU code: compiles take about a
  third of the time (a tiny MaxViT's init 29 s -> 8 s), and tiny models run no slower overall. Float semantics are
  unchanged (no fast-math either way); results agree to the last bits, so tests compare with their usual tolerances,
  and a process and the processes it starts use the same setting.
- one persistent compilation cache per test session (JAX_COMPILATION_CACHE_DIR, see conftest.py): a program compiled
  once (e.g. the train step of a run and of its resumed rerun, in-process or in a subprocess) is loaded, not
  recompiled.
"""
from __future__ import annotations

import os

CPU_COMPILE_FLAGS = '--xla_backend_optimization_level=0'


def xla_flags(device_count: int = 1) -> str:
  """XLA_FLAGS for a test process: fast CPU compiles, and `device_count` simulated CPU devices when above 1."""
  if device_count < 1:
    raise ValueError(f'device_count must be >= 1, got {device_count}.')
  devices = f' --xla_force_host_platform_device_count={device_count}' if device_count > 1 else ''
  return CPU_COMPILE_FLAGS + devices


def subprocess_env(device_count: int = 1, **extra: str) -> dict[str, str]:
  """The environment of a CPU subprocess started by a test (e.g. `python -m vit_jax.main`): this process's
  environment (so the session's compilation cache), `device_count` CPU devices and the test compile flags, plus
  `extra`."""
  return {**os.environ, 'XLA_FLAGS': xla_flags(device_count), 'JAX_PLATFORMS': 'cpu', **extra}
