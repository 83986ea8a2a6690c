"""Declarative weight mapping between our parameter trees and `transformers` state dicts.

A mapping table is a list of `Rule`s: one HF key <-> one or more of our parameter paths, with a
hook that converts the tensor each way. `per_layer` expands `{i}` (layer index) in both. Applying a
table checks everything at once and raises a single `WeightMismatchError` listing every missing,
unexpected and mis-shaped weight by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from llvm_jax import tree_utils

Params = dict[str, Any]


class WeightMismatchError(ValueError):
  """The weights do not fit the model; the message lists every offending name."""

  def __init__(self, missing=(), unexpected=(), misshaped=(), context: str = ""):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    lines = [f"weights do not match the model{(' (' + context + ')') if context else ''}:"]
    if self.missing:
      lines.append(f"  missing ({len(self.missing)}): " + ", ".join(self.missing))
    if self.unexpected:
      lines.append(f"  unexpected ({len(self.unexpected)}): " + ", ".join(self.unexpected))
    if self.misshaped:
      lines.append(f"  mis-shaped ({len(self.misshaped)}): " + ", ".join(self.misshaped))
    super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# Hooks: HF tensor <-> tuple of our tensors.


@dataclasses.dataclass(frozen=True)
class Hook:
  to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
  to_hf: Callable[[Sequence[np.ndarray]], np.ndarray]


IDENTITY = Hook(lambda w: (w,), lambda ws: ws[0])


def reshape(shape: tuple[int, ...], hf_shape: tuple[int, ...]) -> Hook:
  """A pure reshape (biases of head-split projections)."""
  return Hook(lambda w: (w.reshape(shape),), lambda ws: ws[0].reshape(hf_shape))


def linear(out_shape: tuple[int, ...] = (), in_shape: tuple[int, ...] = ()) -> Hook:
  """torch Linear weight (out, in) <-> our kernel in_shape + out_shape (defaults: 1-D each)."""

  def to_ours(w):
    out_dim, in_dim = w.shape
    return (w.T.reshape((in_shape or (in_dim,)) + (out_shape or (out_dim,))),)

  def to_hf(ws):
    k = ws[0]
    n_in = len(in_shape) or 1
    in_dim = int(np.prod(k.shape[:n_in]))
    return k.reshape(in_dim, -1).T

  return Hook(to_ours, to_hf)


def split_linear(parts: Sequence[tuple[int, tuple[int, ...]]]) -> Hook:
  """A fused torch Linear (sum of out rows, in) <-> several kernels; parts: (rows, our out_shape).

  An empty out_shape means a plain (in, rows) kernel.
  """
  bounds = np.cumsum([rows for rows, _ in parts])[:-1]

  def to_ours(w):
    chunks = np.split(w, bounds, axis=0)
    return tuple(c.T.reshape((c.shape[1],) + (shape or (rows,))) for c, (rows, shape) in zip(chunks, parts))

  def to_hf(ws):
    return np.concatenate([k.reshape(k.shape[0], -1).T for k in ws], axis=0)

  return Hook(to_ours, to_hf)


def conv_patch() -> Hook:
  """torch Conv2d patch weight (out, C, p, p) <-> our kernel (p, p, C, out)."""
  return Hook(lambda w: (w.transpose(2, 3, 1, 0),), lambda ws: ws[0].transpose(3, 2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Rules and tables.


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF key <-> our parameter path(s) ('/'-separated), converted by `hook`."""

  hf: str
  ours: tuple[str, ...]
  hook: Hook = IDENTITY


def rule(hf: str, ours: str | Sequence[str], hook: Hook = IDENTITY) -> Rule:
  return Rule(hf, (ours,) if isinstance(ours, str) else tuple(ours), hook)


def per_layer(num_layers: int, rules: Sequence[Rule]) -> list[Rule]:
  """Expands `{i}` in the rules' keys and paths over layers 0..num_layers-1."""
  return [
      Rule(r.hf.format(i=i), tuple(o.format(i=i) for o in r.ours), r.hook) for i in range(num_layers) for r in rules
  ]


@dataclasses.dataclass(frozen=True)
class Table:
  """A complete mapping: rules plus regexes (matched from the key's start) of HF keys not used."""

  rules: tuple[Rule, ...]
  ignore: tuple[str, ...] = ()

  def __add__(self, other: Table) -> Table:
    return Table(self.rules + other.rules, self.ignore + other.ignore)

  def with_prefixes(self, hf_prefix: str, ours_prefix: str) -> Table:
    """The same table under an HF key prefix and one of our subtree names."""
    return Table(
        tuple(Rule(hf_prefix + r.hf, tuple(f"{ours_prefix}/{o}" for o in r.ours), r.hook) for r in self.rules),
        tuple(re.escape(hf_prefix) + p for p in self.ignore),
    )


