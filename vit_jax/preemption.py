"""Preemption: SIGTERM or Ctrl-C (single process), or the multi-host preemption sync point, asks the run to save and
exit.

Single process: a handler for SIGTERM and SIGINT sets a flag that the run reads before the loop and after each step;
the loop then checkpoints the step it is on and returns. A second SIGINT (Ctrl-C pressed again) raises
KeyboardInterrupt at once, without waiting for the step or the save. A signal that arrives before training starts
(while the run is still being built) is honoured too: the run returns before claiming or writing anything.
Multi-host: JAX's preemption sync manager (started by jax.distributed.initialize) catches SIGTERM and, through
Orbax's `CheckpointManager.reached_preemption`, tells every process to stop at the same step, so their saves agree;
SIGINT keeps its default there (one process's flag would split the processes' steps).
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

from absl import logging

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_early: dict[str, Any] = {'signal': None, 'previous': {}}


def _record_early(signum: int, frame: Any) -> None:
  del frame
  if _early['signal'] == 'SIGINT' and signum == signal.SIGINT:
    raise KeyboardInterrupt
  _early['signal'] = signal.Signals(signum).name
  logging.warning('Received %s while starting: the run will stop before training.', _early['signal'])


def catch_signals_early() -> None:
  """Records SIGTERM / SIGINT from now on (single-process command line, before the slow imports and set-up), so a
  signal that arrives before the run's `PreemptionWatcher` exists still stops the run cleanly."""
  if threading.current_thread() is threading.main_thread():
    for sig in _SIGNALS:
      _early['previous'][sig] = signal.signal(sig, _record_early)


class PreemptionWatcher:
  """`watcher(step)` is True when the run should checkpoint at `step` and exit. Use as a context manager.

  `requested` is True once a signal has arrived (also before the loop); `set_sync_point` gives it the multi-host
  sync point once the checkpointer exists.
  """

  def __init__(self, reached_sync_point: Optional[Callable[[int], bool]] = None):
    import jax  # pylint: disable=g-import-not-at-top
    self._reached_sync_point = reached_sync_point
    self._signal: Optional[str] = None
    self._previous: dict[int, Any] = {}
    self._multi_process = jax.process_count() > 1

  def set_sync_point(self, reached_sync_point: Callable[[int], bool]) -> None:
    self._reached_sync_point = reached_sync_point

  def __enter__(self) -> PreemptionWatcher:
    # Multi-host runs leave SIGTERM to JAX's preemption notifier, so that all processes stop at one step.
    if not self._multi_process and threading.current_thread() is threading.main_thread():
      self._signal = _early['signal']
      for sig in _SIGNALS:
        self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      # Restore what was there before catch_signals_early (the caller's own handlers, or the defaults).
      signal.signal(sig, _early['previous'].get(sig, previous) if previous is _record_early else previous)
    self._previous = {}
    _early['signal'] = None

  def _on_signal(self, signum: int, frame: Any) -> None:
    del frame
    name = signal.Signals(signum).name
    if signum == signal.SIGINT and self._signal == 'SIGINT':
      logging.warning('Second SIGINT: stopping now, without a checkpoint of the current step.')
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self._signal = self._signal or name
    logging.warning('Received %s: will checkpoint after the current step and exit%s.', name,
                    ' (press Ctrl-C again to stop at once)' if signum == signal.SIGINT else '')

  @property
  def requested(self) -> bool:
    """True once SIGTERM or SIGINT has been received (single process)."""
    return self._signal is not None

  @property
  def reason(self) -> str:
    return self._signal or 'preemption sync point'

  def __call__(self, step: int) -> bool:
    if self._signal is not None:
      return True
    return self._multi_process and self._reached_sync_point is not None and self._reached_sync_point(step)
