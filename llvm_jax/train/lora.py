"""LoRA on chosen linear layers, as a reparametrisation of the parameter tree (no model changes).

`params['lora'][key] = {'a': (in, r), 'b': (r, out)}` for every kernel whose path matches
`config.lora.targets`; the model sees `kernel + (alpha / r) * a @ b` (reshaped to the kernel).
`b` starts at zero, so training starts from the base model. `merge` folds the adapters into the
kernels for evaluation or export (`to_hf`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from llvm_jax.tree_utils import flatten, unflatten

LORA_KEY = "lora"


def _in_ndim(path: str) -> int:
  # Attention output kernels contract (heads, head_dim); every other kernel contracts one axis.
  return 2 if path.endswith("attn/o/kernel") else 1


def target_paths(params: Any, targets: str) -> list[str]:
  pattern = re.compile(targets)
  paths = [p for p in flatten(params) if p.endswith("/kernel") and pattern.fullmatch(p)]
  if not paths:
    raise ValueError(f"lora.targets={targets!r} matches no kernel")
  return paths


def init(params: Any, lora: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
  """Adapters for the target kernels: a ~ N(0, 1/in), b = 0."""
  flat = flatten(params)
  adapters = {}
  for i, path in enumerate(target_paths(params, lora.targets)):
    kernel = flat[path]
    n_in = _in_ndim(path)
    fan_in = math.prod(kernel.shape[:n_in])
    fan_out = math.prod(kernel.shape[n_in:])
    a = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, lora.rank), kernel.dtype) / math.sqrt(fan_in)
    adapters[path.replace("/", ".")] = {"a": a, "b": jnp.zeros((lora.rank, fan_out), kernel.dtype)}
  return adapters


def merge(params: Any, scale: float) -> Any:
  """The base params with every adapter folded in (`params` without adapters is returned as is)."""
  if LORA_KEY not in params:
    return params
  base = {k: v for k, v in params.items() if k != LORA_KEY}
  flat = flatten(base)
  for key, ab in params[LORA_KEY].items():
    path = key.replace(".", "/")
    kernel = flat[path]
    delta = (ab["a"] @ ab["b"]).reshape(kernel.shape)
    flat[path] = kernel + (scale * delta).astype(kernel.dtype)
  return unflatten(flat)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.rank = 0  # 0 = off
  c.alpha = 16.0
  # Full match on '/'-joined kernel paths; default: the LLM's attention and MLP projections.
  c.targets = r"decoder/layers_\d+/(attn/(q|k|v|o)|mlp/(gate|up|down))/kernel"
  return c


def scale(lora: ml_collections.ConfigDict) -> float:
  return lora.alpha / lora.rank
