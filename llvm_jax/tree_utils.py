"""Pytree helpers shared across the package: '/'-joined flat views of nested params, and byte counts.

A leaf module: it imports nothing of llvm_jax, so the model, the converter, the trainer and the
benchmarks can all use it without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import traverse_util


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x} (empty sub-dicts are dropped)."""
  return traverse_util.flatten_dict(tree, sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `flatten`: {'a/b': x} -> {'a': {'b': x}}."""
  return traverse_util.unflatten_dict(flat, sep="/")


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
  return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree)))
