"""Autoregressive sampling with the explicit KV cache: one prefill and one `lax.while_loop` of decode steps.

Prompts are left-padded (segment id 0 marks padding) so every row's next token is written at the same
cache slot. `pad_prompts` pads a list of prompts to a length bucket and a fixed batch size, so a server or
an evaluator compiles once per bucket rather than once per prompt. Every technique's cache mode runs
through the same `prefill` / `decode_step` (TroL's second-pass caches, Phantom's sos entries, p-MoD's
shorter MoD-layer caches, DeepStack's prefill-only injection).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from llvm_jax.models.llvm import LLVM, decode_step, prefill

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen. Only max_new_tokens shapes the compiled loop; the rest are traced
  values, so changing them does not recompile.

  temperature: 0 is greedy (argmax); otherwise logits / temperature are sampled.
  top_k: keep the k most likely tokens (0: all). top_p: nucleus, keep the smallest set of the
  (top-k) tokens whose probability reaches p (1.0: all). eos_id: a row stops after emitting it
  (None: never). pad_id: written after a row has stopped.
  """

  max_new_tokens: int = 32
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  eos_id: int | None = None
  pad_id: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  def knobs(self) -> dict[str, jax.Array]:
    """The traced settings of the loop."""
    return {
        "temperature": jnp.float32(self.temperature),
        "top_k": jnp.int32(self.top_k),
        "top_p": jnp.float32(self.top_p),
        "eos_id": jnp.int32(-1 if self.eos_id is None else self.eos_id),
        "pad_id": jnp.int32(self.pad_id),
    }


@dataclasses.dataclass
class SampleOutput:
  tokens: jax.Array  # (B, max_new_tokens), pad_id after a row's EOS
  lengths: jax.Array  # (B,) tokens generated per row, its EOS included
  logits: jax.Array | None  # (B, max_new_tokens, V) when asked for: the logits each token was chosen from


def choose_tokens(logits: jax.Array, knobs: dict[str, jax.Array], key: jax.Array) -> jax.Array:
  """Next token per row from logits (B, V) under `SamplingConfig.knobs()`."""
  logits = logits.astype(jnp.float32)

  def sample(logits):
    scaled = logits / knobs["temperature"]
    desc = -jnp.sort(-scaled, axis=-1)
    vocab = logits.shape[-1]
    k = jnp.where(knobs["top_k"] > 0, jnp.minimum(knobs["top_k"], vocab), vocab)
    kth = jax.lax.dynamic_slice_in_dim(desc, k - 1, 1, axis=-1)
    desc = jnp.where(desc < kth, -jnp.inf, desc)
    probs = jax.nn.softmax(desc, axis=-1)
    # Keep a token while the mass strictly before it is < p (the most likely token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(mass_before < knobs["top_p"], desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < jnp.maximum(kth, cutoff), -jnp.inf, scaled)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)

  greedy = lambda logits: jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return jax.lax.cond(knobs["temperature"] > 0, sample, greedy, logits)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "return_logits", "stream"))
def _sample(
    model: LLVM,
    params: Any,
    batch: dict[str, jax.Array],
    key: jax.Array,
    knobs: dict[str, jax.Array],
    max_new_tokens: int,
    return_logits: bool,
    stream: Callable[[np.ndarray, np.ndarray], None] | None,
):
  tokens = batch["tokens"]
  b, prompt_len = tokens.shape
  n = max_new_tokens
  logits, cache = prefill(
      model,
      params,
      tokens,
      prompt_len + n,
      batch.get("images"),
      batch.get("image_mask"),
      batch.get("segment_ids"),
      hires_images=batch.get("hires_images"),
      hires_grid=batch.get("hires_grid"),
  )

  def emit(step, next_logits, out, done, all_logits):
    token = choose_tokens(next_logits, knobs, jax.random.fold_in(key, step))
    token = jnp.where(done, knobs["pad_id"], token)
    out = out.at[:, step].set(token)
    if all_logits is not None:
      all_logits = all_logits.at[:, step].set(next_logits.astype(all_logits.dtype))
    done = done | (token == knobs["eos_id"])
    if stream is not None:
      io_callback(stream, None, step, token, ordered=True)
    return token, out, done, all_logits

  out = jnp.full((b, n), knobs["pad_id"], jnp.int32)
  done = jnp.zeros((b,), bool)
  all_logits = jnp.zeros((b, n, logits.shape[-1]), jnp.float32) if return_logits else None
  token, out, done, all_logits = emit(0, logits[:, -1], out, done, all_logits)

  def cond(carry):
    step, _, _, _, done, _ = carry
    return (step < n) & ~jnp.all(done)

  def body(carry):
    step, token, cache, out, done, all_logits = carry
    step_logits, cache = decode_step(model, params, token[:, None], cache)
    token, out, done, all_logits = emit(step, step_logits[:, -1], out, done, all_logits)
    return step + 1, token, cache, out, done, all_logits

  _, _, _, out, _, all_logits = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, out, done, all_logits))
  is_eos = out == knobs["eos_id"]
  lengths = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, n).astype(jnp.int32)
  return out, lengths, all_logits


