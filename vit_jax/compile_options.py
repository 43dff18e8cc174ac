"""Per-program XLA compile options: forward-only programs on CPU compile without YNNPACK's library fusions.

XLA:CPU (jax 0.10) hands dots, reductions and the elementwise ops around them to YNNPACK by default. For a
forward pass that is slower than XLA's own code, for a reason we can see: with reductions offloaded, YNNPACK
swallows a whole attention block (QK^T, scale, softmax, PV) into one library fusion, which ran 3.2x slower than
XLA's separate dots and softmax (ViT-S/16 shapes, batch 8: 70 ms against 22 ms). Measured at idle on the 2-core
AVX-512 machine, whole-model inference without the fusions was faster everywhere we looked: ViT-S/16 batch 8
1.15-1.3x, Swin-T 1.1-1.45x, and the mobile families 1.5-1.6x at batch 1 (README, "Performance"). Training steps
were within noise either way (ViT-S/16 a little faster, Swin-T a little slower), so they keep XLA's default.

The option is set per compiled program (`jax.jit(..., compiler_options=...)`) rather than through XLA_FLAGS, so one
process can train with XLA's default and evaluate without the fusions. A user's own
`--xla_cpu_experimental_ynn_fusion_type` in XLA_FLAGS always wins, and other platforms are left alone.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax

YNN_FUSION_FLAG = 'xla_cpu_experimental_ynn_fusion_type'


def inference(platform: Optional[str] = None) -> Optional[dict[str, str]]:
  """`compiler_options` for a jitted forward-only program (evaluation, prediction, features, latency).

  On CPU: YNNPACK library fusions off (see the module docstring). None, i.e. XLA's defaults, on other platforms
  and whenever XLA_FLAGS sets the YNNPACK fusion flag itself. `platform` defaults to JAX's default backend.
  """
  if YNN_FUSION_FLAG in os.environ.get('XLA_FLAGS', ''):
    return None
  if (platform or jax.default_backend()) != 'cpu':
    return None
  return {YNN_FUSION_FLAG: ''}


def jit_inference(fn: Callable[..., Any], **jit_kwargs: Any) -> 'jax.stages.Wrapped':
  """`jax.jit(fn, **jit_kwargs)` compiled with `inference()`'s options: use it for every forward-only program."""
  return jax.jit(fn, compiler_options=inference(), **jit_kwargs)
