"""What a compiled program's loops and matmuls cost, read from its HLO text (`hlo_text.computations`).

XLA's cost analysis counts each computation once, so a while loop's body (scanned layers, tile loops, a
microbatch scan) is counted as if it ran once. `loop_weights` says how many times each computation runs
per call of the program: the product of the trip counts of the loops around it, each read from the loop's
condition (`counter < N`) and its counter's initial constant. `flops` counts what XLA's cost analysis
counts for an instruction: 2 FLOPs per multiply-add of a dot or convolution (a convolution's padding
positions excluded), one per output element of an elementwise op, one per reduced element. With both, a
program's own costs count every iteration: its XLA total plus (weight - 1) times each instruction's FLOPs.
A leaf module: it imports nothing of the project but `hlo_text`.
"""

from __future__ import annotations

import math
import re

from llvm_jax import hlo_text as hlo

# Ops XLA's cost analysis charges one FLOP per output element (transcendentals are counted apart).
_ELEMENTWISE = frozenset(
    "add subtract multiply divide maximum minimum compare negate abs convert and or xor not clamp select power "
    "remainder sign floor ceil round-nearest-even round-nearest-afz shift-left shift-right-logical "
    "shift-right-arithmetic atan2 sqrt rsqrt cbrt".split()
)


def dims(shape: str) -> list[int]:
  """The dimensions of the first array in an HLO shape ('bf16[2,128]{1,0:T(8,128)}' -> [2, 128])."""
  found = hlo.ARRAY.search(shape)
  return [int(d) for d in found.group(2).split(",") if d] if found else []


def _window(attributes: str, rank: int) -> dict[str, list[str]]:
  found = re.search(r"window=\{([^}]*)\}", attributes)
  fields = dict(part.split("=", 1) for part in found.group(1).split()) if found else {}
  defaults = {"size": "1", "pad": "0_0", "stride": "1", "lhs_dilate": "1", "rhs_dilate": "1"}
  return {key: fields[key].split("x") if key in fields else [default] * rank for key, default in defaults.items()}


def _group_count(attributes: str, name: str) -> int:
  found = re.search(rf"{name}=(\d+)", attributes)
  return int(found.group(1)) if found else 1


def convolution_flops(instruction: hlo.Instruction, shapes: dict[str, str]) -> int:
  """2 x the multiply-adds of a convolution (TPU programs write most matmuls as convolutions): batch x
  input features per group x output features x the (output, window) position pairs that land inside the
  input, per spatial dimension (padding excluded, dilations applied), as XLA's cost analysis counts them."""
  lhs, rhs = (dims(shapes.get(name, "")) for name in instruction.operands[:2])
  labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attributes)
  if not labels or not lhs or not rhs:
    return 0
  lhs_labels, rhs_labels, out_labels = labels.groups()
  out = dims(instruction.shape)
  rank = sum(c.isdigit() for c in lhs_labels)
  window = _window(instruction.attributes, rank)
  positions = 1
  for d in range(rank):
    size, stride = int(window["size"][d]), int(window["stride"][d])
    low = int(window["pad"][d].split("_")[0])
    lhs_dilate, rhs_dilate = int(window["lhs_dilate"][d]), int(window["rhs_dilate"][d])
    in_size, out_size = lhs[lhs_labels.index(str(d))], out[out_labels.index(str(d))]
    inside = 0
    for o in range(out_size):
      for k in range(size):
        at = o * stride - low + k * rhs_dilate
        inside += at % lhs_dilate == 0 and 0 <= at // lhs_dilate < in_size
    positions *= inside
  features = lhs[lhs_labels.index("f")] // _group_count(instruction.attributes, "feature_group_count")
  batch = lhs[lhs_labels.index("b")] // _group_count(instruction.attributes, "batch_group_count")
  return 2 * batch * features * rhs[rhs_labels.index("o")] * positions


def dot_flops(instruction: hlo.Instruction, shapes: dict[str, str]) -> int:
  """2 x output elements x the contracted size."""
  lhs = dims(shapes.get(instruction.operands[0], ""))
  contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instruction.attributes)
  contracted = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting else 1
  return 2 * math.prod(dims(instruction.shape)) * contracted