def sample(
    model: LLVM,
    params: Any,
    batch: dict[str, Any],
    sampling: SamplingConfig = SamplingConfig(),
    key: jax.Array | None = None,
    return_logits: bool = False,
    stream: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> SampleOutput:
  """Generates up to `sampling.max_new_tokens` after the left-padded prompts `batch['tokens']` (B, T).

  batch: tokens, and optionally segment_ids (0 = padding), images, image_mask, hires_images, hires_grid.
  stream: called on the host as `stream(step, tokens (B,))` after each step, in order.
  Compiles once per (input shapes, max_new_tokens, return_logits, stream); see `pad_prompts`.
  """
  if key is None:
    if sampling.temperature > 0:
      raise ValueError("sampling with temperature > 0 needs a PRNG key")
    key = jax.random.key(0)
  batch = {k: jnp.asarray(v) for k, v in batch.items() if v is not None}
  out, lengths, logits = _sample(
      model, params, batch, key, sampling.knobs(), sampling.max_new_tokens, return_logits, stream
  )
  return SampleOutput(out, lengths, logits)


def bucket_length(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
  """The smallest bucket >= length."""
  for bucket in sorted(buckets):
    if bucket >= length:
      return bucket
  raise ValueError(f"prompt of {length} tokens is longer than the largest bucket {max(buckets)}")


def pad_prompts(
    prompts: Sequence[Sequence[int]],
    batch_size: int | None = None,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    pad_id: int = 0,
) -> dict[str, np.ndarray]:
  """Left-pads token lists to one length bucket and `batch_size` rows (extra rows are all padding).

  Returns tokens and segment_ids (B, bucket); rows past len(prompts) have segment id 0 throughout.
  """
  if not prompts:
    raise ValueError("no prompts")
  batch_size = len(prompts) if batch_size is None else batch_size
  if len(prompts) > batch_size:
    raise ValueError(f"{len(prompts)} prompts > batch_size={batch_size}")
  length = bucket_length(max(len(p) for p in prompts), buckets)
  tokens = np.full((batch_size, length), pad_id, np.int32)
  segment_ids = np.zeros((batch_size, length), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt):
      tokens[row, -len(prompt) :] = prompt
      segment_ids[row, -len(prompt) :] = 1
  return {"tokens": tokens, "segment_ids": segment_ids}


def left_align(tokens: np.ndarray, segment_ids: np.ndarray, buckets: Sequence[int] | None = DEFAULT_BUCKETS):
  """Right-padded prompts (as the data pipeline makes them) -> left-padded, trimmed to a bucket.

  Returns (tokens, segment_ids, rows with a prompt). With buckets=None the length is kept.
  """
  lengths = (segment_ids != 0).sum(axis=1)
  rows = lengths > 0
  width = (
      tokens.shape[1] if buckets is None else min(bucket_length(max(int(lengths.max()), 1), buckets), tokens.shape[1])
  )
  out_t = np.zeros((tokens.shape[0], width), tokens.dtype)
  out_s = np.zeros((tokens.shape[0], width), segment_ids.dtype)
  for r, n in enumerate(lengths):
    if n:
      out_t[r, -n:] = tokens[r, :n]
      out_s[r, -n:] = segment_ids[r, :n]
  return out_t, out_s, rows
