"""Rotary position embeddings with the scaling variants Llama, Qwen2 and Phi-3 checkpoints use.

Frequencies are computed once in numpy from the static config (formulas as in `transformers`'
`modeling_rope_utils`); only the cos/sin of the actual positions are computed in the graph.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax.models.config import RopeConfig


def rotary_dim(head_dim: int, rope: RopeConfig) -> int:
  return int(head_dim * rope.partial_rotary_factor)


def _base_inv_freq(dim: int, theta: float) -> np.ndarray:
  return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))


def inverse_frequencies(rope: RopeConfig, head_dim: int, max_position_embeddings: int) -> tuple[np.ndarray, ...]:
  """Returns (inv_freq, attention_factor) or, for longrope, (short, long, attention_factor, orig_len)."""
  dim = rotary_dim(head_dim, rope)
  inv = _base_inv_freq(dim, rope.theta)
  kind = rope.type
  if kind == "default":
    return inv, 1.0
  if kind == "linear":
    return inv / rope.factor, 1.0
  if kind == "llama3":
    orig = rope.original_max_position_embeddings
    low_wavelen = orig / rope.low_freq_factor
    high_wavelen = orig / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (orig / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32), 1.0
  if kind == "yarn":
    orig = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / orig

    def mscale(scale: float, m: float = 1.0) -> float:
      return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = rope.attention_factor
    if attn is None:
      if rope.mscale and rope.mscale_all_dim:
        attn = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
      else:
        attn = mscale(factor)

    def correction_dim(rotations: float) -> float:
      return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv = (inv / factor) * (1 - extrapolation) + inv * extrapolation
    return inv.astype(np.float32), float(attn)
  if kind == "longrope":
    orig = rope.original_max_position_embeddings or max_position_embeddings
    factor = rope.factor if rope.factor is not None else max_position_embeddings / orig
    attn = rope.attention_factor
    if attn is None:
      attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    short = 1.0 / (np.asarray(rope.short_factor, np.float32) * rope.theta**exponents)
    long = 1.0 / (np.asarray(rope.long_factor, np.float32) * rope.theta**exponents)
    return short.astype(np.float32), long.astype(np.float32), float(attn), orig
  raise ValueError(
      f"unsupported rope type {kind!r}; supported: default, linear, llama3, yarn, longrope "
      "('dynamic' rescales with the running length, which static shapes cannot follow)"
  )


def rope_cos_sin(positions: jax.Array, rope: RopeConfig, head_dim: int, max_position_embeddings: int):
  """cos, sin of shape (B, T, rotary_dim) for integer positions (B, T), float32.

  longrope picks the long factors when the largest position in the call reaches past the original
  context, as transformers does.
  """
  freqs = inverse_frequencies(rope, head_dim, max_position_embeddings)
  pos = positions.astype(jnp.float32)[..., None]
  if rope.type == "longrope":
    short, long, attn, orig = freqs
    use_long = jnp.max(positions) + 1 > orig
    inv = jnp.where(use_long, jnp.asarray(long), jnp.asarray(short))
  else:
    inv, attn = freqs
    inv = jnp.asarray(inv)
  angles = pos * inv
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles) * attn, jnp.sin(angles) * attn


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the first rotary_dim channels of x (B, T, H, d) in the half-split (HF) convention."""
  rot = cos.shape[-1]
  x_rot, x_pass = x[..., :rot], x[..., rot:]
  x32 = x_rot.astype(jnp.float32)
  half = rot // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)
