"""Phantom dimension, an option of the shared attention (`DecoderConfig.phantom`).

Per attention layer with head dim d, after RoPE (ByungKwanLee/Phantom, `model/arch_*/modeling_*.py`
flash path and `utils/utils.py: XAttention`):

    q_s, k_s, v_s = q, k, v of the token's 'sos' (the first token of its sequence)
    XAttn(x, s) = gelu(Wo · softmax(gelu(Wq x) · gelu(Wk s)ᵀ / √d) · gelu(Wv s))
    Q* = η·XAttn_q(Q, q_s),   K* = η·XAttn_k(K, k_s),   V* = V + η·XAttn_v(V, v_s)
    [O1; O2] = causal attention of [Q; Q*], [K; K*], [V; V*] (head dim 2d), scale 1/√d
    g = sigmoid(gate_1(O1) − gate_2(O2)),   O = g·O1 + (1 − g)·O2

then the unchanged output projection. XAttn's softmax runs over the heads of the sos token (H×H
scores per token), its four Linear(d, d) have no bias, and GELU is the exact (erf) one, torch's
default. With GQA, XAttn_k and XAttn_v run over the Hkv distinct K/V heads: the official code
repeats K/V to H heads first, and since every KV head is repeated equally often the softmax over
the repeated heads gives the same result. Added parameters per layer: 12d² + 2d + 2.

The sos is taken per segment: a token's sos is the first key slot holding its segment id, so left
padding, right padding and packed rows all work. With a KV cache the layer cache keeps the sos
q/k/v of each row's last segment (`SOS_CACHE_KEY`), so the tokens of a later call (decode steps)
that continue that segment find their sos there. Two exact cache modes (`PhantomConfig.cache`):
'expanded' caches K' = [K; K*] and V' = [V; V*] (2d wide); 'recompute' caches d-wide K/V and
recomputes K*, V* over the whole cache every call, as the official code does.

η is the constant `PhantomConfig.eta` (as in the official code), or with `eta_learnable` a float32
parameter `phantom/eta` per layer initialised to it, trained wherever the phantom modules are (it
sits under `phantom/`, so the stage rules and the init_hf technique-parameter rule cover it). It
has no HF counterpart: loading an HF checkpoint (init_hf) starts it from `eta`, like the rest of
the phantom parameters; an allow_custom export writes it and reads it back.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llvm_jax.models import attention, hooks, layers, masks
from llvm_jax.models.config import DecoderConfig, PhantomConfig, resolve_dtype

Array = jax.Array
Cache = dict[str, Any]

# Key of the sos q/k/v inside a layer cache.
SOS_CACHE_KEY = "phantom_sos"

_gelu = layers.ACTIVATIONS["gelu"]


def _initializers(init: str, fan_in: int) -> tuple[layers.Initializer, layers.Initializer]:
  """(kernel, bias) initialisers: 'torch' = nn.Linear's U(±1/√fan_in) for both, 'normal' = N(0, 0.02²), 0."""
  if init == "normal":
    return layers.default_kernel_init, nn.initializers.zeros
  bound = fan_in**-0.5
  uniform = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)
  return uniform, uniform


class XAttention(nn.Module):
  """XAttn(x, s) without η: each token's heads attend over the heads of its sos token."""

  head_dim: int
  init: str = "torch"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, sos: Array) -> Array:
    """x (B, T, h, d); sos (B, T, h, d), or (B, 1, h, d) shared by every token. Returns (B, T, h, d)."""
    kernel_init, _ = _initializers(self.init, self.head_dim)

    def linear(name: str, y: Array) -> Array:
      return _gelu(
          layers.DenseGeneral(
              (self.head_dim,),
              ("head_dim",),
              ("phantom_head_dim",),
              dtype=self.dtype,
              param_dtype=self.param_dtype,
              kernel_init=kernel_init,
              name=name,
          )(y)
      )

    a = linear("q", x)
    b = jnp.broadcast_to(linear("k", sos), a.shape[:2] + sos.shape[2:])
    c = jnp.broadcast_to(linear("v", sos), a.shape[:2] + sos.shape[2:])
    scores = jnp.einsum("bthd,btgd->bthg", a, b, preferred_element_type=jnp.float32) * self.head_dim**-0.5
    probs = jax.nn.softmax(scores, axis=-1).astype(c.dtype)
    return linear("o", jnp.einsum("bthg,btgd->bthd", probs, c))


