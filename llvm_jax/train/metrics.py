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


class MetricsWriter:
  def __init__(self, workdir: str, total_steps: int):
    self.enabled = jax.process_index() == 0
    self.total_steps = total_steps
    self._start = time.time()
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
    """One console line per call: a bar, the step, and the headline metrics."""
    if not self.enabled:
      return
    frac = step / max(self.total_steps, 1)
    bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
    elapsed = time.time() - self._start
    eta = elapsed / frac - elapsed if frac > 0 else float("nan")
    shown = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
    print(f"[{bar}] {step}/{self.total_steps} {shown} eta={eta:.0f}s", file=sys.stdout, flush=True)

  def close(self) -> None:
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def _scalar(value: Any) -> Any:
  try:
    return float(value)
  except (TypeError, ValueError):
    return value


def _fmt(value: Any) -> str:
  value = _scalar(value)
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)
