"""Next-token cross-entropy over answer tokens, as sums so micro-batches accumulate exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) per position, float32: logits (B, S, V), targets (B, S) -> (B, S)."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return picked - log_z


def cross_entropy_sums(logits: jax.Array, targets: jax.Array, target_mask: jax.Array) -> dict[str, jax.Array]:
  """Sum of -log p over masked positions, the count, and the count of correct argmax tokens."""
  mask = target_mask.astype(jnp.float32)
  nll = -token_log_probs(logits, targets)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return {"loss_sum": jnp.sum(nll * mask), "tokens": jnp.sum(mask), "correct": jnp.sum(correct * mask)}
