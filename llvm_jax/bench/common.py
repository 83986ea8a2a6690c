"""Measurement helpers shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def xla_flops(compiled: Any) -> float:
  """FLOPs of a compiled program from XLA's cost analysis."""
  analysis = compiled.cost_analysis()
  # Older jax returns one dict per device.
  return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])


def time_interleaved(
    thunks: dict[str, Callable[[], Any]], steps: int, untimed_before_each: int = 0
) -> dict[str, float]:
  """Median ms per call; variants alternate within each round so load drift hits them alike.

  `untimed_before_each`: calls of the same variant run untimed just before each timed one, so that no
  timed call directly follows another variant's. Needed against PyTorch: its OpenMP threads spin for
  ~10 ms of CPU after its ops (XLA's for ~0.3 ms), which slowed an llvm_jax step timed right after a
  PyTorch step by ~4.5% on 2 cores.
  """
  for run in thunks.values():
    run()
  times = {name: [] for name in thunks}
  for _ in range(steps):
    for name, run in thunks.items():
      for _ in range(untimed_before_each):
        run()
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  return {name: 1e3 * float(np.median(t)) for name, t in times.items()}
