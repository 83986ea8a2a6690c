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

import re
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax.models import layers
from llvm_jax.models.config import DecoderConfig, resolve_dtype

Array = jax.Array
Cache = dict[str, Any]
# One pass of a decoder layer: (hidden, mask, layer cache or None) -> (hidden, new layer cache or None).
LayerPass = Callable[[Array, Array, Cache | None], tuple[Array, Cache | None]]

# Key of the pass-2 cache inside a layer cache ('full' decoding).
PASS2_CACHE_KEY = "trol"
# Parameters of the TroL-Mixer gates (the only ones trained in TroL's first training step).
GATE_PARAM_REGEX = r"(^|.*/)trol_gate/.*"


def traversed_layers(config: DecoderConfig) -> tuple[int, ...]:
  """Indices of the layers that traverse (empty when TroL is off)."""
  if config.trol is None:
    return ()
  return tuple(range(config.num_layers)) if config.trol.layers is None else tuple(sorted(config.trol.layers))


def num_gates(config: DecoderConfig) -> int:
  """Rows of the gate parameters: 1 if shared, else one per traversed layer."""
  return 1 if config.trol.shared_gate else len(traversed_layers(config))


def caches_pass2(config: DecoderConfig, layer: int | None) -> bool:
  """Whether a layer's cache needs pass-2 entries; layer=None: a layer of a scanned stack."""
  if config.trol is None or config.trol.decode_traversal != "full":
    return False
  return layer is None or layer in traversed_layers(config)


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
  it): {'kernel': (L, D), 'bias': (L,), 'traverse': (L,) bool}. Layers that do not traverse get
  row 0 and traverse=False.
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
    traversed = traversed_layers(cfg)
    row = np.zeros(cfg.num_layers, np.int32)
    if not cfg.trol.shared_gate:
      row[list(traversed)] = np.arange(len(traversed))
    traverse = np.zeros(cfg.num_layers, bool)
    traverse[list(traversed)] = True
    return {"kernel": kernel[row], "bias": bias[row], "traverse": jnp.asarray(traverse)}


def layer_gate(gates: dict[str, Array], layer: int) -> dict[str, Array]:
  """One layer's gate out of `TrolGates()` (unscanned stacks)."""
  return {"kernel": gates["kernel"][layer], "bias": gates["bias"][layer]}


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


def apply_layer(
    bind: Callable[[nn.Module], LayerPass],
    module: nn.Module,
    x: Array,
    mask: Array,
    layer_cache: Cache | None,
    write_index: Any,
    gate: dict[str, Array],
    config: DecoderConfig,
    decode: bool,
) -> tuple[Array, Cache | None]:
  """A decoder layer under TroL; returns the (mixed) hidden state and the layer's new cache.

  bind(parent) gives a pass of the layer with its submodule bound to `parent` (`module`, or the
  scope nn.cond opens; called once per scope). gate: {'kernel': (D,), 'bias': ()} and, in a
  scanned stack that traverses only some layers, 'traverse': () bool, which selects the traversal
  with nn.cond.
  """
  run = bind(module)
  official = config.trol.decode_traversal == "official"
  if decode and official:
    return run(x, mask, layer_cache)
  pass1_cache, pass2_cache = _split_cache(layer_cache)
  if layer_cache is not None and not official and pass2_cache is None:
    raise ValueError("decode_traversal='full' needs the pass-2 cache: build the cache with init_cache(config, ...)")
  pass2_mask = mask
  if layer_cache is not None and official:
    # 'official' prefill: pass 2 attends only to this chunk's own pass-2 K/V and caches nothing.
    pass2_mask = jax.lax.dynamic_slice_in_dim(mask, write_index, x.shape[1], axis=2)
  h1, new_pass1 = run(x, mask, pass1_cache)

  def traversed(mdl, h1, pass2_cache, gate):
    # Inside nn.cond, `mdl` is a clone in the branch's own scope: the layer is bound to it anew.
    h2, new_pass2 = (run if mdl is module else bind(mdl))(h1, pass2_mask, pass2_cache)
    return mix(h1, h2, gate["kernel"], gate["bias"]), new_pass2

  if "traverse" in gate:
    skipped = lambda mdl, h1, pass2_cache, gate: (h1, pass2_cache)
    out, new_pass2 = nn.cond(gate["traverse"], traversed, skipped, module, h1, pass2_cache, gate)
  else:
    out, new_pass2 = traversed(module, h1, pass2_cache, gate)
  return out, _join_cache(new_pass1, new_pass2)


