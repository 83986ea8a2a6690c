"""Where a compiled step spends its time: a profiler trace of a few calls, each traced op charged to the
model scope that produced it (`python -m llvm_jax.bench ... --breakdown`).

The trace's op events carry the compiled program's instruction names (XLA:CPU's thunks; GPU kernels
through their `hlo_op` stat). Each instruction's `op_name` metadata holds the Flax module path and the
transformation it came from: `transpose(...)` marks the backward pass. Times are summed over threads, so
on a multi-threaded backend the total can exceed the wall time; the shares are what compares.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from llvm_jax import hlo_text as hlo

# Control flow: its event spans the events of its body, which are charged themselves.
_CONTAINERS = ("while", "conditional", "call")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Path segments that name a transformation or a jitted helper, not a module.
_WRAPPER = re.compile(r"^(jit|jvp|transpose|vmap|remat|checkpoint|pjit|custom_jvp_call|custom_vjp_call)\(")
OUTSIDE_MODEL = "(outside the model: loss, optimiser, metrics)"


@dataclasses.dataclass(frozen=True)
class Scope:
  path: str
  forward_s: float
  backward_s: float

  @property
  def total_s(self) -> float:
    return self.forward_s + self.backward_s


def scope_of(op_name: str) -> tuple[str, bool]:
  """(module path, is backward) of an instruction's `op_name`: transformations and jitted helpers dropped,
  the primitive and einsum specs dropped, layer indices merged (`layers_3` -> `layers_*`)."""
  segments = op_name.split("/")[1:]  # the first names the jitted step itself
  backward = any(s.startswith("transpose(") for s in segments)
  kept = [s for s in segments[:-1] if not _WRAPPER.match(s) and "->" not in s]
  path = re.sub(r"layers_\d+", "layers_*", "/".join(kept))
  return path or OUTSIDE_MODEL, backward


def instruction_scopes(hlo_text: str) -> dict[str, tuple[str, bool]]:
  """Instruction name -> (scope, is backward), for the instructions that do work (not control flow)."""
  scopes = {}
  for body in hlo.computations(hlo_text).values():
    for instruction in body:
      if instruction.opcode in _CONTAINERS:
        continue
      op_name = _OP_NAME.search(instruction.attributes)
      scopes[instruction.name] = scope_of(op_name.group(1)) if op_name else (OUTSIDE_MODEL, False)
  return scopes


def _op_events(trace: Any, module: str) -> list[tuple[str, int]]:
  """(instruction name, duration ns) of the trace's op events. Device kernels name theirs in an `hlo_op`
  stat (GPU; counted alone where present, the host's launch events left out), XLA:CPU's thunks in the
  event name."""
  device, host = [], []
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if "hlo_op" in stats:
          if stats.get("hlo_module", module) == module:
            device.append((str(stats["hlo_op"]), event.duration_ns))
        else:
          host.append((event.name.removeprefix("end: "), event.duration_ns))
  return device or host


def step_breakdown(hlo_text: str, call: Callable[[], Any], calls: int = 5) -> list[Scope]:
  """Traces `calls` runs of `call` (one step, blocking) and charges the op events of the program
  `hlo_text` to model scopes: the scopes, longest first, with their time per call."""
  scopes = instruction_scopes(hlo_text)
  forward, backward = collections.Counter(), collections.Counter()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(calls):
        call()
    trace = jax.profiler.ProfileData.from_file(_xplane_file(trace_dir))
  module = re.match(r"HloModule ([\w.\-]+)", hlo_text)
  for name, duration_ns in _op_events(trace, module.group(1) if module else ""):
    if name in scopes:
      path, is_backward = scopes[name]
      (backward if is_backward else forward)[path] += duration_ns * 1e-9 / calls
  paths = set(forward) | set(backward)
  rows = [Scope(p, forward[p], backward[p]) for p in paths]
  return sorted(rows, key=lambda s: -s.total_s)


def _xplane_file(trace_dir: str) -> str:
  files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
  if len(files) != 1:
    raise RuntimeError(f"expected one profiler trace under {trace_dir}, found {files}")
  return files[0]


def format_breakdown(rows: list[Scope], wall_s: float, top: int = 15) -> str:
  total = sum(r.total_s for r in rows)
  lines = [
      f"Where the step's op time goes ({total * 1e3:.1f} ms of ops per step, summed over threads; "
      f"wall {wall_s * 1e3:.1f} ms):",
      f"  {'scope':62s} {'forward':>9s} {'backward':>9s} {'share':>6s}",
  ]
  for r in rows[:top]:
    lines.append(f"  {r.path[:62]:62s} {r.forward_s * 1e3:7.2f}ms {r.backward_s * 1e3:7.2f}ms {r.total_s / total:6.1%}")
  rest = rows[top:]
  if rest:
    lines.append(f"  {f'({len(rest)} more scopes)':62s} {'':9s} {'':9s} {sum(r.total_s for r in rest) / total:6.1%}")
  return "\n".join(lines)
