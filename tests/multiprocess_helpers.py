"""Launching the real multi-process (gloo) test workers: a free coordinator port, and the workers run to
completion, each log shown if one fails."""

import socket
import subprocess
import sys


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
