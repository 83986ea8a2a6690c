"""Dot-product attention with interchangeable implementations (`DecoderConfig.attention_impl`).

A leaf module (imports jax, numpy, `masks` and the config's constants only). Every implementation takes

    q: (B, T, H, dq); k: (B, S, Hkv, dq); v: (B, S, Hkv, dv); H a multiple of Hkv

and returns (B, T, H, dv) in v's dtype, with logits and softmax in float32. Query head h reads KV head
h // (H // Hkv). `mask` is a factored `MaskInfo` (None: full bidirectional attention, the vision towers).

    'xla'      the einsum reference: materialises the (B, H, T, S) logits and the dense mask. Any backend.
    'blocked'  pure-JAX FlashAttention-2: loops over (Q, KV) blocks with an online softmax, builds each
               block's mask from the MaskInfo vectors, custom VJP that recomputes block logits. Any
               backend, memory O(T + S) per head instead of O(T * S), any mask (caches, p-MoD keys).
    'cudnn'    `jax.nn.dot_product_attention(implementation='cudnn')`: NVIDIA GPU, bf16/fp16 only.
    'splash'   Pallas splash attention: TPU only, self-attention without a KV cache (training/prefill).
    'cpu_flash' FlashAttention in C++ for XLA:CPU (`cpu_kernels`, jax.ffi; built on first use): CPU
               only, any mask, float32 inside.

Rows with no valid key (padding queries, or queries before every kept key) are finite everywhere:
'xla' and 'cudnn' give the mean of v there (a uniform softmax), 'blocked' and 'cpu_flash' give 0 with zero gradient,
'splash' lets padding queries attend to the padding keys. Real losses never read those rows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax.models import cpu_kernels
from llvm_jax.models import masks as masks_lib
from llvm_jax.models.config import ATTENTION_IMPLEMENTATIONS

Array = jax.Array
MaskInfo = masks_lib.MaskInfo


# Large negative instead of -inf: a fully masked row stays finite (same value as `layers.NEG_INF`).
NEG_INF = -1e30

# Mesh axes splash shards heads over when it runs under a mesh (the 'act_heads' rule of
# `llvm_jax.sharding`); the batch is split over the remaining axes. Mosaic kernels cannot be
# partitioned automatically, so splash runs inside a shard_map.
SPLASH_HEAD_AXES = ("tensor",)

SPLASH_LANES = 128  # splash's block sizes must be multiples of the TPU lane width


def for_call(impl: str, cached: bool, initializing: bool = False) -> str:
  """The implementation a call uses when the model is configured with `impl`.

  Initialisation only creates parameters, so it takes the einsum (any shape). Splash is a kernel
  for self-attention without a cache (training, a cache-free prefill, a ViT at any token count);
  calls with a KV cache (prefill into it, decode steps) run the blocked kernel instead, which handles
  cache slots.
  """
  if initializing:
    return "xla"
  if cached and impl == "splash":
    return "blocked"
  return impl


def dot_product_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: MaskInfo | None,
    scale: float,
    impl: str = "xla",
    *,
    block_q: int = 512,
    block_kv: int = 512,
) -> Array:
  """Attention of q over (k, v) under `mask` with the implementation `impl` (one of ATTENTION_IMPLEMENTATIONS).

  `block_q`/`block_kv` are the tile sizes of 'blocked' and 'splash' (capped at T and S).
  """
  if impl not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
  _check_shapes(q, k, v, mask)
  if impl == "xla":
    return einsum_attention(q, k, v, None if mask is None else mask.dense(), scale)
  if impl == "blocked":
    return blocked_attention(q, k, v, mask, scale, block_q=block_q, block_kv=block_kv)
  if impl == "cudnn":
    return cudnn_attention(q, k, v, mask, scale)
  if impl == "cpu_flash":
    return cpu_flash_attention(q, k, v, mask, scale)
  return splash_attention(q, k, v, mask, scale, block_q=block_q, block_kv=block_kv)


def layer_shared(impl: str, *arrays: Array) -> tuple[Array, ...]:
  """Arrays that every layer's attention reads (RoPE's cos and sin, batch first) as `impl` wants them:
  'cpu_flash' materialises them once (`cpu_kernels.materialized`, per shard of the current mesh);
  the others take them as they are."""
  if impl != "cpu_flash":
    return arrays
  partition = _kernel_partition(arrays[0].shape[0], 1, 1)  # one "head": the batch over every axis it divides
  if partition is None:
    return tuple(cpu_kernels.materialized(a) for a in arrays)
  spec = jax.sharding.PartitionSpec(partition[0])
  materialize = lambda *xs: tuple(cpu_kernels.materialized(x) for x in xs)
  return _per_shard(materialize, (spec,) * len(arrays), (spec,) * len(arrays))(*arrays)


def _check_shapes(q: Array, k: Array, v: Array, mask: MaskInfo | None) -> None:
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be (B, T|S, heads, dim); got {q.shape}, {k.shape}, {v.shape}")
  b, t, h, dq = q.shape
  if k.shape[:3] != v.shape[:3] or k.shape[0] != b or k.shape[3] != dq:
    raise ValueError(f"inconsistent shapes q {q.shape}, k {k.shape}, v {v.shape}")
  if h % k.shape[2]:
    raise ValueError(f"{h} query heads are not a multiple of {k.shape[2]} KV heads")
  if mask is not None and (mask.q_segment_ids.shape != (b, t) or mask.kv_segment_ids.shape != (b, k.shape[1])):
    raise ValueError(
        f"mask of {mask.q_segment_ids.shape} queries x {mask.kv_segment_ids.shape} keys does not fit "
        f"q {q.shape}, k {k.shape}"
    )


# ------------------------------------------------------------------------------------------ xla


def einsum_attention(q: Array, k: Array, v: Array, mask: Array | None, scale: float) -> Array:
  """The einsum reference with a dense bool mask broadcastable to (B, T, S) (True = may attend)."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, t, hkv, h // hkv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :, :], logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, v.shape[-1])


