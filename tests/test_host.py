"""Host-process settings (llvm_jax/host.py): freed step-sized buffers are reused, not page-faulted again."""

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A fresh process (this one was tuned by conftest): page faults of three 64 MB allocations (an XLA:CPU
# step's temporaries are one buffer of about this size on configs/demo.py), before and after the setting.
_PROBE = """
import json, resource, numpy as np
from llvm_jax import host
def faults_per_allocation():
  counts = []
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    buffer = np.ones(64 << 20, np.uint8)
    del buffer
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  return counts
default = faults_per_allocation()
took = host.keep_freed_host_memory()
print(json.dumps({"default": default, "took": took, "kept": faults_per_allocation()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None, reason="glibc only")
def test_freed_step_buffers_are_reused_without_page_faults():
  out = subprocess.run(
      [sys.executable, "-c", _PROBE], cwd=_REPO, capture_output=True, text=True, check=True, timeout=120
  ).stdout
  faults = json.loads(out.strip().splitlines()[-1])
  assert faults["took"]
  # glibc's default: each 64 MB allocation is a fresh mmap, touched page by page again (at least one
  # fault per 2 MiB huge page).
  assert min(faults["default"]) >= 32, faults
  # Kept: the first allocation after the switch grows the heap; the next ones reuse it.
  assert max(faults["kept"][1:]) <= 4, faults
