"""Metrics sinks: a JSONL file and TensorBoard in the workdir, and a console progress bar.

Only process 0 writes; every process may call.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax

# True while a TTY progress bar line is open (written with '\r', not yet ended by a newline).
_bar_open = False


def console(text: str) -> None:
  """Prints a line of the run's own output (eval results, summaries), ending an open progress bar first."""
  global _bar_open
  if _bar_open:
    print(file=sys.stdout)
    _bar_open = False
  print(text, file=sys.stdout, flush=True)


class MetricsWriter:

  def __init__(self, workdir: str, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._start = time.time()
    self._last: tuple[int, float] | None = None  # (step, time) of the previous progress call
    self._tty = sys.stdout.isatty()
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter

      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": step, **{f"{prefix}/{k}": _scalar(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)

  def progress(self, step: int, metrics: dict[str, Any]) -> None:
    """The progress bar: step, the metrics (means over the steps since the last call), steps/s, ETA.

    `metrics['step_time']` (optional, not shown) gives steps/s; without it, the rate between calls.

    On a terminal one line is redrawn in place; otherwise (logs, pipes) each call prints a line.
    """
    global _bar_open
    if not self.enabled:
      return
    now = time.time()
    metrics = dict(metrics)
    step_time = metrics.pop("step_time", None)  # the trainer's, evaluations and compilation excluded
    prev_step, prev_time = self._last or (0, self._start)
    rate = 1.0 / step_time if step_time else (step - prev_step) / max(now - prev_time, 1e-9)
    self._last = (step, now)
    frac = min(step / max(self.total_steps, 1), 1.0)
    bar = "█" * int(20 * frac) + "·" * (20 - int(20 * frac))
    shown = " | ".join(f"{_LABELS.get(k, k)} {_fmt(v)}" for k, v in metrics.items())
    eta = _duration((self.total_steps - step) / rate) if rate > 0 else "?"
    line = (
        f"step {step}/{self.total_steps} {bar} {100 * frac:3.0f}% | {shown} | {rate:.3g} steps/s | "
        f"ETA {eta} | elapsed {_duration(now - self._start)}"
    )
    if self._tty:
      done = step >= self.total_steps
      print(f"\r{line}\x1b[K", end="\n" if done else "", file=sys.stdout, flush=True)
      _bar_open = not done
    else:
      print(line, file=sys.stdout, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


# Short names in the progress line ('avg': the trainer passes means over the steps since the last log).
_LABELS = {
    "loss": "avg loss",
    "token_accuracy": "avg token acc",
    "preference_accuracy": "avg pref acc",
    "tokens_per_second": "tokens/s",
}


def _duration(seconds: float) -> str:
  """'1:02:03' / '2:03'."""
  seconds = int(round(seconds))
  h, rest = divmod(seconds, 3600)
  return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def _scalar(value: Any) -> Any:
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


def _fmt(value: Any) -> str:
  value = _scalar(value)
  if isinstance(value, float):
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
  return str(value)