# -------------------------------------------------------------------------------------- blocked


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pad_tokens(x: Array, n: int) -> Array:
  """x (B, T, ...) zero-padded along its token axis to n (the tiled kernels' whole blocks)."""
  return jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def blocked_attention(
    q: Array, k: Array, v: Array, mask: MaskInfo | None, scale: float, *, block_q: int = 512, block_kv: int = 512
) -> Array:
  """FlashAttention-2 in pure JAX: never holds more than one (block_q, block_kv) tile of logits per head.

  T and S are padded up to block multiples (padding keys get segment 0, padding queries are dropped).
  Rows without any valid key give 0 (and pass no gradient), where the einsum gives the mean of v.
  """
  b, t, h, dq = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk = max(1, min(block_q, t)), max(1, min(block_kv, s))
  tp, sp = _round_up(t, bq), _round_up(s, bk)
  if mask is None:  # everyone sees every key; only the padding keys (segment 0) get masked
    ones = lambda n: jnp.ones((b, n), jnp.int32)
    zeros = lambda n: jnp.zeros((b, n), jnp.int32)
    mask = MaskInfo(ones(t), zeros(t), zeros(t), ones(s), zeros(s), zeros(s))
  mask = MaskInfo(
      *(_pad_tokens(a.astype(jnp.int32), tp) for a in (mask.q_segment_ids, mask.q_slots, mask.q_positions)),
      *(_pad_tokens(a.astype(jnp.int32), sp) for a in (mask.kv_segment_ids, mask.kv_slots, mask.kv_positions)),
      sliding_window=mask.sliding_window,
  )
  qg = _pad_tokens(q.reshape(b, t, hkv, h // hkv, dq), tp)
  out = _flash(qg, _pad_tokens(k, sp), _pad_tokens(v, sp), mask, float(scale), bq, bk)
  return out[:, :t].reshape(b, t, h, v.shape[-1])


def _block_mask(mask: MaskInfo, q_start: Array, bq: int, k_start: Array, bk: int) -> Array:
  """(B, bq, bk) bool mask of queries [q_start, +bq) over keys [k_start, +bk)."""
  qs = lambda a: jax.lax.dynamic_slice_in_dim(a, q_start, bq, axis=1)
  ks = lambda a: jax.lax.dynamic_slice_in_dim(a, k_start, bk, axis=1)
  return masks_lib.pair_mask(
      qs(mask.q_segment_ids),
      qs(mask.q_slots),
      qs(mask.q_positions),
      ks(mask.kv_segment_ids),
      ks(mask.kv_slots),
      ks(mask.kv_positions),
      mask.sliding_window,
  )


def _block_logits(q_i: Array, k_j: Array, allowed: Array, scale: float) -> Array:
  """(B, Hkv, G, bq, bk) float32 scaled logits, NEG_INF where not allowed."""
  s = jnp.einsum("bqhgd,bkhd->bhgqk", q_i, k_j, preferred_element_type=jnp.float32) * scale
  return jnp.where(allowed[:, None, None], s, NEG_INF)


def _skip_if_masked(allowed: Array, update: Callable[[Any], Any], carry: Any) -> Any:
  # Causal and window masks leave whole tiles empty: skip their matmuls.
  return jax.lax.cond(jnp.any(allowed), update, lambda c: c, carry)


def _flash_forward(q: Array, k: Array, v: Array, mask: MaskInfo, scale: float, bq: int, bk: int):
  """Padded, grouped inputs q (B, Tp, Hkv, G, dq), k/v (B, Sp, Hkv, d) -> out like q with dv, lse (B, Hkv, G, Tp)."""
  b, tp, hkv, g, _ = q.shape
  sp, dv = k.shape[1], v.shape[-1]
  f32 = jnp.float32

  def q_block(i):
    q_start = i * bq
    q_i = jax.lax.dynamic_slice_in_dim(q, q_start, bq, axis=1)

    def kv_step(j, carry):
      k_start = j * bk
      allowed = _block_mask(mask, q_start, bq, k_start, bk)

      def update(carry):
        m, l, o = carry
        k_j = jax.lax.dynamic_slice_in_dim(k, k_start, bk, axis=1)
        v_j = jax.lax.dynamic_slice_in_dim(v, k_start, bk, axis=1)
        s = _block_logits(q_i, k_j, allowed, scale)
        m_new = jnp.maximum(m, s.max(axis=-1))
        # The where keeps masked keys at exactly 0 even while a row has seen no valid key (m = NEG_INF).
        p = jnp.where(allowed[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(v.dtype), v_j, preferred_element_type=f32)
        return m_new, alpha * l + p.sum(axis=-1), alpha[..., None] * o + pv

      return _skip_if_masked(allowed, update, carry)

    row = (b, hkv, g, bq)
    init = (jnp.full(row, NEG_INF, f32), jnp.zeros(row, f32), jnp.zeros(row + (dv,), f32))
    m, l, o = jax.lax.fori_loop(0, sp // bk, kv_step, init)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    return (o / l_safe[..., None]).astype(v.dtype), jnp.where(seen, m + jnp.log(l_safe), 0.0)

  o, lse = jax.lax.map(q_block, jnp.arange(tp // bq))  # (nq, B, Hkv, G, bq, dv), (nq, B, Hkv, G, bq)
  out = o.transpose(1, 0, 4, 2, 3, 5).reshape(b, tp, hkv, g, dv)
  lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, hkv, g, tp)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q: Array, k: Array, v: Array, mask: MaskInfo, scale: float, bq: int, bk: int) -> Array:
  return _flash_forward(q, k, v, mask, scale, bq, bk)[0]


def _flash_fwd(q, k, v, mask, scale, bq, bk):
  out, lse = _flash_forward(q, k, v, mask, scale, bq, bk)
  return out, (q, k, v, mask, out, lse)  # no (T, S) residual: the backward recomputes the tiles


def _flash_bwd(scale, bq, bk, residuals, d_out):
  q, k, v, mask, out, lse = residuals
  b, tp, hkv, g, dq = q.shape
  sp, dv = k.shape[1], v.shape[-1]
  f32 = jnp.float32
  # delta_t = sum_s p_ts dP_ts = dO_t . O_t (FlashAttention-2, eq. for dS).
  delta = jnp.einsum("bqhgd,bqhgd->bhgq", d_out.astype(f32), out.astype(f32))

  def kv_block(dq_acc, j):
    k_start = j * bk
    k_j = jax.lax.dynamic_slice_in_dim(k, k_start, bk, axis=1)
    v_j = jax.lax.dynamic_slice_in_dim(v, k_start, bk, axis=1)

    def q_step(i, carry):
      q_start = i * bq
      allowed = _block_mask(mask, q_start, bq, k_start, bk)

      def update(carry):
        dq_acc, dk_j, dv_j = carry
        q_i = jax.lax.dynamic_slice_in_dim(q, q_start, bq, axis=1)
        do_i = jax.lax.dynamic_slice_in_dim(d_out, q_start, bq, axis=1)
        lse_i = jax.lax.dynamic_slice_in_dim(lse, q_start, bq, axis=3)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, q_start, bq, axis=3)
        s = _block_logits(q_i, k_j, allowed, scale)
        p = jnp.where(allowed[:, None, None], jnp.exp(s - lse_i[..., None]), 0.0)
        dv_j = dv_j + jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(d_out.dtype), do_i, preferred_element_type=f32)
        dp = jnp.einsum("bqhgd,bkhd->bhgqk", do_i, v_j, preferred_element_type=f32)
        ds = p * (dp - delta_i[..., None]) * scale
        dk_j = dk_j + jnp.einsum("bhgqk,bqhgd->bkhd", ds.astype(q.dtype), q_i, preferred_element_type=f32)
        dq_i = jnp.einsum("bhgqk,bkhd->bqhgd", ds.astype(k.dtype), k_j, preferred_element_type=f32)
        dq_i = dq_i + jax.lax.dynamic_slice_in_dim(dq_acc, q_start, bq, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(dq_acc, dq_i, q_start, axis=1), dk_j, dv_j

      return _skip_if_masked(allowed, update, carry)

    init = (dq_acc, jnp.zeros((b, bk, hkv, dq), f32), jnp.zeros((b, bk, hkv, dv), f32))
    dq_acc, dk_j, dv_j = jax.lax.fori_loop(0, tp // bq, q_step, init)
    return dq_acc, (dk_j, dv_j)

  dq_acc, (dk, dv_) = jax.lax.scan(kv_block, jnp.zeros(q.shape, f32), jnp.arange(sp // bk))
  dk = dk.transpose(1, 0, 2, 3, 4).reshape(b, sp, hkv, dq)
  dv_ = dv_.transpose(1, 0, 2, 3, 4).reshape(b, sp, hkv, dv)
  d_mask = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0), mask)  # integer inputs
  return dq_acc.astype(q.dtype), dk.astype(k.dtype), dv_.astype(v.dtype), d_mask


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------- cudnn


def cudnn_attention(
    q: Array, k: Array, v: Array, mask: MaskInfo | None, scale: float, *, implementation: str | None = "cudnn"
) -> Array:
  """`jax.nn.dot_product_attention` with the MaskInfo as its dense (B, 1, T, S) bool mask.

  `implementation` is passed on ('cudnn'; 'xla' or None run jax's own XLA path on any backend, which
  checks this mapping). The mask goes in dense because its slot causality (KV caches, p-MoD keys,
  packed segments) has no `is_causal`/sequence-length equivalent known at trace time; cuDNN still
  runs its fused kernel with it as a bias. jax.nn needs v's head dim equal to q's: the narrower of
  q/k and v is zero-padded (zero q/k columns leave the logits unchanged; extra v columns are dropped).
  """
  if implementation == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(
          f"attention impl 'cudnn' needs an NVIDIA GPU (backend is {jax.default_backend()!r}); use 'xla' or 'blocked'"
      )
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"attention impl 'cudnn' needs bfloat16/float16 q/k/v, got {q.dtype}; use 'xla' or 'blocked'")
  dq, dv = q.shape[-1], v.shape[-1]
  width = max(dq, dv)
  widen = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])]) if x.shape[-1] < width else x
  dense = None if mask is None else mask.dense()[:, None]
  out = jax.nn.dot_product_attention(
      widen(q), widen(k), widen(v), mask=dense, scale=scale, implementation=implementation
  )
  return out[..., :dv].astype(v.dtype)


