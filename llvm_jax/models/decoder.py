"""The decoder LLM (Llama / Qwen2 / Phi-3) with an explicit KV cache and one layer loop.

The layer loop: every layer, scanned or not, is the same pure function of (layer params, hidden
state, `hooks.LayerContext`, layer cache), built once per stage by composing the active techniques
(`techniques.ORDER`) around `DecoderLayer`. Consecutive layers whose techniques give them the same
static shape form a stage; with `scan_layers` each stage is one `lax.scan` over its slice of the
stacked params, otherwise the stage is one layer. Rematerialisation wraps that whole function, so
it bounds every technique's activations.

The cache is a plain pytree passed in and returned (never a hidden Flax collection):

    {'layers': [layer cache per stage]   # per layer (unscanned), or stacked on axis 0 per stage
     'segment_ids': (B, S) int32   # 0 = empty or padding slot
     'positions':   (B, S) int32   # RoPE position of each slot
     'end': () int32               # slots [0, end) are written; the next call writes from `end`}

Rows of a batch share `end` (prompts are left-padded to one length), so a call with T new tokens
writes slots [end, end + T) of every row. A layer cache is {'k': (B, S, Hkv, d), 'v': ...} plus the
techniques' entries (`Technique.cache_entries`: TroL's pass-2 cache, p-MoD's own bookkeeping for a
shorter cache, Phantom's sos).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llvm_jax.models import attention, hooks, layers, masks, techniques
from llvm_jax.models.config import DecoderConfig, resolve_dtype
from llvm_jax.models.rope import apply_rope, rope_cos_sin

Array = jax.Array
Cache = dict[str, Any]


class Attention(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: Array, ctx: hooks.LayerContext, layer_cache: Cache | None) -> tuple[Array, Cache | None]:
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)

    def proj(heads: int, head_axis: str, name: str) -> Array:
      return layers.DenseGeneral(
          (heads, cfg.head_dim),
          ("embed",),
          (head_axis, "head_dim"),
          use_bias=cfg.qkv_bias,
          dtype=dtype,
          param_dtype=pdtype,
          impl=cfg.dense_impl,
          name=name,
      )(x)

    q = proj(cfg.num_heads, "heads", "q")
    k = proj(cfg.num_kv_heads, "kv_heads", "k")
    v = proj(cfg.num_kv_heads, "kv_heads", "v")
    q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
    core = techniques.attention_core(cfg)
    if core is not None:
      core_cls, core_name = core
      out, new_cache = core_cls(cfg, name=core_name)(q, k, v, ctx, layer_cache)
    else:
      new_cache = None
      if layer_cache is not None:
        start = (0, ctx.write_index, 0, 0)
        k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype), start)
        v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype), start)
        new_cache = {"k": k, "v": v}
        k, v = k.astype(dtype), v.astype(dtype)
      out = attention.dot_product_attention(
          q,
          k,
          v,
          ctx.mask,
          cfg.head_dim**-0.5,
          ctx.attention_impl,
          block_q=cfg.attention_block_size,
          block_kv=cfg.attention_block_size,
      )
    out = nn.with_logical_constraint(out, ("act_batch", "act_len", "act_heads", None))
    out = layers.DenseGeneral(
        (cfg.embed_dim,),
        ("heads", "head_dim"),
        ("embed",),
        dtype=dtype,
        param_dtype=pdtype,
        impl=cfg.dense_impl,
        name="o",
    )(out)
    return out, new_cache


class MLP(nn.Module):
  config: DecoderConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)

    def dense(out: int, names: tuple[str, str], name: str, y: Array) -> Array:
      return layers.DenseGeneral(
          (out,), names[:1], names[1:], dtype=dtype, param_dtype=pdtype, impl=cfg.dense_impl, name=name
      )(y)

    gate = dense(cfg.mlp_dim, ("embed", "mlp"), "gate", x)
    up = dense(cfg.mlp_dim, ("embed", "mlp"), "up", x)
    hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("act_batch", "act_len", "act_mlp"))
    return dense(cfg.embed_dim, ("mlp", "embed"), "down", hidden)


class DecoderLayer(nn.Module):
  """Pre-norm block: x + Attn(norm(x)), then + MLP(norm(.)) (scaled by ctx.mlp_weight if set)."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x: Array, ctx: hooks.LayerContext, layer_cache: Cache | None) -> tuple[Array, Cache | None]:
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    norm = lambda name: layers.RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name=name)
    attn_out, new_cache = Attention(cfg, name="attn")(norm("input_norm")(x), ctx, layer_cache)
    x = x + attn_out
    mlp_out = MLP(cfg, name="mlp")(norm("post_attn_norm")(x))
    if ctx.mlp_weight is not None:
      mlp_out = ctx.mlp_weight.astype(mlp_out.dtype) * mlp_out
    x = x + mlp_out
    x = nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))
    return x, new_cache


