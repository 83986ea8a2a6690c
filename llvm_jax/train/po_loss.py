"""Phantom Optimization (PO): SFT plus a SimPO-form preference term, with no reference model.

For a triple (prompt x with its image, correct answer y_w, incorrect or ambiguous answer y_l), with
the length-normalised answer log-prob r(y) = log π(y|x) / |y| (answer tokens only):

    L_SFT  = −r(y_w)
    L_pref = −log σ(β·r(y_w) − β·r(y_l) − γ)
    L_PO   = L_SFT + λ·L_pref                 (mean over the pairs of the batch)

Preference batches hold tokens / segment_ids / positions / targets / target_mask of shape (B, 2, S)
(index 0 chosen, 1 rejected; targets[t] is the token predicted at t, target_mask[t] = 1 on answer
tokens) and images (B, N, H, W, 3) (with image_mask (B, N)) shared by both answers. `pair_rows`
lays them out as 2B rows (2b chosen, 2b + 1 rejected, images repeated) for one forward of the one
model. `po_sums` returns sums over pairs, so micro-batches accumulate exactly (divide by 'pairs').
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from llvm_jax.train.loss import token_log_probs

Array = jax.Array

PAIR_KEYS = ("tokens", "segment_ids", "positions", "targets", "target_mask")
SHARED_KEYS = ("images", "image_mask")


def pair_rows(batch: Mapping[str, Array]) -> dict[str, Array]:
  """(B, 2, ...) pair fields -> (2B, ...) rows (2b chosen, 2b + 1 rejected); images repeated."""
  unknown = sorted(set(batch) - set(PAIR_KEYS) - set(SHARED_KEYS))
  if unknown:
    raise ValueError(f"pair_rows: unexpected batch keys {unknown}; known: {PAIR_KEYS + SHARED_KEYS}")
  rows = {}
  for key, value in batch.items():
    if key in PAIR_KEYS:
      if value.ndim < 2 or value.shape[1] != 2:
        raise ValueError(f"pair_rows: {key} must be (B, 2, S) (chosen, rejected), got {value.shape}")
      rows[key] = value.reshape((value.shape[0] * 2,) + value.shape[2:])
    else:
      rows[key] = jnp.repeat(value, 2, axis=0)
  return rows


def answer_log_probs(logits: Array, targets: Array, target_mask: Array) -> tuple[Array, Array]:
  """(sum of answer-token log-probs, answer length) per row, float32: logits (R, S, V), targets (R, S)."""
  mask = target_mask.astype(jnp.float32)
  return jnp.sum(token_log_probs(logits, targets) * mask, axis=-1), jnp.sum(mask, axis=-1)


def po_sums(logits: Array, batch: Mapping[str, Array], beta: float, gamma: float, lam: float) -> dict[str, Array]:
  """Sums over pairs of the PO terms and metrics; logits (2B, S, V) from `pair_rows(batch)`.

  Pairs where either answer has no answer tokens (batch padding) count for nothing.
  """
  b = batch["targets"].shape[0]
  logp, length = answer_log_probs(logits, batch["targets"].reshape(2 * b, -1), batch["target_mask"].reshape(2 * b, -1))
  normalised = (logp / jnp.maximum(length, 1.0)).reshape(b, 2)
  chosen, rejected = normalised[:, 0], normalised[:, 1]
  weight = jnp.all(length.reshape(b, 2) > 0, axis=1).astype(jnp.float32)
  margin = beta * (chosen - rejected)
  sft = -chosen
  pref = -jax.nn.log_sigmoid(margin - gamma)
  total = lambda x: jnp.sum(weight * x)
  return {
      "loss_sum": total(sft + lam * pref),
      "sft_sum": total(sft),
      "pref_sum": total(pref),
      "chosen_logp_sum": total(chosen),
      "rejected_logp_sum": total(rejected),
      "margin_sum": total(margin),
      "correct_sum": total((chosen > rejected).astype(jnp.float32)),
      "pairs": jnp.sum(weight),
  }


def po_loss_from_logits(
    logits: Array, batch: Mapping[str, Array], beta: float, gamma: float, lam: float
) -> tuple[Array, dict[str, Array]]:
  """(L_PO averaged over pairs, metrics) from logits (2B, S, V) of `pair_rows(batch)`.

  Metrics: sft_loss, pref_loss, chosen_logp / rejected_logp (length-normalised answer log-probs),
  reward_margin (β·(chosen − rejected)), preference_accuracy (chosen > rejected), pairs.
  """
  sums = po_sums(logits, batch, beta, gamma, lam)
  pairs = jnp.maximum(sums["pairs"], 1.0)
  metrics = {
      "po_loss": sums["loss_sum"] / pairs,
      "sft_loss": sums["sft_sum"] / pairs,
      "pref_loss": sums["pref_sum"] / pairs,
      "chosen_logp": sums["chosen_logp_sum"] / pairs,
      "rejected_logp": sums["rejected_logp_sum"] / pairs,
      "reward_margin": sums["margin_sum"] / pairs,
      "preference_accuracy": sums["correct_sum"] / pairs,
      "pairs": sums["pairs"],
  }
  return metrics["po_loss"], metrics


def po_loss(
    logits_fn: Callable[[Any, dict[str, Array]], Array],
    params: Any,
    batch: Mapping[str, Array],
    beta: float,
    gamma: float,
    lam: float,
) -> tuple[Array, dict[str, Array]]:
  """L_PO with one batched forward: `logits_fn(params, pair_rows(batch))` -> logits (2B, S, V)."""
  return po_loss_from_logits(logits_fn(params, pair_rows(batch)), batch, beta, gamma, lam)