# --------------------------------------------------------------------------------------- splash


def splash_attention(
    q: Array,
    k: Array,
    v: Array,
    mask: MaskInfo | None,
    scale: float,
    *,
    block_q: int = 512,
    block_kv: int = 512,
    interpret: bool = False,
) -> Array:
  """Pallas splash attention (TPU): causal self-attention with segment ids and a sliding window.

  Expresses only what a static splash mask can: with a mask, T == S and it must be a plain
  self-attention (`masks.self_attention`: slots are the token indices, no KV cache); the sliding
  window counts token indices, which equals the position difference when positions advance by one
  per token within a segment (`masks.default_positions`). Decoding with a cache or p-MoD's shortened
  keys raise: use 'xla' or 'blocked' there. Padding queries (segment 0) attend to the padding keys.
  Block sizes must be multiples of 128 (they are capped at T and S rounded up to 128). Any length runs:
  with a mask, T is padded up to whole blocks with tokens in segment 0 (p-MoD's kept tokens, e.g.),
  whose rows are dropped; mask None is full attention (T may differ from S), e.g. a ViT's 577 or 1025
  tokens, T and S padded up to whole blocks, the padding keys masked by segment ids. Under a mesh
  (`jax.set_mesh`) the kernel runs in a shard_map: batch over the mesh axes not in SPLASH_HEAD_AXES,
  heads over those (when they divide both head counts); a multi-device jit without a mesh set fails
  (Mosaic kernels cannot be partitioned automatically). `interpret` runs the kernel in the Pallas
  interpreter (any backend; for tests).
  """
  _check_shapes(q, k, v, mask)
  t, s = q.shape[1], k.shape[1]
  if mask is None:
    return _full_splash(q, k, v, scale, block_q, block_kv, interpret)
  _check_splash_mask(mask, t, s)
  segments = (mask.q_segment_ids, mask.kv_segment_ids)
  return _padded_splash(q, k, v, segments, scale, (block_q, block_kv), mask.sliding_window, interpret, causal=True)