@dataclasses.dataclass(frozen=True)
class Stage:
  """Layers [start, stop), all of one static signature (one per active technique)."""

  start: int
  stop: int
  signatures: tuple[Any, ...]


def layer_plan(config: DecoderConfig) -> tuple[Stage, ...]:
  """The stages of the layer loop: one per layer unscanned; runs of equal signatures scanned."""
  active = techniques.active(config)
  stages: list[Stage] = []
  for layer in range(config.num_layers):
    signatures = techniques.layer_signatures(config, layer, active)
    if config.scan_layers and stages and stages[-1].signatures == signatures:
      stages[-1] = dataclasses.replace(stages[-1], stop=layer + 1)
    else:
      stages.append(Stage(layer, layer + 1, signatures))
  return tuple(stages)


def _dummy_context(config: DecoderConfig) -> hooks.LayerContext:
  """A one-token context: enough to create a layer's parameters."""
  ones = jnp.ones((1, 1), jnp.int32)
  positions = jnp.zeros((1, 1), jnp.int32)
  cos, sin = rope_cos_sin(positions, config.rope, config.head_dim, config.max_position_embeddings)
  return hooks.LayerContext(cos, sin, masks.self_attention(ones, positions), 0)


def init_layer_params(config: DecoderConfig, rng: Array) -> Any:
  """One DecoderLayer's parameters, boxed with their logical axis names."""
  x = jnp.zeros((1, 1, config.embed_dim), resolve_dtype(config.dtype))
  return DecoderLayer(config, parent=None).init(rng, x, _dummy_context(config), None)["params"]