def scan_gate(config: DecoderConfig, gates: dict[str, Array] | None) -> dict[str, Array] | None:
  """The per-layer gates a scanned stack slices; 'traverse' only kept when some layers do not."""
  if gates is not None and len(traversed_layers(config)) == config.num_layers:
    return {"kernel": gates["kernel"], "bias": gates["bias"]}
  return gates


def gate_param_mask(params: Any) -> Any:
  """A pytree of bools like `params`, True at the TroL gate parameters (path matches GATE_PARAM_REGEX).

  For TroL's first training step (gates trained, the rest frozen), e.g.
  `optax.multi_transform({'train': adam, 'freeze': optax.set_to_zero()},
  jax.tree.map(lambda g: 'train' if g else 'freeze', gate_param_mask(params)))`.
  """
  pattern = re.compile(GATE_PARAM_REGEX)

  def is_gate(path, _):
    return bool(pattern.fullmatch("/".join(str(getattr(k, "key", k)) for k in path)))

  return jax.tree_util.tree_map_with_path(is_gate, params)


def _layer_flops_per_token(config: DecoderConfig, keys: float) -> float:
  """Forward FLOPs of one decoder layer for one token attending to `keys` keys (matmuls only)."""
  d, hd = config.embed_dim, config.head_dim
  q, kv = config.num_heads * hd, config.num_kv_heads * hd
  projections = 2 * d * (q + 2 * kv) + 2 * q * d
  mlp = 2 * 3 * d * config.mlp_dim
  attention = 2 * 2 * q * keys  # q·k and p·v
  return projections + mlp + attention


def trol_overhead(config: DecoderConfig, seq_len: int, causal: bool = True) -> dict[str, float]:
  """Analytic cost of TroL on `config` (forward, per token; multiply by 3 for a training step).

  Training / prefill at `seq_len` tokens counts causal attention at ½ (seq_len / 2 keys per token),
  as MFU conventions do; causal=False counts all seq_len keys, as XLA's cost analysis of a masked
  dense attention does. Decoding one token at context `seq_len` attends to seq_len keys; it costs
  nothing extra with 'official' decoding and a second pass of each traversed layer with 'full'.
  Mixer: the gate's dot product (2·D) and the mix (3·D) per traversed layer.
  """
  if config.trol is None:
    raise ValueError("trol_overhead: config.trol is None (TroL is off)")
  traversed = len(traversed_layers(config))
  d = config.embed_dim
  mixer = 5 * d
  layer = _layer_flops_per_token(config, seq_len / 2 if causal else seq_len)
  base = config.num_layers * layer + 2 * d * config.vocab_size
  added = traversed * (layer + mixer)
  decode_layer = _layer_flops_per_token(config, seq_len)
  decode_base = config.num_layers * decode_layer + 2 * d * config.vocab_size
  decode_added = traversed * (decode_layer + mixer) if config.trol.decode_traversal == "full" else 0.0
  return {
      "traversed_layers": traversed,
      "added_params": num_gates(config) * (d + 1),
      "base_flops_per_token": base,
      "added_flops_per_token": added,
      "flops_ratio": (base + added) / base,
      "decode_base_flops_per_token": decode_base,
      "decode_added_flops_per_token": decode_added,
  }