def hf_to_ours(
    state: Mapping[str, np.ndarray], table: Table, expected: Mapping[str, tuple[int, ...]], context: str = ""
) -> Params:
  """Converts an HF state dict with `table`; `expected` maps our flat paths to shapes.

  Every problem is collected and reported in one WeightMismatchError.
  """
  flat: dict[str, np.ndarray] = {}
  used: set[str] = set()
  missing, misshaped = [], []
  for r in table.rules:
    hf_key, ours, hook = r.hf, r.ours, r.hook
    if hf_key not in state:
      missing.append(f"{hf_key} (-> {', '.join(ours)})")
      continue
    used.add(hf_key)
    try:
      arrays = hook.to_ours(np.asarray(state[hf_key]))
    except ValueError as e:
      misshaped.append(f"{hf_key} {tuple(np.shape(state[hf_key]))}: {e}")
      continue
    for path, arr in zip(ours, arrays):
      flat[path] = arr
  ignore = [re.compile(p) for p in table.ignore]
  unexpected = [k for k in state if k not in used and not any(p.match(k) for p in ignore)]
  for path, shape in expected.items():
    if path not in flat:
      if not any(path in m for m in missing):
        missing.append(f"{path} (no HF weight maps to it)")
    elif tuple(flat[path].shape) != tuple(shape):
      misshaped.append(f"{path}: got {tuple(flat[path].shape)}, model expects {tuple(shape)}")
  for path in flat:
    if path not in expected:
      unexpected.append(f"{path} (produced by the table but not in the model)")
  if missing or unexpected or misshaped:
    raise WeightMismatchError(missing, unexpected, misshaped, context)
  return tree_utils.unflatten(flat)


def ours_to_hf(params: Params, table: Table) -> dict[str, np.ndarray]:
  """Inverse of `hf_to_ours`; every parameter must be consumed by the table."""
  flat = {k: np.asarray(v) for k, v in tree_utils.flatten(params).items()}
  out, used, missing = {}, set(), []
  for r in table.rules:
    hf_key, ours, hook = r.hf, r.ours, r.hook
    if not all(o in flat for o in ours):
      missing.extend(o for o in ours if o not in flat)
      continue
    out[hf_key] = np.ascontiguousarray(hook.to_hf([flat[o] for o in ours]))
    used.update(ours)
  unexpected = [k for k in flat if k not in used]
  if missing or unexpected:
    raise WeightMismatchError(missing, [f"{u} (no HF key in the table)" for u in unexpected], context="export")
  return out


# ---------------------------------------------------------------------------------------------
# Reading and writing safetensors directories (no torch needed).


def read_safetensors_dir(path: str) -> dict[str, np.ndarray]:
  """All tensors of a `save_pretrained` directory, following a sharded index if there is one."""
  from safetensors.numpy import load_file

  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  elif os.path.exists(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")
  state: dict[str, np.ndarray] = {}
  for name in files:
    file = os.path.join(path, name)
    if not os.path.exists(file):
      raise FileNotFoundError(f"{file} is listed in the index but missing")
    state.update(_load_safetensors(file, load_file))
  return state


def _load_safetensors(file: str, load_file) -> dict[str, np.ndarray]:
  try:
    return load_file(file)
  except (TypeError, ValueError):
    # bfloat16 has no numpy dtype in safetensors.numpy: read it through ml_dtypes.
    import ml_dtypes
    from safetensors import safe_open

    out = {}
    with safe_open(file, "flax") as f:
      for k in f.keys():
        out[k] = np.asarray(f.get_tensor(k)).astype(ml_dtypes.bfloat16)
    return out


def write_safetensors_dir(state: Mapping[str, np.ndarray], path: str, max_shard_bytes: int = 5 << 30) -> None:
  """Writes tensors as `model.safetensors`, or shards plus an index when larger than the limit."""
  from safetensors.numpy import save_file

  os.makedirs(path, exist_ok=True)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for k in sorted(state):
    nbytes = state[k].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][k] = state[k]
    size += nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return
  weight_map = {}
  for n, shard in enumerate(shards, 1):
    name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
    weight_map.update({k: name for k in shard})
  total = sum(v.nbytes for v in state.values())
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