class Gate(nn.Module):
  """Linear(d, 1) with bias; returns float32 (..., 1)."""

  init: str = "torch"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    kernel_init, bias_init = _initializers(self.init, dim)
    kernel = self.param(
        "kernel", layers.logical_init(kernel_init, ("head_dim", "phantom_gate")), (dim, 1), self.param_dtype
    )
    bias = self.param("bias", layers.logical_init(bias_init, ("phantom_gate",)), (1,), self.param_dtype)
    y = jnp.einsum("...d,do->...o", x.astype(self.dtype), kernel.astype(self.dtype), preferred_element_type=jnp.float32)
    return y + bias.astype(jnp.float32)


def sos_slots(mask: masks.MaskInfo) -> Array:
  """(B, T) int32: the key slot of each query token's sos, the first key holding its segment id.

  Padding query tokens get -1. Slots are the mask's own (absolute cache slots, or a MoD layer's).
  """
  first = jnp.argmax(mask.kv_segment_ids[:, None, :] == mask.q_segment_ids[:, :, None], axis=-1)
  slot = jnp.take_along_axis(mask.kv_slots, first, axis=1)
  return jnp.where(mask.q_segment_ids != 0, slot, -1).astype(jnp.int32)


def _token_sos(
    qkv: dict[str, Array], sos_slot: Array, write_index: Any, cached: dict[str, Array] | None
) -> dict[str, Array]:
  """Each token's sos q/k/v (B, T, h, d): from this call's tokens where the sos slot is among them
  (slots [write_index, write_index + T)), else the cached sos of the row's last segment."""
  t = sos_slot.shape[1]
  local = sos_slot - write_index
  in_call = ((local >= 0) & (local < t))[:, :, None, None]
  index = jnp.clip(local, 0, t - 1)[:, :, None, None]
  sos = {}
  for name, x in qkv.items():
    gathered = jnp.take_along_axis(x, index, axis=1)
    sos[name] = gathered if cached is None else jnp.where(in_call, gathered, cached[name].astype(x.dtype))
  return sos


def _last_segment_sos(sos: dict[str, Array], sos_slot: Array, cached: dict[str, Array]) -> dict[str, Array]:
  """The cache's new sos entries: the sos of the row's last valid token, or the old ones if none."""
  valid = sos_slot >= 0
  last = sos_slot.shape[1] - 1 - jnp.argmax(valid[:, ::-1], axis=1)
  any_valid = jnp.any(valid, axis=1)[:, None, None, None]
  return {
      name: jnp.where(
          any_valid, jnp.take_along_axis(x, last[:, None, None, None], axis=1).astype(cached[name].dtype), cached[name]
      )
      for name, x in sos.items()
  }


# Name of the learnable eta inside the Phantom module (`.../attn/phantom/eta`), with
# `PhantomConfig.eta_learnable`. Its logical axis 'phantom_eta' is unlisted in the sharding rules:
# replicated.
ETA_PARAM = "eta"


def eta_value(options: PhantomConfig, module: nn.Module, dtype: Any) -> Any:
  """η: the constant `options.eta`, or with `eta_learnable` this layer's trainable parameter.

  The parameter is float32 of shape (1,) (like the gates' biases: a 0-d tensor would come back 1-d
  from an allow_custom export), initialised to `options.eta`. It is cast to the compute dtype, as
  the Python-float constant is, so at init both give the same output in any dtype.
  """
  if not options.eta_learnable:
    return options.eta
  init = lambda key, shape, dtype=jnp.float32: jnp.full(shape, options.eta, dtype)
  eta = module.param(ETA_PARAM, layers.logical_init(init, ("phantom_eta",)), (1,), jnp.float32)
  return eta[0].astype(dtype)


