"""Launching subprocesses from the tests: the command lines as a user's install runs them, and the real
multi-process (gloo) workers (a free coordinator port; the workers run to completion, each log shown if
one fails)."""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# `python -m MODULE ARGS` with torch hidden: torch is a test-only dependency (the parity reference), so a
# user's install has none; with it present, `transformers` imports it (~3.5 s of CPU) in every CLI that
# reads an HF config or processor.
_AS_INSTALLED = "import runpy, sys; sys.modules['torch'] = None; del sys.argv[0]; runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)"


def run_cli(module: str, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
  """Runs `python -m module *args` from the repository root, as installed (no torch); with `check`, asserts
  it exits 0 (its stderr's tail shown)."""
  result = subprocess.run(
      [sys.executable, "-c", _AS_INSTALLED, module, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
  )
  if check:
    assert result.returncode == 0, result.stderr[-4000:]
  return result


def worker_env(devices: int) -> dict:
  """The test env for a worker process with `devices` fake CPU devices, keeping conftest's other XLA flags
  (XLA's backend optimisation off: the workers' compiles otherwise take several times longer)."""
  flags = [
      f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")
  ]
  return dict(
      os.environ,
      PYTHONPATH=REPO + os.pathsep + os.path.join(REPO, "tests"),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS=" ".join([f"--xla_force_host_platform_device_count={devices}", *flags]),
  )


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_workers(worker: str, argvs: list[list[str]], env: dict, timeout: float) -> list[str]:
  """Runs `python worker *argv` for each argv concurrently; asserts every one exits 0; returns the logs."""
  procs = [
      subprocess.Popen(
          [sys.executable, worker, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
      for argv in argvs
  ]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return logs
