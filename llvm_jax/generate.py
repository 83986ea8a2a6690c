"""Greedy generation with the explicit KV cache: one jitted prefill, then jitted one-token steps."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from llvm_jax.models.llvm import LLVM, decode_step, prefill


@functools.partial(jax.jit, static_argnums=(0, 3))
def _prefill(model: LLVM, params: Any, batch: dict[str, jax.Array], max_len: int):
  return prefill(model, params, batch["tokens"], max_len, batch.get("images"), batch.get("image_mask"),
                 batch.get("segment_ids"), hires_images=batch.get("hires_images"))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=3)
def _step(model: LLVM, params: Any, token: jax.Array, cache: Any):
  logits, cache = decode_step(model, params, token, cache)
  return logits, cache


def greedy_generate(
    model: LLVM, params: Any, batch: dict[str, jax.Array], max_new_tokens: int
) -> tuple[jax.Array, jax.Array]:
  """Generates `max_new_tokens` greedily after left-padded prompts `batch['tokens']` (B, T).

  Returns (new token ids (B, max_new_tokens), logits of each generated position (B, N, V)).
  """
  prompt_len = batch["tokens"].shape[1]
  logits, cache = _prefill(model, params, batch, prompt_len + max_new_tokens)
  next_logits = logits[:, -1:]
  tokens, all_logits = [], []
  for _ in range(max_new_tokens):
    token = jnp.argmax(next_logits, axis=-1).astype(jnp.int32)
    tokens.append(token)
    all_logits.append(next_logits)
    next_logits, cache = _step(model, params, token, cache)
  return jnp.concatenate(tokens, axis=1), jnp.concatenate(all_logits, axis=1)