class Phantom(nn.Module):
  """Attention with the phantom dimension: q/k/v after RoPE in, (B, T, H, d) out (before `o`)."""

  config: DecoderConfig

  @nn.compact
  def __call__(
      self, q: Array, k: Array, v: Array, ctx: hooks.LayerContext, layer_cache: Cache | None
  ) -> tuple[Array, Cache | None]:
    """q (B, T, H, d), k/v (B, T, Hkv, d) after RoPE; context and cache as in decoder.py."""
    cfg, options = self.config, self.config.phantom
    write_index, sos_slot = ctx.write_index, sos_slots(ctx.mask)
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    d, eta = cfg.head_dim, eta_value(options, self, dtype)
    xattn = lambda name: XAttention(d, options.init, dtype, pdtype, name=name)
    xattn_q, xattn_k, xattn_v = xattn("xattn_q"), xattn("xattn_k"), xattn("xattn_v")
    cached_sos = None if layer_cache is None else layer_cache[SOS_CACHE_KEY]
    sos = _token_sos({"q": q, "k": k, "v": v}, sos_slot, write_index, cached_sos)
    q_star = eta * xattn_q(q, sos["q"])
    k_star = eta * xattn_k(k, sos["k"])
    v_star = v + eta * xattn_v(v, sos["v"])
    concat = lambda x, y: jnp.concatenate([x, y], axis=-1)

    new_cache = None
    if layer_cache is None:
      keys, values = concat(k, k_star), concat(v, v_star)
    else:
      start = (0, write_index, 0, 0)
      write = lambda name, x: jax.lax.dynamic_update_slice(layer_cache[name], x.astype(layer_cache[name].dtype), start)
      if options.cache == "expanded":
        keys, values = write("k", concat(k, k_star)), write("v", concat(v, v_star))
        new_cache = {"k": keys, "v": values}
      else:
        k_all, v_all = write("k", k), write("v", v)
        new_cache = {"k": k_all, "v": v_all}
        k_all, v_all = k_all.astype(dtype), v_all.astype(dtype)
        # Earlier slots take the cached sos (right for the row's last segment; slots of other
        # segments are masked for this call's tokens), this call's slots their own.
        old_k, old_v = cached_sos["k"].astype(dtype), cached_sos["v"].astype(dtype)
        k_star_all = jax.lax.dynamic_update_slice(eta * xattn_k(k_all, old_k), k_star, start)
        v_star_all = jax.lax.dynamic_update_slice(v_all + eta * xattn_v(v_all, old_v), v_star, start)
        keys, values = concat(k_all, k_star_all), concat(v_all, v_star_all)
      new_cache[SOS_CACHE_KEY] = _last_segment_sos(sos, sos_slot, cached_sos)
      keys, values = keys.astype(dtype), values.astype(dtype)

    out = attention.dot_product_attention(
        concat(q, q_star),
        keys,
        values,
        ctx.mask,
        d**-0.5,
        ctx.attention_impl,
        block_q=cfg.attention_block_size,
        block_kv=cfg.attention_block_size,
    )
    o1, o2 = out[..., :d], out[..., d:]
    gate = lambda name: Gate(options.init, dtype, pdtype, name=name)
    g = jax.nn.sigmoid(gate("gate_1")(o1) - gate("gate_2")(o2))
    mixed = g * o1.astype(jnp.float32) + (1.0 - g) * o2.astype(jnp.float32)
    return mixed.astype(dtype), new_cache


def init_cache_entries(config: DecoderConfig, batch: int, max_len: int, dtype: Any) -> Cache:
  """Phantom's layer-cache entries: the sos q/k/v and, for 'expanded', 2d-wide k/v (replacing the d-wide)."""
  h, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
  entries: Cache = {
      SOS_CACHE_KEY: {
          "q": jnp.zeros((batch, 1, h, d), dtype),
          "k": jnp.zeros((batch, 1, hkv, d), dtype),
          "v": jnp.zeros((batch, 1, hkv, d), dtype),
      }
  }
  if config.phantom.cache == "expanded":
    entries["k"] = jnp.zeros((batch, max_len, hkv, 2 * d), dtype)
    entries["v"] = jnp.zeros((batch, max_len, hkv, 2 * d), dtype)
  return entries


def added_params_per_layer(config: DecoderConfig) -> int:
  """12d² + 2d + 2: three XAttn modules of four Linear(d, d) and two Linear(d, 1) gates; + 1 with a
  learnable eta."""
  d = config.head_dim
  return 12 * d * d + 2 * d + 2 + int(config.phantom is not None and config.phantom.eta_learnable)


class PhantomCache(hooks.Technique):
  """Phantom's hook into the layer loop: its cache entries (the attention itself is `Phantom`)."""

  name = "phantom"

  def enabled(self, config: DecoderConfig) -> bool:
    return config.phantom is not None

  def cache_entries(
      self, config: DecoderConfig, signature: Any, layer_cache: Cache, batch: int, max_len: int, dtype: Any
  ) -> Cache:
    return {**layer_cache, **init_cache_entries(config, batch, max_len, dtype)}


CACHE_HOOK = PhantomCache()
