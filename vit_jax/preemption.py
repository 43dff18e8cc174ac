"""Preemption: SIGTERM (single process) or the multi-host preemption sync point asks the loop to save and exit.

Single process: a SIGTERM handler sets a flag that the loop reads after each step. Multi-host: JAX's preemption
sync manager (started by jax.distributed.initialize) catches the signal and, through Orbax's
`CheckpointManager.reached_preemption`, tells every process to stop at the same step, so their saves agree.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

import jax
from absl import logging


class PreemptionWatcher:
  """`watcher(step)` is True when the run should checkpoint at `step` and exit. Use as a context manager."""

  def __init__(self, reached_sync_point: Callable[[int], bool]):
    self._reached_sync_point = reached_sync_point
    self._signal: Optional[str] = None
    self._previous: Any = None
    self._multi_process = jax.process_count() > 1

  def __enter__(self) -> PreemptionWatcher:
    # Multi-host runs leave SIGTERM to JAX's preemption notifier, so that all processes stop at one step.
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_signal(self, signum: int, frame: Any) -> None:
    del frame
    self._signal = signal.Signals(signum).name
    logging.warning('Received %s: will checkpoint after the current step and exit.', self._signal)

  @property
  def reason(self) -> str:
    return self._signal or 'preemption sync point'

  def __call__(self, step: int) -> bool:
    if self._signal is not None:
      return True
    return self._multi_process and self._reached_sync_point(step)
