"""Replays every failure case of issue 15 end to end through the real command line and prints pass/fail per case.

  python experiments/reliability/replay.py [--out /tmp/vit_jax_replay] [--only SUBSTRING]

Each case runs `python -m vit_jax.main` (or `python -m vit_jax.convert`) on the offline digits data with a tiny
model and a few steps, the way a careless or hostile user would, and checks the outcome the issue asks for: a clear
refusal naming the key or file, a clean exit with a checkpoint, or a run that recovers and exits 0. Prints one line
per case, then a summary; exit status 1 if any case fails.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[2]
flags.DEFINE_string('out', '/tmp/vit_jax_replay', 'directory for the workdirs and logs (emptied first)')
flags.DEFINE_string('only', '', 'run only the cases whose name contains this')

TINY = ('--config.model.hidden_size=32', '--config.model.mlp_dim=64', '--config.model.num_layers=1',
        '--config.batch_size=32', '--config.optimizer.warmup_steps=0', '--config.eval_every=0',
        '--config.log_every=1')


class Replay:
  """Runs the CLI in per-case workdirs under `out`."""

  def __init__(self, out: pathlib.Path):
    self.out = out
    self.env = {**os.environ, 'XLA_FLAGS': '', 'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '2',
                'PYTHONPATH': f'{ROOT}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}
    self.data_dir = out / 'tfds'
    subprocess.run([sys.executable, '-c', 'import tensorflow_datasets as tfds, vit_jax.datasets; '
                    f'tfds.builder("digits", data_dir="{self.data_dir}").download_and_prepare()'],
                   env=self.env, cwd=ROOT, check=True, capture_output=True)

  def cmd(self, workdir: pathlib.Path, *extra: str, steps: int = 4) -> list[str]:
    overridden = {flag.split('=')[0] for flag in extra}  # A case's own value replaces TINY's (a first override
    tiny = [flag for flag in TINY if flag.split('=')[0] not in overridden]  # would fix the field's type).
    return [sys.executable, '-m', 'vit_jax.main', f'--config={ROOT}/configs/default.py', f'--workdir={workdir}',
            f'--config.dataset.data_dir={self.data_dir}', f'--config.total_steps={steps}',
            '--config.checkpoint_every=2', *tiny, *extra]

  def run(self, workdir: pathlib.Path, *extra: str, steps: int = 4) -> subprocess.CompletedProcess:
    return subprocess.run(self.cmd(workdir, *extra, steps=steps), env=self.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)

  def start(self, workdir: pathlib.Path, *extra: str, steps: int = 4) -> subprocess.Popen:
    return subprocess.Popen(self.cmd(workdir, *extra, steps=steps), env=self.env, cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _steps(workdir: pathlib.Path) -> list[int]:
  root = workdir / 'checkpoints'
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _finite(path: pathlib.Path) -> bool:
  import math  # pylint: disable=g-import-not-at-top
  # The learning rate itself is exempt: lr=1e39 is inf in float32 and is reported as such.
  return all(math.isfinite(v) for k, v in json.loads(path.read_text()).items()
             if isinstance(v, (int, float)) and k != 'train_learning_rate')


def _wait_for(proc: subprocess.Popen, pattern: str, timeout: float = 600) -> str:
  """Reads `proc`'s stderr until a line contains `pattern`; returns what was read."""
  seen, deadline = [], time.time() + timeout
  for line in proc.stderr:
    seen.append(line)
    if pattern in line or time.time() > deadline:
      break
  return ''.join(seen)


def _check(ok: bool, detail: str) -> tuple[bool, str]:
  return ok, detail


# Each case: (name, function(replay, workdir) -> (ok, detail)). The range refusals run last: they are the cheapest to
# check in-process (tests/test_config.py) and the slowest part here (one CLI start-up each).


