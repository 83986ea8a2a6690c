"""The decoder LLM (Llama / Qwen2 / Phi-3) with an explicit KV cache.

The cache is a plain pytree passed in and returned (never a hidden Flax collection):

    {'layers': [{'k': (B, S, Hkv, d), 'v': (B, S, Hkv, d)}, ...]   # stacked on axis 0 if scanned
     'segment_ids': (B, S) int32   # 0 = empty or padding slot
     'positions':   (B, S) int32   # RoPE position of each slot
     'end': () int32               # slots [0, end) are written; the next call writes from `end`}

Rows of a batch share `end` (prompts are left-padded to one length), so a call with T new tokens
writes slots [end, end + T) of every row. Techniques add per-layer entries (TroL 'full' decoding:
'trol', a second {'k', 'v'} for the layer's second pass; p-MoD: a MoD layer's k/v are shorter and
it keeps its own slot bookkeeping under 'pmod'; see init_layer_cache).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llvm_jax.models import deepstack, layers, phantom, pmod, trol
from llvm_jax.models.config import DecoderConfig, resolve_dtype
from llvm_jax.models.rope import apply_rope, rope_cos_sin

Array = jax.Array
Cache = dict[str, Any]


class Attention(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(
      self, x: Array, cos: Array, sin: Array, mask: Array, layer_cache: Cache | None, write_index,
      sos_slot: Array | None = None,
  ):
    """sos_slot (B, T): each token's sos slot (`phantom.sos_slots`), needed with cfg.phantom only."""
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)

    def proj(heads: int, head_axis: str, name: str) -> Array:
      return layers.DenseGeneral(
          (heads, cfg.head_dim), ("embed",), (head_axis, "head_dim"), use_bias=cfg.qkv_bias,
          dtype=dtype, param_dtype=pdtype, name=name,
      )(x)

    q = proj(cfg.num_heads, "heads", "q")
    k = proj(cfg.num_kv_heads, "kv_heads", "k")
    v = proj(cfg.num_kv_heads, "kv_heads", "v")
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cfg.phantom is not None:
      out, new_cache = phantom.Phantom(cfg, name="phantom")(q, k, v, mask, layer_cache, write_index, sos_slot)
    else:
      new_cache = None
      if layer_cache is not None:
        start = (0, write_index, 0, 0)
        k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
        v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
        new_cache = {"k": k, "v": v}
        k, v = k.astype(dtype), v.astype(dtype)
      out = layers.attention(q, k, v, mask, scale=cfg.head_dim**-0.5)
    out = nn.with_logical_constraint(out, ("act_batch", "act_len", "act_heads", None))
    out = layers.DenseGeneral(
        (cfg.embed_dim,), ("heads", "head_dim"), ("embed",), dtype=dtype, param_dtype=pdtype, name="o"
    )(out)
    return out, new_cache


