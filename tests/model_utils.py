"""Helpers shared by the model tests: random images, abstract / random parameters, parameter counts, XLA's count
of a forward pass's matmul and convolution FLOPs.

Parameters come from `jax.eval_shape(model.init, ...)` plus numpy noise, so no test compiles an initialiser
(slow on a 2-core CPU).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import registry


def images(batch: int = 2, size: int = 16, seed: int = 0, width: Optional[int] = None) -> jax.Array:
  """Standard-normal NHWC images (batch, size, width or size, 3)."""
  return jax.random.normal(jax.random.key(seed), (batch, size, width or size, 3))


def abstract_variables(model: Any, x: Any) -> Any:
  """ShapeDtypeStructs of every variable collection `model.init` would create for input `x` (array or struct)."""
  return jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(x.shape, x.dtype))


def abstract_params(model: Any, size: int = 16, width: Optional[int] = None) -> Any:
  """ShapeDtypeStructs of the model's params for a (1, size, width or size, 3) input (or, for models with their
  own input, e.g. video, `registry.example_input`)."""
  if width is None and callable(getattr(model, 'input_shape', None)):
    return abstract_variables(model, registry.example_input(model, size))['params']
  return abstract_variables(model, jax.ShapeDtypeStruct((1, size, width or size, 3), jnp.float32))['params']


def count(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def count_params(model: Any, size: int) -> int:
  """The model's parameter count at a square `size` input (via eval_shape)."""
  return count(abstract_params(model, size))


def randomize(abstract: Any, seed: int = 0) -> Any:
  """Random non-zero params for an abstract tree: norm scales N(1, 0.1), everything else N(0, 0.05)."""
  flat = traverse_util.flatten_dict(abstract, sep='/')
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in flat.items():
    noise = rng.normal(0.0, 0.1 if k.endswith('scale') else 0.05, v.shape).astype(np.float32)
    out[k] = jnp.asarray(noise + 1.0 if k.endswith('scale') else noise)
  return traverse_util.unflatten_dict(out, sep='/')


def random_params(model: Any, size: int = 16, seed: int = 0) -> Any:
  """`randomize` of the model's params at a square `size` input (every leaf non-zero, unlike the inits)."""
  return randomize(abstract_params(model, size), seed)


def random_variables(model: Any, x: Any, seed: int = 0, std: float = 0.2) -> Any:
  """Every variable N(0, std) (a harsher, non-degenerate draw: zero-initialised norms and heads become active)."""
  shapes = abstract_variables(model, x)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(std * rng.standard_normal(s.shape), s.dtype), shapes)


_MATMULS = ('dot_general', 'conv_general_dilated')


def xla_matmul_flops(fn: Callable[..., Any], *args: Any) -> float:
  """XLA's cost analysis of every matmul and convolution in fn's jaxpr (each lowered on its own), summed: what an
  analytic FLOP count (FamilyFacts.forward_macs) is checked against. A `cond` runs one branch, so it counts its
  costliest (e.g. `Conv`'s per-platform choice between a 1x1 conv and a dot counts once). Shapes only; nothing is
  compiled or run."""
  def walk(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in _MATMULS:
        total += _op_flops(eqn)
      inner = [getattr(sub, 'jaxpr', sub) for value in eqn.params.values()
               for sub in (value if isinstance(value, (tuple, list)) else (value,))]
      inner = [walk(j) for j in inner if hasattr(j, 'eqns')]
      if inner and eqn.primitive.name == 'cond':
        total += max(inner)
      elif inner:
        total += sum(inner) * (eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1)
    return total
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _op_flops(eqn: Any) -> float:
  """XLA's flops of one op: 2 per multiply-add, where a conv's kernel taps on its zero padding are not counted (a
  3x3 conv with padding 1 on a 4x4 map: 2 x 100, not 2 x 144), so small maps with large kernels count a few % under
  the published full-kernel convention."""
  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
  lowered = jax.jit(lambda *xs: eqn.primitive.bind(*xs, **eqn.params)).lower(*avals)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])