def _check_splash_blocks(t: int, s: int, bq: int, bk: int) -> None:
  if t % bq or s % bk or bq % SPLASH_LANES or bk % SPLASH_LANES:
    raise ValueError(
        f"attention impl 'splash' needs block sizes that are multiples of {SPLASH_LANES} and divide T={t} and "
        f"S={s}; got block_q={bq}, block_kv={bk} (pad sequences to a multiple of {SPLASH_LANES}, or use 'blocked')"
    )


def _full_splash(q: Array, k: Array, v: Array, scale: float, block_q: int, block_kv: int, interpret: bool) -> Array:
  """Full attention at any length: the real tokens in segment 1 (the padding, in segment 0, is masked)."""
  (b, t), s = q.shape[:2], k.shape[1]
  segments = (jnp.ones((b, t), jnp.int32), jnp.ones((b, s), jnp.int32))
  return _padded_splash(q, k, v, segments, scale, (block_q, block_kv), None, interpret, causal=False)


def _padded_splash(
    q: Array,
    k: Array,
    v: Array,
    segments: tuple[Array, Array],
    scale: float,
    blocks: tuple[int, int],
    sliding_window: int | None,
    interpret: bool,
    causal: bool,
) -> Array:
  """The kernel at any length: blocks capped at T and S rounded up to 128, T and S padded up to whole
  blocks (causal: one length, T == S) with tokens in segment 0, whose rows are dropped; real queries
  (segments >= 1) never attend to them. Unpadded calls keep their segment ids, None for full attention."""
  t, s = q.shape[1], k.shape[1]
  bq, bk = min(blocks[0], _round_up(t, SPLASH_LANES)), min(blocks[1], _round_up(s, SPLASH_LANES))
  tp, sp = (_round_up(t, math.lcm(bq, bk)),) * 2 if causal else (_round_up(t, bq), _round_up(s, bk))
  _check_splash_blocks(tp, sp, bq, bk)
  if (tp, sp) == (t, s):
    kept = segments if causal else (None, None)
    return _splash(q, k, v, kept, scale, (bq, bk), sliding_window, interpret, causal)
  padded = (_pad_tokens(segments[0], tp), _pad_tokens(segments[1], sp))
  out = _splash(
      _pad_tokens(q, tp),
      _pad_tokens(k, sp),
      _pad_tokens(v, sp),
      padded,
      scale,
      (bq, bk),
      sliding_window,
      interpret,
      causal,
  )
  return out[:, :t]


