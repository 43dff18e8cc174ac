"""Training objectives ("tasks") for the one loop in vit_jax/train.py; `config.task.name` picks one.

Each task is one module of this package that defines a `base.Task` subclass decorated with `base.register_task`.
Every module here is imported when the package is (no list to edit), so adding a task is adding its file.
See base.py for the interface.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import ml_collections

from vit_jax.tasks import base
from vit_jax.tasks.base import StepContext, Task, register_task  # noqa: F401  (public API)

DEFAULT_TASK = 'classification'


def _import_task_modules() -> None:
  for module in pkgutil.iter_modules(__path__):
    if module.name != 'base':
      importlib.import_module(f'{__name__}.{module.name}')


_import_task_modules()


def list_tasks() -> list[str]:
  return sorted(base.registered_tasks())


def get_task(name: str) -> type[Task]:
  """The task class registered as `name`; ValueError naming the known tasks otherwise."""
  tasks = base.registered_tasks()
  if name not in tasks:
    raise ValueError(f'config.task.name={name!r} is not a known task; choose one of {sorted(tasks)}.')
  return tasks[name]


def task_name(config: ml_collections.ConfigDict) -> str:
  """config.task.name, or the default for configs without a task section."""
  return config.task.name if 'task' in config else DEFAULT_TASK


def from_config(config: ml_collections.ConfigDict, model: Any, dataset_info: Any) -> Task:
  """The task of `config` (config.task.name, default 'classification') for `model` and the dataset."""
  return get_task(task_name(config)).from_config(config, model, dataset_info)


def config_defaults() -> ml_collections.ConfigDict:
  """config.task's schema: `name` plus one section of defaults per task that has its own fields."""
  section = ml_collections.ConfigDict()
  section.name = DEFAULT_TASK
  for name, cls in sorted(base.registered_tasks().items()):
    defaults = cls.config_defaults()
    if defaults:
      section[name] = ml_collections.ConfigDict(defaults)
  return section
