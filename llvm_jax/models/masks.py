"""Attention masks and token positions: a leaf module (imports nothing of the model).

A mask is kept in factored form, `MaskInfo`: per query and per key, its segment id (0 = padding or
an empty cache slot), its slot (the order causality follows) and its RoPE position (for a sliding
window). Query t may attend to key s iff

    q_segment[t] == kv_segment[s] != 0  and  kv_slot[s] <= q_slot[t]
    [and q_position[t] - kv_position[s] < sliding_window]

The dense (B, T, S) boolean form is built only by the attention implementations that need it
(`MaskInfo.dense`); the blocked and fused kernels build each block's mask from the vectors, so the
whole (T, S) mask never exists at once.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


@struct.dataclass
class MaskInfo:
  """Factored causal / segment / sliding-window mask of T queries over S keys (a pytree)."""

  q_segment_ids: Array  # (B, T) int32
  q_slots: Array  # (B, T) int32
  q_positions: Array  # (B, T) int32
  kv_segment_ids: Array  # (B, S) int32
  kv_slots: Array  # (B, S) int32
  kv_positions: Array  # (B, S) int32
  sliding_window: int | None = struct.field(pytree_node=False, default=None)

  @property
  def num_queries(self) -> int:
    return self.q_segment_ids.shape[1]

  @property
  def num_keys(self) -> int:
    return self.kv_segment_ids.shape[1]

  def block(self, q_index: Any = slice(None), kv_index: Any = slice(None)) -> Array:
    """The (B, t, s) bool mask of queries `q_index` and keys `kv_index` (slices or index arrays)."""
    q_seg, q_slot, q_pos = (a[:, q_index] for a in (self.q_segment_ids, self.q_slots, self.q_positions))
    k_seg, k_slot, k_pos = (a[:, kv_index] for a in (self.kv_segment_ids, self.kv_slots, self.kv_positions))
    return pair_mask(q_seg, q_slot, q_pos, k_seg, k_slot, k_pos, self.sliding_window)

  def dense(self) -> Array:
    """The whole (B, T, S) bool mask."""
    return self.block()

  def keys_slice(self, start: Any, length: int) -> MaskInfo:
    """The same queries over keys [start, start + length) only (`start` may be traced)."""
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, start, length, axis=1)
    return self.replace(
        kv_segment_ids=take(self.kv_segment_ids), kv_slots=take(self.kv_slots), kv_positions=take(self.kv_positions)
    )


def pair_mask(
    q_segments: Array,
    q_slots: Array,
    q_positions: Array,
    k_segments: Array,
    k_slots: Array,
    k_positions: Array,
    sliding_window: int | None = None,
) -> Array:
  """(B, T, S) bool from per-query (B, T) and per-key (B, S) vectors (see the module docstring)."""
  mask = (q_segments[:, :, None] == k_segments[:, None, :]) & (q_segments[:, :, None] != 0)
  mask &= k_slots[:, None, :] <= q_slots[:, :, None]
  if sliding_window is not None:
    mask &= q_positions[:, :, None] - k_positions[:, None, :] < sliding_window
  return mask


def self_attention(segment_ids: Array, positions: Array, sliding_window: int | None = None) -> MaskInfo:
  """Causal attention of a (packed or padded) sequence over itself: slots are the token indices."""
  slots = jnp.broadcast_to(jnp.arange(segment_ids.shape[1], dtype=jnp.int32)[None], segment_ids.shape)
  return MaskInfo(segment_ids, slots, positions, segment_ids, slots, positions, sliding_window)


def default_positions(segment_ids: Array) -> Array:
  """Positions restarting at 0 in each segment (padding gets 0), for packed or padded rows."""
  valid = segment_ids != 0
  idx = jnp.arange(segment_ids.shape[1])[None, :]
  is_start = valid & jnp.concatenate([jnp.ones_like(valid[:, :1]), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start = jax.lax.cummax(jnp.where(is_start, idx, 0), axis=1)
  return jnp.where(valid, idx - start, 0).astype(jnp.int32)
