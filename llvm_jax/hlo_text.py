"""Compiled HLO text, parsed: each computation's instructions (name, result shape, opcode, operands,
the rest of the line). A leaf module (imports nothing of the project): `llvm_jax.aot` reads HBM traffic and
kernel calls from it, the benchmarks' op-time breakdown the instructions' module scopes."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
# An array in a shape: dtype, dimensions, layout ('bf16[2,128]{1,0:T(8,128)}').
ARRAY = re.compile(r"\b([a-z]\w*)\[([\d,]*)\](?:\{([^}]*)\})?")


@dataclasses.dataclass(frozen=True)
class Instruction:
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]
  attributes: str
  is_root: bool


def _closing_paren(text: str) -> int:
  """Index of the ')' closing an already opened '(' (the end of an instruction's operand list)."""
  depth = 1
  for index, char in enumerate(text):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if depth == 0:
      return index
  return len(text)


def computations(hlo_text: str) -> dict[str, list[Instruction]]:
  """The module's computations by name, each its instructions in order."""
  parsed: dict[str, list[Instruction]] = {}
  current = None
  # An instruction printed over several lines (a Pallas kernel's metadata, thousands of lines): the rest
  # of its attributes, joined once (appending line by line copied the growing string: quadratic).
  continued: list[str] = []

  def attach_continued() -> None:
    if continued:
      last = parsed[current][-1]
      parsed[current][-1] = dataclasses.replace(last, attributes="\n".join([last.attributes, *continued]))
      continued.clear()

  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      attach_continued()
      current = line.split("(")[0].split()[-1].lstrip("%")
      parsed[current] = []
      continue
    m = _INSTRUCTION.match(line) if current is not None else None
    if m:
      attach_continued()
      root, name, shape, opcode, rest = m.groups()
      operands = tuple(re.findall(r"%([\w.\-]+)", rest[: _closing_paren(rest)]))
      parsed[current].append(Instruction(name, shape, opcode, operands, rest, bool(root)))
    elif current is not None and parsed[current] and line.strip() not in ("", "}"):
      continued.append(line)
  attach_continued()
  return parsed


def root(instructions: Iterable[Instruction]) -> Instruction | None:
  """A computation's ROOT instruction (None if it has none)."""
  return next((i for i in instructions if i.is_root), None)