def flops(body: list[hlo.Instruction]) -> tuple[int, int]:
  """(matmul FLOPs, other FLOPs) of one computation's own instructions (a fusion's are in its fused
  computation, weighted like its caller)."""
  shapes = {i.name: i.shape for i in body}
  matmul = other = 0
  for instruction in body:
    if instruction.opcode == "convolution":
      matmul += convolution_flops(instruction, shapes)
    elif instruction.opcode == "dot":
      matmul += dot_flops(instruction, shapes)
    elif instruction.opcode in _ELEMENTWISE:
      other += math.prod(dims(instruction.shape))
    elif instruction.opcode == "reduce":
      inputs = instruction.operands[: len(instruction.operands) // 2]
      reduced = sum(math.prod(dims(shapes.get(name, ""))) for name in inputs)
      other += max(reduced - math.prod(dims(instruction.shape)), 0)
  return matmul, other


def _constant(name: str, by_name: dict[str, hlo.Instruction]) -> int | None:
  """The integer a scalar constant holds, through copies and bitcasts; None when it is not one."""
  instruction = _through_copies(name, by_name)
  if instruction is None or instruction.opcode != "constant":
    return None
  value = re.match(r"\s*(-?\d+)\)", instruction.attributes)
  return int(value.group(1)) if value else None


Indexed = dict[str, hlo.Instruction]  # a computation's instructions by name


def trip_count(loop: hlo.Instruction, caller: Indexed, computations: dict[str, Indexed]) -> int | None:
  """Iterations of a while loop (in the computation `caller`): XLA's known_trip_count where printed, else
  those of a condition `counter < N` whose counter starts at a constant and steps by a constant
  (`counter + step` in the body: XLA's windowed-einsum loops step by 2); None when neither can be read."""
  known = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attributes)
  if known:
    return int(known.group(1))
  by_name = computations.get(_loop_computation(loop, "condition"), {})
  root = hlo.root(by_name.values())
  if root is None or root.opcode != "compare" or "direction=LT" not in root.attributes or len(root.operands) != 2:
    return None
  counter, limit = by_name.get(root.operands[0]), _constant(root.operands[1], by_name)
  if counter is None or counter.opcode != "get-tuple-element" or limit is None:
    return None
  index = int(re.search(r"index=(\d+)", counter.attributes).group(1))
  start = _tuple_element(loop.operands[0] if loop.operands else "", index, caller)
  step = _step(computations.get(_loop_computation(loop, "body"), {}), index)
  if start is None or not step or step < 0:
    return None
  return max(-(-(limit - start) // step), 0)


def _tuple_element(name: str, index: int, by_name: Indexed) -> int | None:
  """The constant at `index` of the tuple instruction `name` (a loop's initial state)."""
  initial = by_name.get(name)
  if initial is None or initial.opcode != "tuple" or index >= len(initial.operands):
    return None
  return _constant(initial.operands[index], by_name)


def _step(by_name: Indexed, index: int) -> int | None:
  """What a loop body adds to its state's element `index` each iteration: `gte(param, index) + constant`."""
  root = hlo.root(by_name.values())
  update = by_name.get(root.operands[index]) if root is not None and index < len(root.operands) else None
  if update is None or update.opcode != "add" or len(update.operands) != 2:
    return None
  for counter, step in (update.operands, reversed(update.operands)):
    read = _through_copies(counter, by_name)
    if read is not None and read.opcode == "get-tuple-element" and f"index={index}" in read.attributes:
      return _constant(step, by_name)
  return None


def _loop_computation(loop: hlo.Instruction, key: str) -> str | None:
  """The name of a while loop's 'condition' or 'body' computation."""
  found = re.search(rf"\b{key}=%?([\w.\-]+)", loop.attributes)
  return found.group(1) if found else None


def _through_copies(name: str, by_name: dict[str, hlo.Instruction]) -> hlo.Instruction | None:
  """The instruction `name`, or what it copies or bitcasts."""
  instruction = by_name.get(name)
  while instruction is not None and instruction.opcode in ("copy", "bitcast") and instruction.operands:
    instruction = by_name.get(instruction.operands[0])
  return instruction


def _callees(attributes: str) -> list[str]:
  """The computations an instruction other than a while loop calls: fused computations, reducers, and a
  conditional's branches (each weighted as if it ran: an upper bound)."""
  names = re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)", attributes)
  branches = re.search(r"branch_computations=\{([^}]*)\}", attributes)
  return names + (re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else [])


def loop_weights(computations: dict[str, list[hlo.Instruction]]) -> tuple[dict[str, int], dict[str, int | None]]:
  """({computation: runs per program call}, {while loop: its trip count, None when unreadable}). A loop
  whose trip count cannot be read weighs 1 (its body counted once, as by XLA)."""
  trips: dict[str, int | None] = {}
  calls: dict[str, list[tuple[str, int]]] = {}  # computation -> (callee, runs per run of the caller)
  indexed = {name: {i.name: i for i in body} for name, body in computations.items()}
  for name, body in computations.items():
    calls[name] = []
    for instruction in body:
      if instruction.opcode == "while":
        trips[instruction.name] = n = trip_count(instruction, indexed[name], indexed)
        for key, runs in (("body", n or 1), ("condition", (n or 0) + 1)):
          callee = _loop_computation(instruction, key)
          calls[name] += [(callee, runs)] if callee else []
      else:
        calls[name] += [(c, 1) for c in _callees(instruction.attributes)]
  # Callers before callees (calls form a DAG), so each computation's weight is complete when it is passed on.
  order: list[str] = []
  seen: set[str] = set()

  def visit(name: str) -> None:
    seen.add(name)
    for callee, _ in calls.get(name, ()):
      if callee in computations and callee not in seen:
        visit(callee)
    order.append(name)

  called = {callee for sites in calls.values() for callee, _ in sites}
  for name in computations:
    if name not in seen:
      visit(name)
  weights = {name: 0 if name in called else 1 for name in computations}
  for name in reversed(order):
    for callee, runs in calls[name]:
      if callee in weights:
        weights[callee] += weights[name] * runs
  return weights, trips


def repeated_flops(computations: dict[str, list[hlo.Instruction]], weights: dict[str, int]) -> float:
  """The FLOPs XLA's cost analysis misses: each computation's, once per run after its first."""
  return float(sum(sum(flops(computations[name])) * (runs - 1) for name, runs in weights.items() if runs > 1))