class MLP(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)

    def dense(out: int, names: tuple[str, str], name: str, y: Array) -> Array:
      return layers.DenseGeneral((out,), names[:1], names[1:], dtype=dtype, param_dtype=pdtype, name=name)(y)

    gate = dense(cfg.mlp_dim, ("embed", "mlp"), "gate", x)
    up = dense(cfg.mlp_dim, ("embed", "mlp"), "up", x)
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
    return dense(cfg.embed_dim, ("mlp", "embed"), "down", hidden)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + Attn(norm(x)), then + MLP(norm(.)).

  mlp_weight (B, T, 1): p-MoD's per-token scale of the MLP update (`pmod.apply_layer`); None = 1.
  """

  config: DecoderConfig

  @nn.compact
  def __call__(
      self, x: Array, cos: Array, sin: Array, mask: Array, layer_cache: Cache | None, write_index,
      sos_slot: Array | None = None, mlp_weight: Array | None = None,
  ):
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name=name)
    attn_out, new_cache = Attention(cfg, name="attn")(
        norm("input_norm")(x), cos, sin, mask, layer_cache, write_index, sos_slot
    )
    x = x + attn_out
    mlp_out = MLP(cfg, name="mlp")(norm("post_attn_norm")(x))
    if mlp_weight is not None:
      mlp_out = mlp_weight.astype(mlp_out.dtype) * mlp_out
    x = x + mlp_out
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    return x, new_cache


class _ScanBody(nn.Module):
  """Adapter giving DecoderLayer the (carry, xs) signature nn.scan expects."""

  config: DecoderConfig

  @nn.compact
  def __call__(
      self, x, layer_cache, cos, sin, mask, write_index, trol_gate=None, decode=False, sos_slot=None,
      residual_index=None, layer_residuals=None,
  ):
    if layer_residuals is not None:  # DeepStack: this layer's group (if any) is added first
      x = deepstack.add_layer_residual(x, layer_residuals, residual_index)
    layer_cls = layers.maybe_remat(DecoderLayer, self.config.remat_policy)
    if self.config.trol is not None:

      def bind(parent):  # TroL's nn.cond runs the second pass in a scope of its own
        layer = layer_cls(self.config, name="layer", parent=parent)
        return lambda h, m, c: layer(h, cos, sin, m, c, write_index, sos_slot)

      return trol.apply_layer(bind, self, x, mask, layer_cache, write_index, trol_gate, self.config, decode)
    x, new_cache = layer_cls(self.config, name="layer")(x, cos, sin, mask, layer_cache, write_index, sos_slot)
    return x, new_cache


def attention_mask(
    q_segments: Array, q_positions: Array, q_slots: Array,
    k_segments: Array, k_positions: Array, k_slots: Array,
    sliding_window: int | None = None,
) -> Array:
  """(B, T, S) bool: same non-padding segment, causal in slot order, optional sliding window."""
  mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (q_segments[:, :, None] != 0)
  mask &= k_slots[:, None, :] <= q_slots[:, :, None]
  if sliding_window is not None:
    mask &= q_positions[:, :, None] - k_positions[:, None, :] < sliding_window
  return mask


def default_positions(segment_ids: Array) -> Array:
  """Positions restarting at 0 in each segment (padding gets 0), for packed or padded rows."""
  valid = segment_ids != 0
  idx = jnp.arange(segment_ids.shape[1])[None, :]
  is_start = valid & jnp.concatenate(
      [jnp.ones_like(valid[:, :1]), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
  return jnp.where(valid, idx - start, 0).astype(jnp.int32)


class Decoder(nn.Module):
  """Token embedding, the layer stack, final norm and LM head."""

  config: DecoderConfig

  def setup(self):
    cfg = self.config
    self.dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    self.embedding = self.param(
        "embedding",
        layers.logical_init(layers.default_kernel_init, ("vocab", "embed")),
        (cfg.vocab_size, cfg.embed_dim),
        pdtype,
    )
    if cfg.scan_layers:
      self.layers = nn.scan(
          _ScanBody,
          variable_axes={"params": 0},
          split_rngs={"params": True},
          in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast, 0,
                   nn.broadcast),
          length=cfg.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, name="layers")
    else:
      layer_cls = layers.maybe_remat(DecoderLayer, cfg.remat_policy)
      self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_layers)]
    if cfg.trol is not None:
      self.trol_gate = trol.TrolGates(cfg)
    if pmod.layer_ratios(cfg):
      self.pmod_router = pmod.Routers(cfg)
    self.final_norm = layers.RMSNorm(cfg.norm_eps, dtype=self.dtype, param_dtype=pdtype)
    if not cfg.tie_embeddings:
      self.lm_head = layers.DenseGeneral(
          (cfg.vocab_size,), ("embed",), ("vocab",), dtype=self.dtype, param_dtype=pdtype
      )

  def embed(self, tokens: Array) -> Array:
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

  def __call__(
      self,
      x: Array,
      segment_ids: Array,
      positions: Array | None = None,
      cache: Cache | None = None,
      decode: bool = False,
      vision_mask: Array | None = None,
      num_vision: int = 0,
      layer_residuals: Array | None = None,
      residual_layers: tuple[int, ...] = (),
  ) -> tuple[Array, Cache | None]:
    """Runs the stack on embeddings x (B, T, D); returns logits (B, T, V) and the updated cache.

    Without a cache, attention is over these T tokens (causal within segments). With one, the T
    tokens are written at slots [end, end + T) and attend to every valid earlier slot. `decode`
    (static) marks a decode step, as opposed to a prefill (a call with a cache and decode=False).
    vision_mask (B, T) bool marks the vision tokens and num_vision (static) the vision slots per row:
    the tokens p-MoD routes (see pmod.py); ignored without p-MoD.
    layer_residuals (G, B, T, D) are added to x before the layers `residual_layers` (static, one per
    group; DeepStack, see deepstack.py).
    """
    cfg = self.config
    b, t = segment_ids.shape
    segment_ids = segment_ids.astype(jnp.int32)
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    if cache is None:
      if positions is None:
        positions = default_positions(segment_ids)
      mask = attention_mask(segment_ids, positions, slots, segment_ids, positions, slots, cfg.sliding_window)
      write_index, layer_caches = 0, [None] * cfg.num_layers
    else:
      write_index = cache["end"]
      if positions is None:
        start = jnp.max(jnp.where(cache["segment_ids"] != 0, cache["positions"] + 1, 0), axis=1)
        positions = start[:, None] + jnp.maximum(jnp.cumsum(segment_ids != 0, axis=1) - 1, 0)
      positions = positions.astype(jnp.int32)
      k_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, write_index))
      k_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, write_index))
      k_slots = jnp.broadcast_to(jnp.arange(k_segments.shape[1], dtype=jnp.int32)[None], k_segments.shape)
      mask = attention_mask(
          segment_ids, positions, slots + write_index, k_segments, k_positions, k_slots, cfg.sliding_window
      )
      layer_caches = cache["layers"]
    cos, sin = rope_cos_sin(positions, cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    sos_slot = None
    if cfg.phantom is not None:
      sos_slot = phantom.sos_slots(segment_ids, segment_ids if cache is None else k_segments)

    trol_gates = self.trol_gate() if cfg.trol is not None else None
    mod_ratios = pmod.layer_ratios(cfg)
    if mod_ratios and vision_mask is not None:
      pmod.check_fits(cfg, vision_mask, segment_ids, num_vision)
    routers = self.pmod_router() if mod_ratios else None
    if cfg.scan_layers:
      x, new_layer_caches = self.layers(
          x, layer_caches if cache is not None else None, cos, sin, mask, write_index,
          trol.scan_gate(cfg, trol_gates), decode, sos_slot,
          None if layer_residuals is None else deepstack.scan_residual_index(residual_layers, cfg.num_layers),
          layer_residuals,
      )
    else:
      new_layer_caches = []
      for i, (layer, layer_cache) in enumerate(zip(self.layers, layer_caches)):
        if layer_residuals is not None and i in residual_layers:
          x = x + layer_residuals[residual_layers.index(i)].astype(x.dtype)
        if i in mod_ratios:
          x, new_layer_cache = pmod.apply_layer(
              layer, self, x, segment_ids=segment_ids, positions=positions, cos=cos, sin=sin, mask=mask,
              layer_cache=layer_cache, router=pmod.layer_router(cfg, routers, i), vision_mask=vision_mask,
              num_vision=num_vision, ratio=mod_ratios[i], config=cfg, decode=decode,
              trol_gate=trol.layer_gate(trol_gates, i) if i in trol.traversed_layers(cfg) else None,
          )
        elif i in trol.traversed_layers(cfg):
          run = lambda h, m, c, layer=layer: layer(h, cos, sin, m, c, write_index, sos_slot)
          x, new_layer_cache = trol.apply_layer(
              lambda _: run, self, x, mask, layer_cache, write_index, trol.layer_gate(trol_gates, i), cfg, decode
          )
        else:
          x, new_layer_cache = layer(x, cos, sin, mask, layer_cache, write_index, sos_slot)
        new_layer_caches.append(new_layer_cache)

    x = self.final_norm(x)
    if cfg.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", x, self.embedding.astype(self.dtype))
    else:
      logits = self.lm_head(x)
    logits = nn.with_logical_constraint(logits, ("act_batch", "act_len", "act_vocab"))
    new_cache = None
    if cache is not None:
      new_cache = {
          "layers": new_layer_caches,
          "segment_ids": k_segments,
          "positions": k_positions,
          "end": cache["end"] + t,
      }
    return logits, new_cache


def init_layer_cache(
    config: DecoderConfig, batch: int, max_len: int, dtype: Any, layer: int | None = None, num_vision: int = 0
) -> Cache:
  """One layer's cache entries (techniques that cache more per layer add their entries here).

  `layer`: the layer's index; None for a layer of a scanned stack (every layer gets the same entries).
  `num_vision`: vision slots per row of the prefill (p-MoD: a MoD layer caches only its kept tokens).
  """
  max_len = pmod.cache_length(config, layer, max_len, num_vision)
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  layer_cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  if config.phantom is not None:
    # Phantom: the sos q/k/v, and 2d-wide K', V' in place of K, V with cache='expanded'.
    layer_cache.update(phantom.init_cache_entries(config, batch, max_len, dtype))
  if trol.caches_pass2(config, layer):
    # TroL 'full' decoding: the layer's second pass has a cache of its own, shaped like the first's.
    layer_cache[trol.PASS2_CACHE_KEY] = jax.tree.map(jnp.zeros_like, layer_cache)
  if layer in pmod.layer_ratios(config):
    # p-MoD: a MoD layer writes fewer slots than the shared cache, so it tracks its own.
    layer_cache.update(pmod.init_cache_entries(batch, max_len))
  return layer_cache


def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype: Any = None, num_vision: int = 0) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens (dtype defaults to the compute dtype).

  `num_vision`: vision slots per row of the prompt that will be prefilled (sizes p-MoD's MoD layers).
  """
  dtype = resolve_dtype(config.dtype) if dtype is None else dtype
  per_layer = [
      init_layer_cache(config, batch, max_len, dtype, None if config.scan_layers else i, num_vision)
      for i in range(config.num_layers)
  ]
  layer_caches = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer) if config.scan_layers else per_layer
  return {
      "layers": layer_caches,
      "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
      "positions": jnp.zeros((batch, max_len), jnp.int32),
      "end": jnp.zeros((), jnp.int32),
  }
