"""What a training run prints: one line per log step, one per eval, a closing summary; library INFO logs off.

`configure_logging(verbosity)` (called once by the command-line entry points) keeps absl's INFO records from
vit_jax's own files and drops those of third-party libraries (Orbax's ~50 lines per checkpoint, TFDS, clu's
metric echo, absl internals) unless `--verbosity` is 1 or more. Warnings and errors always show, whoever logs them.

`TrainConsole` turns the loop's scalars into readable lines (and writes images/s to TensorBoard), e.g.

  step   100/800  loss 1.8321  acc 0.412  lr 2.00e-03  1,830 img/s  ETA 0:00:24
  eval   400/800  loss 0.1921  accuracy 0.953  (best 0.953 at 400)
  done   800 steps in 0:01:05; final eval accuracy 0.981 (loss 0.0713), best 0.981 at step 800
"""
from __future__ import annotations

import datetime
import logging as py_logging
import os
import time
from typing import Any, Mapping, Optional

from absl import logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# Top-level directories whose INFO records are the project's own (the package and its experiments).
_OWN_DIRS = (_PACKAGE_DIR, os.path.join(os.path.dirname(_PACKAGE_DIR), 'experiments'))
# Python loggers (not absl) of libraries that log INFO on their own handlers.
_QUIET_LOGGERS = ('jax', 'orbax', 'tensorflow', 'tensorflow_datasets', 'etils', 'matplotlib', 'PIL')


class OwnInfoFilter(py_logging.Filter):
  """Lets through warnings and errors from anywhere, and INFO (or lower) records only from vit_jax's files."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    return os.path.abspath(record.pathname).startswith(_OWN_DIRS)


class ShortFormatter(py_logging.Formatter):
  """'HH:MM:SS message' for INFO; warnings and errors keep their level and origin ('W file.py:12] message')."""

  def format(self, record: py_logging.LogRecord) -> str:
    stamp = time.strftime('%H:%M:%S', time.localtime(record.created))
    message = record.getMessage()
    if record.exc_info:
      message = f'{message}\n{self.formatException(record.exc_info)}'
    if record.levelno >= py_logging.WARNING:
      return f'{stamp} {record.levelname[0]} {os.path.basename(record.pathname)}:{record.lineno}] {message}'
    return f'{stamp} {message}'


def configure_logging(verbosity: int = 0) -> None:
  """Console logging for a run: vit_jax's INFO, everyone's warnings and errors; `verbosity` >= 1 shows every
  library's INFO too (absl's --verbosity flag, e.g. `--verbosity=1`), with absl's full record prefix."""
  logging.use_absl_handler()  # Already done by absl.app.run; needed when a library caller (or a test) calls this.
  logging.set_verbosity(verbosity)
  handler = logging.get_absl_handler()
  for f in [f for f in handler.filters if isinstance(f, OwnInfoFilter)]:
    handler.removeFilter(f)
  if verbosity >= 1:
    handler.setFormatter(logging.PythonFormatter())
    for name in _QUIET_LOGGERS:
      py_logging.getLogger(name).setLevel(py_logging.NOTSET)
    return
  handler.addFilter(OwnInfoFilter())
  handler.setFormatter(ShortFormatter())
  for name in _QUIET_LOGGERS:
    py_logging.getLogger(name).setLevel(py_logging.WARNING)


def format_duration(seconds: float) -> str:
  """H:MM:SS (days folded into hours), e.g. 0:01:05."""
  seconds = max(0, int(round(seconds)))
  return str(datetime.timedelta(seconds=seconds)).replace(' days, ', 'd ').replace(' day, ', 'd ')


def train_line(step: int, total_steps: int, scalars: Mapping[str, float], *, images_per_sec: Optional[float],
               eta_seconds: Optional[float]) -> str:
  """One log step: step/total, loss, accuracy (tasks that have it), learning rate, images/s, ETA, and the count of
  non-finite updates when there were any."""
  width = len(str(total_steps))
  parts = [f'step {step:>{width}}/{total_steps}', f'loss {scalars["train_loss"]:.4f}']
  if 'train_accuracy' in scalars:
    parts.append(f'acc {scalars["train_accuracy"]:.3f}')
  if 'train_learning_rate' in scalars:
    parts.append(f'lr {scalars["train_learning_rate"]:.2e}')
  if images_per_sec is not None:
    parts.append(f'{images_per_sec:,.0f} img/s')
  if eta_seconds is not None:
    parts.append(f'ETA {format_duration(eta_seconds)}')
  if scalars.get('train_nonfinite_updates'):
    parts.append(f'{int(scalars["train_nonfinite_updates"])} non-finite')
  return '  '.join(parts)