def init_stacked_layer_params(config: DecoderConfig, rng: Array) -> Any:
  """Every layer's parameters stacked on a leading 'layers' axis (the scanned layout)."""
  stacked = jax.lax.map(lambda key: init_layer_params(config, key), jax.random.split(rng, config.num_layers))
  return jax.tree.map(
      lambda box: box.add_axis(0, {nn.PARTITION_NAME: "layers"}),
      stacked,
      is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def stage_function(config: DecoderConfig, stage: Stage):
  """(layer params, x, ctx, layer cache, layer inputs) -> (x, new layer cache) for the stage's layers:
  the active techniques wrapped around DecoderLayer, outermost first, under remat if configured."""
  active = techniques.active(config)
  layer = DecoderLayer(config, parent=None)

  def apply(params: Any, x: Array, ctx: hooks.LayerContext, layer_cache: Cache | None, inputs: dict[str, Any]):
    fn = lambda h, c, cache: layer.apply({"params": params}, h, c, cache)
    for technique, signature in reversed(tuple(zip(active, stage.signatures))):
      fn = technique.wrap(fn, config, signature, inputs[technique.name])
    return fn(x, ctx, layer_cache)

  if config.remat_policy is None:
    return apply
  if config.remat_policy not in layers.REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {config.remat_policy!r}; expected one of {sorted(layers.REMAT_POLICIES)}")
  # In a scan, CSE across iterations cannot happen, so the barrier is only needed unrolled.
  return jax.checkpoint(apply, policy=layers.REMAT_POLICIES[config.remat_policy], prevent_cse=not config.scan_layers)


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
      self.stacked_params = self.param("layers", lambda rng: {"layer": init_stacked_layer_params(cfg, rng)})["layer"]
    else:
      self.layer_params = [
          self.param(f"layers_{i}", lambda rng: init_layer_params(cfg, rng)) for i in range(cfg.num_layers)
      ]
    for technique in techniques.active(cfg):
      if technique.param_name is not None:
        setattr(self, technique.param_name, technique.param_module(cfg))
    self.final_norm = layers.RMSNorm(cfg.norm_eps, dtype=self.dtype, param_dtype=pdtype)
    if not cfg.tie_embeddings:
      self.lm_head = layers.DenseGeneral(
          (cfg.vocab_size,), ("embed",), ("vocab",), dtype=self.dtype, param_dtype=pdtype, impl=cfg.dense_impl
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
    segment_ids = segment_ids.astype(jnp.int32)
    if cache is None:
      if positions is None:
        positions = masks.default_positions(segment_ids)
      mask = masks.self_attention(segment_ids, positions.astype(jnp.int32), cfg.sliding_window)
      write_index, layer_caches = 0, None
    else:
      write_index = cache["end"]
      if positions is None:
        start = jnp.max(jnp.where(cache["segment_ids"] != 0, cache["positions"] + 1, 0), axis=1)
        positions = start[:, None] + jnp.maximum(jnp.cumsum(segment_ids != 0, axis=1) - 1, 0)
      positions = positions.astype(jnp.int32)
      k_segments = jax.lax.dynamic_update_slice(cache["segment_ids"], segment_ids, (0, write_index))
      k_positions = jax.lax.dynamic_update_slice(cache["positions"], positions, (0, write_index))
      k_slots = jnp.broadcast_to(jnp.arange(k_segments.shape[1], dtype=jnp.int32)[None], k_segments.shape)
      q_slots = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None] + write_index
      mask = masks.MaskInfo(
          segment_ids,
          jnp.broadcast_to(q_slots, segment_ids.shape),
          positions,
          k_segments,
          k_slots,
          k_positions,
          cfg.sliding_window,
      )
      layer_caches = cache["layers"]
    impl = attention.for_call(cfg.attention_impl, cached=cache is not None, initializing=self.is_initializing())
    cos, sin = attention.layer_shared(
        impl, *rope_cos_sin(positions, cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    )
    ctx = hooks.LayerContext(
        cos,
        sin,
        mask,
        write_index,
        vision_mask=vision_mask,
        layer_residuals=layer_residuals,
        num_vision=num_vision if vision_mask is not None else 0,
        decode=decode,
        attention_impl=impl,
    )

    active = techniques.active(cfg)
    for technique in active:
      technique.check_call(cfg, vision_mask, segment_ids, num_vision)
    inputs = {
        t.name: t.layer_inputs(
            cfg, getattr(self, t.param_name)() if t.param_name else None, ctx.num_vision, residual_layers
        )
        for t in active
    }
    x, new_layer_caches = self._layers(x, ctx, layer_caches, inputs)

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
          "end": cache["end"] + segment_ids.shape[1],
      }
    return logits, new_cache

  def _layers(
      self, x: Array, ctx: hooks.LayerContext, layer_caches: list[Cache] | None, inputs: dict[str, Any]
  ) -> tuple[Array, list[Cache] | None]:
    """The one layer loop: each stage's function, scanned over its layers or applied to its one layer."""
    cfg = self.config
    new_caches = []
    for index, stage in enumerate(layer_plan(cfg)):
      fn = stage_function(cfg, stage)
      layer_cache = None if layer_caches is None else layer_caches[index]
      if cfg.scan_layers:
        take = lambda tree: jax.tree.map(lambda a: a[stage.start : stage.stop], tree)

        def body(h, xs, fn=fn):
          params, c, layer_inputs = xs
          return fn(params, h, ctx, c, layer_inputs)

        x, new_cache = jax.lax.scan(body, x, (take(self.stacked_params), layer_cache, take(inputs)))
      else:
        layer_inputs = jax.tree.map(lambda a: a[stage.start], inputs)
        x, new_cache = fn(self.layer_params[stage.start], x, ctx, layer_cache, layer_inputs)
      new_caches.append(new_cache)
    return x, None if layer_caches is None else new_caches


def init_layer_cache(
    config: DecoderConfig, stage: Stage, batch: int, max_len: int, dtype: Any, num_vision: int = 0
) -> Cache:
  """One layer's cache of `stage`: k/v of the length its techniques give it, and their entries.

  `num_vision`: vision slots per row of the prefill (p-MoD: a MoD layer caches only its kept tokens).
  """
  active = techniques.active(config)
  length = max_len
  for technique, signature in zip(active, stage.signatures):
    length = technique.cache_length(config, signature, length, num_vision)
  shape = (batch, length, config.num_kv_heads, config.head_dim)
  layer_cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  # Innermost first: TroL's pass-2 cache copies what the techniques inside it keep.
  for technique, signature in reversed(tuple(zip(active, stage.signatures))):
    layer_cache = technique.cache_entries(config, signature, layer_cache, batch, length, dtype)
  return layer_cache


def init_cache(config: DecoderConfig, batch: int, max_len: int, dtype: Any = None, num_vision: int = 0) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens (dtype defaults to the compute dtype).

  `num_vision`: vision slots per row of the prompt that will be prefilled (sizes p-MoD's MoD layers).
  """
  dtype = resolve_dtype(config.dtype) if dtype is None else dtype
  layer_caches = []
  for stage in layer_plan(config):
    one = init_layer_cache(config, stage, batch, max_len, dtype, num_vision)
    if config.scan_layers:
      one = jax.tree.map(lambda a, n=stage.stop - stage.start: jnp.broadcast_to(a, (n,) + a.shape), one)
    layer_caches.append(one)
  return {
      "layers": layer_caches,
      "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
      "positions": jnp.zeros((batch, max_len), jnp.int32),
      "end": jnp.zeros((), jnp.int32),
  }
