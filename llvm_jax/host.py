"""Host-process settings for the CLIs, benchmarks and tests: a leaf module (imports nothing of jax).

`tune_host_process()` is called once at the start of a process. It is safe anywhere: on a machine
without glibc the allocator setting is skipped, and nothing here touches a device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# Allocations below this come from malloc's heap and are reused after free; above it, each is a fresh
# mmap. XLA:CPU allocates a step's temporaries as one buffer per run (61 MiB for the demo's train step)
# and frees it after: with glibc's default threshold (at most 32 MiB) every step mmapped it anew and
# page-faulted all of it (~15,700 minor faults; the demo's forward + backward 68.6 -> 42.6 ms with this
# setting). mallopt takes an int.
_MMAP_THRESHOLD_BYTES = 2**31 - 1


def keep_freed_host_memory() -> bool:
  """Makes glibc malloc keep freed blocks up to 2 GiB for reuse instead of unmapping them.

  The heap then holds on to its peak size (the memory of a training process's peak step) rather than
  returning it to the OS between steps. Returns whether the setting took (False off glibc).
  """
  libc_name = ctypes.util.find_library("c")
  if libc_name is None:
    return False
  try:
    mallopt = ctypes.CDLL(libc_name).mallopt
  except (OSError, AttributeError):  # no mallopt (macOS): its allocator keeps its own policy
    return False
  # mallopt returns 1 on success (musl's is a stub returning 0); the trim threshold keeps a freed
  # top-of-heap block instead of returning it with brk.
  return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES)) and bool(
      mallopt(_M_TRIM_THRESHOLD, _MMAP_THRESHOLD_BYTES)
  )


def tune_host_process() -> None:
  """The settings the CLIs, the train-step benchmarks and the tests run with (each measured below)."""
  # Tracing and compiling allocate millions of short-lived objects; Python's default collector
  # thresholds (700, 10, 10) cost ~5-8% of CPU in tracing-bound runs (4 demo steps from a cold compile
  # cache: 36.2 -> 34.1 s; test_phantom.py: 41.0 -> 37.3 s; two A/B pairs each).
  gc.set_threshold(100_000, 50, 1000)
  keep_freed_host_memory()