def _refused(*flags_: str, expect: str) -> Callable[[Replay, pathlib.Path], tuple[bool, str]]:
  def case(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
    p = r.run(w, *flags_)
    tail = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''
    return _check(p.returncode != 0 and expect in p.stderr and not (w / 'config.json').exists(),
                  f'rc={p.returncode}: {tail[-160:]}')
  return case


def case_failed_start_then_fixed(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  bad = r.run(w, '--config.dataset.train_crop=inceptoin')
  bad_init = r.run(w, '--config.init_from=/no/such/weights.npz')
  good = r.run(w)
  return _check(bad.returncode != 0 and bad_init.returncode != 0 and good.returncode == 0,
                f'bad crop rc={bad.returncode}, bad init_from rc={bad_init.returncode}, fixed rerun rc='
                f'{good.returncode} {good.stderr.strip().splitlines()[-1][-120:] if good.returncode else ""}')


def case_two_runs_one_workdir(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  first = r.start(w, '--config.checkpoint_every=1000', steps=100000)
  try:
    _wait_for(first, 'train_loss')
    second = r.run(w, '--config.checkpoint_every=1000', steps=100000)
  finally:
    first.send_signal(signal.SIGTERM)
    rest = first.communicate(timeout=300)[1]
  return _check(second.returncode != 0 and f'in use by process {first.pid}' in second.stderr
                and first.returncode == 0 and not (w / 'final_metrics.json.tmp').exists(),
                f'second rc={second.returncode}, first rc={first.returncode} '
                f'{"(preempted cleanly)" if "Preempted (SIGTERM)" in rest else ""}')


def case_finished_run_corrupt_newest(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  first = r.run(w)
  victim = max((p for p in (w / 'checkpoints' / '4' / 'default').rglob('*') if p.is_file()),
               key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
  (w / 'final_metrics.json.tmp').write_text('{"partial')
  again = r.run(w)
  final = json.loads((w / 'final_metrics.json').read_text()) if (w / 'final_metrics.json').exists() else {}
  return _check(first.returncode == 0 and again.returncode == 0 and final.get('resumed_from_step') == 2
                and final.get('step') == 4, f'rerun rc={again.returncode}, resumed_from_step='
                f'{final.get("resumed_from_step")}')


def _flip_last_byte(step_dir: pathlib.Path) -> None:
  victim = max((p for p in (step_dir / 'default').rglob('*') if p.is_file() and p.parent.name == 'd'),
               key=lambda p: p.stat().st_size)
  data = bytearray(victim.read_bytes())
  data[-1] ^= 0xFF
  victim.write_bytes(bytes(data))


def case_unmanifested_flipped_step(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  """As after a kill -9 between a save and its manifest (old behaviour), plus a flipped byte in that step."""
  first = r.start(w, '--config.checkpoint_every=2', steps=100000)
  _wait_for(first, 'train_loss')
  while len(_steps(w)) < 2:
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.wait()
  newest = _steps(w)[-1]
  (w / 'checkpoints' / 'manifests' / f'{newest}.json').unlink(missing_ok=True)
  _flip_last_byte(w / 'checkpoints' / str(newest))
  rerun = r.start(w, '--config.checkpoint_every=2', steps=100000)
  log = _wait_for(rerun, 'Resumed from step')
  rerun.send_signal(signal.SIGKILL)
  rerun.wait()
  resumed = int(log.rsplit('Resumed from step ', 1)[1].split()[0]) if 'Resumed from step' in log else None
  return _check(resumed is not None and resumed < newest and 'no manifest' in log,
                f'newest step {newest} (no manifest, byte flipped); resumed from {resumed}')


def case_deleted_manifests(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  r.run(w, steps=4)
  (w / 'final_metrics.json').unlink()
  shutil.rmtree(w / 'checkpoints' / 'manifests')
  again = r.run(w, steps=4)
  return _check(again.returncode == 0 and 'has no manifest' in again.stderr and 'rebuilt' in again.stderr,
                f'rc={again.returncode}, warned={"has no manifest" in again.stderr}')


def case_huge_lr_stop(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  p = r.run(w, '--config.optimizer.lr=1e39', '--config.checkpoint_every=1')
  return _check(p.returncode != 0 and 'at step 1 ' in p.stderr and not _steps(w), f'rc={p.returncode}, '
                f'checkpoints={_steps(w)}')


def case_huge_lr_skip(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  p = r.run(w, '--config.optimizer.lr=1e39', '--config.on_nonfinite=skip')
  final = w / 'final_metrics.json'
  return _check(p.returncode == 0 and final.exists() and _finite(final),
                f'rc={p.returncode}, final finite={final.exists() and _finite(final)}')


def case_ctrl_c(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  proc = r.start(w, '--config.checkpoint_every=100000', steps=100000)
  _wait_for(proc, 'train_loss')
  proc.send_signal(signal.SIGINT)
  rest = proc.communicate(timeout=300)[1]
  return _check(proc.returncode == 0 and len(_steps(w)) == 1 and 'Preempted (SIGINT)' in rest,
                f'rc={proc.returncode}, checkpoints={_steps(w)}')


def case_double_ctrl_c(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  proc = r.start(w, '--config.checkpoint_every=100000', steps=100000)
  _wait_for(proc, 'train_loss')
  proc.send_signal(signal.SIGINT)
  # As a person would: the second Ctrl-C after the first one's message. Two signals sent back to back can reach the
  # process as one (a pending signal is not queued twice), and then the run rightly checkpoints and exits 0.
  _wait_for(proc, 'press Ctrl-C again', timeout=120)
  proc.send_signal(signal.SIGINT)
  start = time.time()
  proc.communicate(timeout=300)
  return _check(proc.returncode != 0 and time.time() - start < 30,
                f'rc={proc.returncode} after {time.time() - start:.1f}s')


def case_sigterm_before_loop(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  proc = r.start(w)
  log = _wait_for(proc, 'JAX process')  # main() is running: the run is being set up.
  proc.send_signal(signal.SIGTERM)
  rest = proc.communicate(timeout=300)[1]
  return _check(proc.returncode == 0 and not _steps(w), f'rc={proc.returncode}: '
                f'{(log + rest).strip().splitlines()[-1][-120:]}')


def case_garbage_config_json(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  w.mkdir(parents=True)
  (w / 'config.json').write_text('{"seed": 0,')
  p = r.run(w)
  return _check(p.returncode != 0 and f'{w / "config.json"} is not valid JSON' in p.stderr, f'rc={p.returncode}')


def case_bad_safetensors(r: Replay, w: pathlib.Path) -> tuple[bool, str]:
  w.mkdir(parents=True)
  src = w / 'weights.safetensors'
  src.write_bytes(b'garbage' * 3)
  p = subprocess.run([sys.executable, '-m', 'vit_jax.convert', '--model=vit_ti16', f'--src={src}',
                      f'--out={w / "out"}'], env=r.env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  return _check(p.returncode != 0 and str(src) in p.stderr, f'rc={p.returncode}')


CASES: list[tuple[str, Callable[[Replay, pathlib.Path], tuple[bool, str]]]] = [
    ('6 lr=1e39 stop: caught at step 1, nothing saved', case_huge_lr_stop),
    ('smaller: garbage config.json names the file', case_garbage_config_json),
    ('1 hidden_size=abc names the key', _refused('--config.model.hidden_size=abc',
                                                 expect="config.model.hidden_size='abc'")),
    ('7 SIGTERM before the loop exits cleanly', case_sigterm_before_loop),
    ('7 Ctrl-C checkpoints and exits 0', case_ctrl_c),
    ('4 finished run, corrupt newest step: falls back, exit 0', case_finished_run_corrupt_newest),
    ('2 failed start does not lock the workdir', case_failed_start_then_fixed),
    ('3 second run in a workdir is refused', case_two_runs_one_workdir),
    ('6 lr=1e39 skip: finite params and final metrics', case_huge_lr_skip),
    ('7 second Ctrl-C exits at once', case_double_ctrl_c),
    ('5 newest step without manifest, byte flipped: not trusted', case_unmanifested_flipped_step),
    ('5 deleted manifests: rebuilt with a warning', case_deleted_manifests),
    ('smaller: bad safetensors names the file', case_bad_safetensors),
    ('1 lr=-1 refused', _refused('--config.optimizer.lr=-1', expect='config.optimizer.lr=-1')),
    ('1 lr=0 refused', _refused('--config.optimizer.lr=0', expect='config.optimizer.lr=0')),
    ('1 weight_decay<0 refused', _refused('--config.optimizer.weight_decay=-0.1', expect='weight_decay=-0.1')),
    ('1 grad_clip_norm<0 refused', _refused('--config.optimizer.grad_clip_norm=-1', expect='grad_clip_norm=-1')),
    ('1 end_lr_factor<0 refused', _refused('--config.optimizer.end_lr_factor=-1', expect='end_lr_factor=-1')),
    ('1 b1=1.5 refused', _refused('--config.optimizer.b1=1.5', expect='config.optimizer.b1=1.5')),
    ('1 b2=2 refused', _refused('--config.optimizer.b2=2', expect='config.optimizer.b2=2')),
    ('1 eval_crop_fraction=0 refused', _refused('--config.dataset.eval_crop_fraction=0',
                                                expect='eval_crop_fraction=0')),
    ('1 shuffle_buffer=0 refused', _refused('--config.dataset.shuffle_buffer=0', expect='shuffle_buffer=0')),
]


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  out = pathlib.Path(flags.FLAGS.out)
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  replay = Replay(out)
  results = []
  for i, (name, case) in enumerate(CASES):
    if flags.FLAGS.only and flags.FLAGS.only not in name:
      continue
    start = time.time()
    try:
      ok, detail = case(replay, out / f'case{i:02d}')
    except Exception as e:  # pylint: disable=broad-except  (a case that crashes is a failed case)
      ok, detail = False, f'{type(e).__name__}: {e}'
    results.append(ok)
    print(f'{"PASS" if ok else "FAIL"}  {name}  ({time.time() - start:.0f}s; {detail})', flush=True)
  load = os.getloadavg()[0]
  print(f'{sum(results)}/{len(results)} cases pass (load average {load:.1f})')
  return 0 if all(results) else 1


if __name__ == '__main__':
  app.run(lambda argv: sys.exit(main(argv)))
