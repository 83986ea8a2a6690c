"""TroL: traversal of layers with TroL-Mixers, an option of the shared decoder (`DecoderConfig.trol`).

A traversed layer L runs twice with the same weights, positions and mask, and a token-wise gate
computed from the first pass mixes the two passes:

    h1 = L(x),  h2 = L(h1),  w = 0.5·tanh(aᵀh1 + b) + 0.5 = sigmoid(2(aᵀh1 + b)),
    out = (1 − w)·h1 + w·h2

as in `Phi3Model.forward` of the official code (ByungKwanLee/TroL, trol/arch_phi3/modeling_phi3.py).
The gates live in the decoder as one `trol_gate` parameter pair (kernel (G, D), bias (G,)), G = 1
for `shared_gate` (the released weights) or one row per traversed layer, so scanned and unscanned
stacks hold the same gate parameters and exactly G·(D + 1) are added.

With a KV cache, `decode_traversal` picks how decoding treats a traversed layer:
- 'official': the prompt (prefill: a call with a cache and decode=False) is traversed, pass 1 writes
  the cache and pass 2 attends to the prompt chunk only, caching nothing; each decoded token
  (decode=True) takes one plain pass over the pass-1 K/V (the released behaviour).
- 'full': the layer cache holds a second cache under the key 'trol' for pass 2, so prefill and
  decode steps compute exactly the training-time function.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax.models import hooks, layers
from llvm_jax.models.config import DecoderConfig, resolve_dtype

Array = jax.Array
Cache = dict[str, Any]

# Key of the pass-2 cache inside a layer cache ('full' decoding).
PASS2_CACHE_KEY = "trol"


def traversed_layers(config: DecoderConfig) -> tuple[int, ...]:
  """Indices of the layers that traverse (empty when TroL is off)."""
  if config.trol is None:
    return ()
  return tuple(range(config.num_layers)) if config.trol.layers is None else tuple(sorted(config.trol.layers))


def num_gates(config: DecoderConfig) -> int:
  """Rows of the gate parameters: 1 if shared, else one per traversed layer."""
  return 1 if config.trol.shared_gate else len(traversed_layers(config))


def _gate_initializers(gate_init: str, dim: int) -> tuple[layers.Initializer, layers.Initializer]:
  if gate_init == "zeros":
    return nn.initializers.zeros, nn.initializers.zeros
  if gate_init == "normal":
    return nn.initializers.normal(stddev=0.02), nn.initializers.zeros
  # PyTorch nn.Linear(D, 1) default: weight and bias ~ U(-1/sqrt(D), 1/sqrt(D)).
  bound = dim**-0.5
  uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
  return uniform, uniform


class TrolGates(nn.Module):
  """The TroL-Mixer gates: kernel (G, D) and bias (G,), G rows as `num_gates`.

  Returns the gate of every layer, stacked on a leading layer axis (so a scanned stack can slice
  it): {'kernel': (L, D), 'bias': (L,)}. Layers that do not traverse get row 0 (unused).
  """

  config: DecoderConfig

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    cfg = self.config
    pdtype = resolve_dtype(cfg.param_dtype)
    kernel_init, bias_init = _gate_initializers(cfg.trol.gate_init, cfg.embed_dim)
    gates = num_gates(cfg)
    kernel = self.param(
        "kernel", layers.logical_init(kernel_init, ("trol_gates", "embed")), (gates, cfg.embed_dim), pdtype
    )
    bias = self.param("bias", layers.logical_init(bias_init, ("trol_gates",)), (gates,), pdtype)
    row = np.zeros(cfg.num_layers, np.int32)
    if not cfg.trol.shared_gate:
      traversed = traversed_layers(cfg)
      row[list(traversed)] = np.arange(len(traversed))
    return {"kernel": kernel[row], "bias": bias[row]}


def gate_weight(h1: Array, kernel: Array, bias: Array) -> Array:
  """w = 0.5·tanh(aᵀh1 + b) + 0.5, (B, T, 1) in float32, from the first pass h1 (B, T, D)."""
  z = jnp.einsum("btd,d->bt", h1, kernel.astype(h1.dtype), preferred_element_type=jnp.float32)
  return (0.5 * jnp.tanh(z + bias.astype(jnp.float32)) + 0.5)[..., None]


def mix(h1: Array, h2: Array, kernel: Array, bias: Array) -> Array:
  """The TroL-Mixer: (1 − w)·h1 + w·h2 with the token-wise gate of `gate_weight` (in h1's dtype)."""
  w = gate_weight(h1, kernel, bias)
  out = (1.0 - w) * h1.astype(jnp.float32) + w * h2.astype(jnp.float32)
  return out.astype(h1.dtype)


def _split_cache(layer_cache: Cache | None) -> tuple[Cache | None, Cache | None]:
  if layer_cache is None:
    return None, None
  pass1 = {k: v for k, v in layer_cache.items() if k != PASS2_CACHE_KEY}
  return pass1, layer_cache.get(PASS2_CACHE_KEY)


def _join_cache(pass1: Cache | None, pass2: Cache | None) -> Cache | None:
  if pass1 is None or pass2 is None:
    return pass1
  return {**pass1, PASS2_CACHE_KEY: pass2}


def traverse(layer: hooks.LayerFn, gate: dict[str, Array], config: DecoderConfig) -> hooks.LayerFn:
  """The layer under TroL: h1 = L(x), h2 = L(h1), mixed by the gate ({'kernel': (D,), 'bias': ()})."""
  official = config.trol.decode_traversal == "official"

  def traversed(x: Array, ctx: hooks.LayerContext, layer_cache: Cache | None) -> tuple[Array, Cache | None]:
    if ctx.decode and official:
      return layer(x, ctx, layer_cache)
    pass1_cache, pass2_cache = _split_cache(layer_cache)
    if layer_cache is not None and not official and pass2_cache is None:
      raise ValueError("decode_traversal='full' needs the pass-2 cache: build the cache with init_cache(config, ...)")
    pass2_ctx = ctx
    if layer_cache is not None and official:
      # 'official' prefill: pass 2 attends only to this chunk's own pass-2 K/V and caches nothing.
      pass2_ctx = ctx.replace(mask=ctx.mask.keys_slice(ctx.write_index, x.shape[1]))
    h1, new_pass1 = layer(x, ctx, pass1_cache)
    h2, new_pass2 = layer(h1, pass2_ctx, pass2_cache)
    return mix(h1, h2, gate["kernel"], gate["bias"]), _join_cache(new_pass1, new_pass2)

  return traversed


class Traversal(hooks.Technique):
  """TroL's hook: a traversed layer runs twice; 'full' decoding gives it a second cache."""

  name = "trol"
  param_name = "trol_gate"

  def enabled(self, config: DecoderConfig) -> bool:
    return config.trol is not None

  def param_module(self, config: DecoderConfig) -> nn.Module:
    return TrolGates(config)

  def signature(self, config: DecoderConfig, layer: int, scanned: bool) -> bool:
    return layer in traversed_layers(config)

  def layer_inputs(self, config: DecoderConfig, params: Any, num_vision: int, residual_layers: tuple[int, ...]) -> Any:
    return params

  def wrap(self, fn: hooks.LayerFn, config: DecoderConfig, signature: bool, inputs: Any) -> hooks.LayerFn:
    return traverse(fn, inputs, config) if signature else fn

  def cache_entries(
      self, config: DecoderConfig, signature: bool, layer_cache: Cache, batch: int, max_len: int, dtype: Any
  ) -> Cache:
    if not signature or config.trol.decode_traversal != "full":
      return layer_cache
    # The second pass caches its own K/V (and whatever inner techniques keep), shaped like the first's.
    return {**layer_cache, PASS2_CACHE_KEY: jax.tree.map(jnp.zeros_like, layer_cache)}


TRAVERSAL = Traversal()
