"""One table from model names to constructors and published metadata.

Families register their variants at import time with `register_model`; users and the trainer go through
`create_model` and `list_models` only.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model: its constructor, default hyperparameters and published facts."""
  name: str
  builder: Callable[..., nn.Module]
  kwargs: Mapping[str, Any]
  family: str
  image_size: int = 224
  num_params: Optional[int] = None  # Official count at `image_size` px with 1000 classes.
  timm_name: Optional[str] = None


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, builder: Callable[..., nn.Module], *, family: str, image_size: int = 224,
                   num_params: Optional[int] = None, timm_name: Optional[str] = None,
                   **kwargs: Any) -> ModelSpec:
  """Adds `name` to the registry; `kwargs` are the builder's default hyperparameters."""
  if name in _REGISTRY:
    raise ValueError(f'Model {name!r} is registered twice.')
  spec = ModelSpec(name=name, builder=builder, kwargs=dict(kwargs), family=family, image_size=image_size,
                   num_params=num_params, timm_name=timm_name)
  _REGISTRY[name] = spec
  return spec


def list_models(pattern: str = '*') -> list[str]:
  """Sorted registered names matching a shell-style `pattern` (e.g. 'vit_*')."""
  return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_model_spec(name: str) -> ModelSpec:
  """The spec of `name`; unknown names raise a ValueError that suggests close matches."""
  try:
    return _REGISTRY[name]
  except KeyError:
    close = difflib.get_close_matches(name, _REGISTRY, n=3, cutoff=0.5)
    hint = f' Did you mean {" or ".join(map(repr, close))}?' if close else ''
    raise ValueError(f'Unknown model {name!r}.{hint} Known models: {", ".join(list_models())}. '
                     'Set config.model.name to one of them.') from None


def families_of(model: nn.Module) -> list[str]:
  """Families whose registered models are built by `model`'s class (usually one; ViT and DeiT share a class)."""
  return sorted({s.family for s in _REGISTRY.values() if s.builder is type(model)})


def model_options(builder: Callable[..., nn.Module]) -> set[str]:
  """The constructor fields a user may override (flax's own `parent` and `name` excluded)."""
  return {f.name for f in dataclasses.fields(builder) if f.init} - {'parent', 'name'}


def create_model(name: str, *, num_classes: int, **overrides: Any) -> nn.Module:
  """Builds registered model `name` with `num_classes` outputs; `overrides` replace default hyperparameters."""
  spec = get_model_spec(name)
  unknown = sorted(set(overrides) - model_options(spec.builder))
  if unknown:
    raise ValueError(f'Model {name!r} has no option(s) {unknown}. Valid options: '
                     f'{sorted(model_options(spec.builder) - {"num_classes"})}.')
  if not isinstance(num_classes, int) or num_classes < 0:
    raise ValueError(f'num_classes must be a non-negative int, got {num_classes!r}.')
  return spec.builder(num_classes=num_classes, **{**spec.kwargs, **overrides})


def example_input(model: nn.Module, image_size: int, batch: int = 1) -> jax.ShapeDtypeStruct:
  """The float32 input `model` takes at `image_size`: (batch, image_size, image_size, 3) images, unless the model
  says otherwise with an `input_shape(image_size)` method (video: (frames, size, size, 3); audio: a spectrogram).
  What initialisation, conversion and FLOP counting trace the model with."""
  shape_fn = getattr(model, 'input_shape', None)
  shape = tuple(shape_fn(image_size)) if callable(shape_fn) else (image_size, image_size, 3)
  return jax.ShapeDtypeStruct((batch,) + shape, jnp.float32)