def _splash(
    q: Array,
    k: Array,
    v: Array,
    segments: tuple[Array | None, Array | None],
    scale: float,
    blocks: tuple[int, int],
    sliding_window: int | None,
    interpret: bool,
    causal: bool = True,
) -> Array:
  """The kernel call: q (B, T, H, dq), k/v (B, S, Hkv, d) on whole blocks; segment ids (B, T|S) or None."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b, t, h, _ = q.shape
  s, hkv = k.shape[1], k.shape[2]
  bq, bk = blocks
  block_sizes = sk.BlockSizes(
      block_q=bq,
      block_kv=bk,
      block_kv_compute=bk,
      block_q_dkv=bq,
      block_kv_dkv=bk,
      block_kv_dkv_compute=bk,
      block_q_dq=bq,
      block_kv_dq=bk,
  )

  def local(q, k, v, q_seg, kv_seg):
    """Per shard: q (b, h, T, dq), k/v (b, hkv, S, d); segment ids (b, T|S) or None."""
    head_mask = _splash_head_mask(t, s, causal=causal, sliding_window=sliding_window)
    kernel = sk.make_splash_mha(
        sm.MultiHeadMask([head_mask] * q.shape[1]),
        block_sizes=block_sizes,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    if q_seg is None:
      return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, sk.SegmentIds(qs, ks)))(q, k, v, q_seg, kv_seg)

  # Splash does not scale the logits: fold the scale into q (in float32, then back to q's dtype).
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)
  heads_first = lambda x: x.transpose(0, 2, 1, 3)
  args = (heads_first(q), heads_first(k), heads_first(v))
  out = _in_shard_map(local, args, segments, b, h, hkv)
  return heads_first(out).astype(v.dtype)


def _splash_head_mask(t: int, s: int, causal: bool, sliding_window: int | None):
  """One head's static splash mask: full, causal, or causal over the last `sliding_window` keys."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  if not causal:
    return sm.FullMask((t, s))
  if sliding_window is None:
    return sm.CausalMask((t, s))
  return sm.LocalMask((t, s), window_size=(sliding_window - 1, 0), offset=0)