def _metric_text(name: str, value: Any) -> str:
  return f'{name} {value:.4f}' if isinstance(value, float) else f'{name} {value}'


def eval_line(step: int, total_steps: int, scalars: Mapping[str, Any], best: Optional[tuple[float, int]],
              key: Optional[str]) -> str:
  """One eval: its scalars without the `eval_` prefix (evaluators' `name/metric` kept whole), and the best value
  of `key` so far as (value, step)."""
  width = len(str(total_steps))
  parts = [f'eval {step:>{width}}/{total_steps}']
  parts += [_metric_text(k[len('eval_'):] if k.startswith('eval_') else k, v) for k, v in scalars.items()]
  if best is not None and key in scalars:
    parts.append(f'(best {best[0]:.4f} at {best[1]})')
  return '  '.join(parts)


def best_key(scalars: Mapping[str, Any]) -> Optional[tuple[str, bool]]:
  """(the eval scalar that ranks checkpoints, whether higher is better): accuracy when there is one, else loss."""
  if 'eval_accuracy' in scalars:
    return 'eval_accuracy', True
  if 'eval_loss' in scalars:
    return 'eval_loss', False
  return None


class TrainConsole:
  """The loop's console reporter; one per run, on every process (only process 0 prints and writes).

  `writer`: a clu metric writer that receives `images_per_sec` at each log step (TensorBoard).
  """

  def __init__(self, *, total_steps: int, start_step: int, batch_size: int, workdir: str, writer: Any = None,
               checkpoint_dir: Optional[str] = None, is_main: bool = True, clock=time.monotonic):
    self.total_steps, self.start_step, self.batch_size = total_steps, start_step, batch_size
    self.workdir, self.writer, self.is_main, self._clock = workdir, writer, is_main, clock
    self.checkpoint_dir = checkpoint_dir or os.path.join(workdir, 'checkpoints')
    self._start = clock()
    self._last_step, self._last_time = start_step, self._start
    self.best: Optional[tuple[float, int]] = None
    self._best_key: Optional[str] = None

  def _print(self, line: str) -> None:
    if self.is_main:
      logging.info('%s', line)

  def train(self, step: int, scalars: Mapping[str, float]) -> None:
    """A log step: prints the line and writes images/s (since the previous log step) to TensorBoard. The first
    window includes compilation, so its rate is low and its ETA high."""
    now = self._clock()
    steps, elapsed = step - self._last_step, now - self._last_time
    images_per_sec = steps * self.batch_size / elapsed if steps > 0 and elapsed > 0 else None
    eta = None
    if step > self.start_step and now > self._start:
      eta = (self.total_steps - step) * (now - self._start) / (step - self.start_step)
    self._last_step, self._last_time = step, now
    if images_per_sec is not None and self.writer is not None:
      self.writer.write_scalars(step, {'images_per_sec': images_per_sec})
    self._print(train_line(step, self.total_steps, scalars, images_per_sec=images_per_sec, eta_seconds=eta))

  def eval(self, step: int, scalars: Mapping[str, Any]) -> None:
    """An eval (or the periodic evaluators' results): prints one line, tracking the best eval so far."""
    ranked = best_key(scalars)
    if ranked is not None:
      key, higher = ranked
      value = float(scalars[key])
      if self.best is None or self._best_key != key or (value > self.best[0] if higher else value < self.best[0]):
        self.best, self._best_key = (value, step), key
    self._print(eval_line(step, self.total_steps, scalars, self.best, self._best_key))

  def summary(self, final: Mapping[str, Any], final_metrics_path: str) -> None:
    """The closing lines: steps and wall time, final and best eval, and where the outputs are."""
    steps = int(final.get('step', self.total_steps))
    text = f'done {steps} steps in {format_duration(self._clock() - self._start)}'
    ranked = best_key(final)
    if ranked is not None:
      key = ranked[0]
      text += f'; final {key.replace("_", " ")} {float(final[key]):.4f}'
      if self.best is not None and self._best_key == key:
        text += f', best {self.best[0]:.4f} at step {self.best[1]}'
    self._print(text)
    self._print(f'checkpoints {self.checkpoint_dir}  TensorBoard {self.workdir}  metrics {final_metrics_path}')
