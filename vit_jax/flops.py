"""FLOP accounting (REFERENCE.md section 4): multiply-adds per image, FLOPs = 2 x MACs, training = 3 x forward.

Analytic counts (matmuls and convolutions only, as the published "GFLOPs") come from each family's facts
(`FamilyFacts.forward_macs`, vit_jax/models/facts.py, e.g. `vit.vit_forward_macs`); every other model falls back
to XLA's cost analysis of its lowered forward pass (`xla_forward_flops`), which also counts elementwise work (a
few % more). jax and the models are imported lazily.
"""
from __future__ import annotations

from typing import Any, Optional

TRAIN_TO_FORWARD = 3  # Backward costs about twice the forward pass.


def forward_flops(macs: float) -> float:
  """FLOPs of a forward pass from its multiply-adds."""
  return 2.0 * macs


def train_flops(macs: float) -> float:
  """FLOPs of one training step on one image (forward + backward) from the forward multiply-adds."""
  return TRAIN_TO_FORWARD * forward_flops(macs)


def xla_forward_flops(model: Any, image_size: int) -> float:
  """FLOPs of one forward pass on one image, from XLA's cost analysis of the lowered (uncompiled) computation.

  Counts 2 per multiply-add plus one per elementwise op; needs no parameters in memory (abstract shapes only).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top
  images = registry.example_input(model, image_size)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  lowered = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if not cost or 'flops' not in cost:
    raise RuntimeError(f'XLA cost analysis reported no flops for {type(model).__name__}.')
  return float(cost['flops'])


def model_forward_flops(model: Any, image_size: int, family: Optional[str] = None) -> tuple[float, str]:
  """(forward FLOPs per image, method) for a registry model: 'analytic' where the model's family gives a
  `forward_macs` count that applies to this configuration, 'xla' (cost analysis) otherwise.

  `family`: the model's registry family; None looks it up by the model's class.
  """
  from vit_jax.models import facts  # pylint: disable=g-import-not-at-top
  from vit_jax.models import registry  # pylint: disable=g-import-not-at-top

  for name in [family] if family else registry.families_of(model):
    count = facts.get_family(name).forward_macs
    macs = count(model, image_size) if count else None
    if macs is not None:
      return forward_flops(macs), 'analytic'
  return xla_forward_flops(model, image_size), 'xla'