def splash_visited_tiles(
    t: int, s: int, block_q: int, block_kv: int, causal: bool = True, sliding_window: int | None = None
) -> int:
  """How many (block_q, block_kv) tiles of one head's T x S mask splash computes: those its static mask does
  not leave empty (the kernel skips the others' loads and FLOPs). A causal 1024 x 1024 in 128-tiles: 36 of 64."""
  dense = np.asarray(_splash_head_mask(t, s, causal, sliding_window)[0:t, 0:s])
  return int(dense.reshape(t // block_q, block_q, s // block_kv, block_kv).any(axis=(1, 3)).sum())


def _concrete(x: Array) -> np.ndarray | None:
  try:
    return np.asarray(x)
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def _check_splash_mask(mask: MaskInfo, t: int, s: int) -> None:
  if t != s:
    raise ValueError(
        f"attention impl 'splash' handles self-attention only (T == S); got {t} queries over {s} keys "
        "(a KV-cache decode step or shortened keys): use 'xla' or 'blocked' for these calls"
    )
  if mask.sliding_window is not None and mask.sliding_window < 1:
    raise ValueError(f"sliding_window must be >= 1, got {mask.sliding_window}")
  # Checked where the mask is concrete; under jit the caller guarantees a `masks.self_attention` mask.
  q_slots, kv_slots = _concrete(mask.q_slots), _concrete(mask.kv_slots)
  if q_slots is not None and kv_slots is not None:
    arange = np.arange(t)[None]
    if not ((q_slots == arange).all() and (kv_slots == arange).all()):
      raise ValueError(
          "attention impl 'splash' needs slots equal to the token indices (masks.self_attention); this mask "
          "has cache offsets or reordered slots: use 'xla' or 'blocked' for decoding"
      )


def _kernel_partition(b: int, h: int, hkv: int) -> tuple[Any, tuple[str, ...]] | None:
  """How a custom-call kernel splits over the current mesh: (batch axes spec, head axes), or None (no mesh).

  Heads go over SPLASH_HEAD_AXES when they divide both head counts (GQA groups stay whole), the batch
  over the other axes that divide it. XLA cannot partition a custom call (Mosaic kernels fail, an FFI
  call is gathered to every device), so such kernels run per shard in a shard_map.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return None
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  head_axes = tuple(a for a in SPLASH_HEAD_AXES if sizes.get(a, 1) > 1)
  n_heads = math.prod(sizes[a] for a in head_axes)
  if h % n_heads or hkv % n_heads:
    head_axes = ()
  batch_axes: list[str] = []
  for a in mesh.axis_names:
    if a not in head_axes and sizes[a] > 1 and b % (math.prod(sizes[x] for x in batch_axes) * sizes[a]) == 0:
      batch_axes.append(a)
  return tuple(batch_axes) or None, head_axes


def _per_shard(fn: Callable[..., Any], in_specs: Any, out_specs: Any) -> Callable[..., Any]:
  """fn on each shard of the current mesh (a shard_map with those specs): see _kernel_partition."""
  return jax.shard_map(
      fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=in_specs, out_specs=out_specs, check_vma=False
  )


def _in_shard_map(fn: Callable[..., Array], args: tuple[Array, ...], segs: tuple[Any, Any], b: int, h: int, hkv: int):
  """fn(q, k, v, q_seg, kv_seg) with q/k/v heads first, directly or per shard of the current mesh."""
  partition = _kernel_partition(b, h, hkv)
  if partition is None:
    return fn(*args, *segs)
  batch_spec, head_axes = partition
  qkv_spec = jax.sharding.PartitionSpec(batch_spec, head_axes or None)
  seg_spec = jax.sharding.PartitionSpec(batch_spec)
  if segs[0] is None:
    return _per_shard(lambda q, k, v: fn(q, k, v, None, None), (qkv_spec,) * 3, qkv_spec)(*args)
  return _per_shard(fn, (qkv_spec,) * 3 + (seg_spec,) * 2, qkv_spec)(*args, *segs)


# ------------------------------------------------------------------------------------ cpu_flash


def cpu_flash_attention(q: Array, k: Array, v: Array, mask: MaskInfo | None, scale: float) -> Array:
  """`cpu_kernels.flash_attention`, per shard of the current mesh when there is one (shapes checked by
  `dot_product_attention`, its only caller)."""
  b, _, h, _ = q.shape
  partition = _kernel_partition(b, h, k.shape[2])
  if partition is None:
    return cpu_kernels.flash_attention(q, k, v, mask, scale)
  batch_spec, head_axes = partition
  qkv_spec = jax.sharding.PartitionSpec(batch_spec, None, head_axes or None)
  mask_spec = jax.sharding.PartitionSpec(batch_spec)
  local = lambda q, k, v, mask: cpu_kernels.flash_attention(q, k, v, mask, scale)
  return _per_shard(local, (qkv_spec,) * 3 + (mask_spec,), qkv_spec)(q, k, v, mask)
