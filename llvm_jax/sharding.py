"""The one place that maps logical axis names to mesh axes ('data', 'fsdp', 'tensor').

Parameters and activations are annotated with logical names in the model code; a strategy picks a
rules table here. Unlisted names are replicated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

_ACTIVATIONS = (
    ("act_batch", ("data", "fsdp")),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

LOGICAL_RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    # Pure data parallelism: every weight replicated.
    "dp": _ACTIVATIONS,
    # ZeRO-3 style: weights sharded over 'fsdp' along their largest non-tensor axis.
    "fsdp": _ACTIVATIONS + (("embed", "fsdp"), ("vision_embed", "fsdp"), ("layers", None)),
    # FSDP plus Megatron-style tensor parallelism of heads and MLP width.
    "fsdp_tp": _ACTIVATIONS
    + (
        ("embed", "fsdp"),
        ("vision_embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("mlp", "tensor"),
        ("vision_heads", "tensor"),
        ("vision_mlp", "tensor"),
        ("layers", None),
    ),
}


def logical_rules(strategy: str) -> tuple[tuple[str, Any], ...]:
  if strategy not in LOGICAL_RULES:
    raise ValueError(f"unknown sharding strategy {strategy!r}; expected one of {sorted(LOGICAL_RULES)}")
  return LOGICAL_RULES[strategy]


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh; -1 in `shape` takes the remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape}: at most one -1")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if len(devices) % rest:
      raise ValueError(f"mesh shape {shape} does not divide {len(devices)} devices")
    shape[shape.index(-1)] = len(devices) // rest
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices, have {len(devices)}")
  array = np.asarray(devices).reshape(shape)
  return Mesh(array, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def param_shardings(abstract_params: Any, mesh: Mesh, strategy: str) -> Any:
  """NamedShardings for a (boxed, logically annotated) parameter tree, e.g. from jax.eval_shape.

  A dimension that its mesh axes do not divide (a vocabulary of 92,553 over a 4-way 'tensor' axis) is
  replicated along them instead, with one warning naming those parameters: jit cannot shard unevenly.
  """
  specs = nn.get_partition_spec(abstract_params)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, logical_rules(strategy))
  replicated: list[str] = []

  def divisible(path: Any, leaf: Any, named: NamedSharding) -> NamedSharding:
    spec = tuple(named.spec) + (None,) * (len(leaf.shape) - len(named.spec))
    kept = []
    for size, axes in zip(leaf.shape, spec):
      names = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
      parts = int(np.prod([mesh.shape[name] for name in names]))
      if size % parts:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        replicated.append(f"{name} ({size} over {'x'.join(names)} {parts})")
        axes = None
      kept.append(axes)
    return NamedSharding(mesh, PartitionSpec(*kept), memory_kind=named.memory_kind)

  shardings = jax.tree_util.tree_map_with_path(divisible, nn.unbox(abstract_params), shardings)
  if replicated:
    logging.warning(
        "sharding (%s): %d dimensions are not divisible by their mesh axes and are replicated along them: %s",
        strategy,
        len(replicated),
        ", ".join(replicated[:6]) + (f", ... ({len(replicated) - 6} more)" if len(replicated) > 6 else ""),
    )
  return shardings


def mirrored_shardings(state: Any, params: Any, shardings: Any, default: jax.sharding.Sharding) -> Any:
  """Shardings for `state` (e.g. an optax state): a leaf mirroring a parameter gets that parameter's.

  A state leaf mirrors a parameter when the tail of its tree path is the parameter's full path and
  the shapes agree: optax keeps param-shaped copies (Adam's mu/nu...) under wrapper nodes (chain,
  multi_transform, masked, inject_hyperparams), whose keys form the head of the path. Masked-out
  entries (optax.MaskedNode) and empty states have no leaves. Anything else (step counts, factored
  or reshaped statistics) gets `default`.
  """
  by_path = {
      tuple(path): (leaf.shape, s)
      for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings))
  }
  longest = max((len(p) for p in by_path), default=0)

  def pick(path, leaf):
    for start in range(max(len(path) - longest, 0), len(path)):  # longest tail first
      match = by_path.get(tuple(path[start:]))
      if match is not None and tuple(match[0]) == tuple(leaf.shape):
        return match[1]
    return default

  return jax.tree_util.tree_map_with_path(pick, state)
