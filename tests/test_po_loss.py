"""Phantom Optimization: the loss against hand-computed values, the paired single forward, a few
Adam steps on one triple, and the stage-1 / stage-2 trainable patterns."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llvm_jax import config_utils
from llvm_jax.models.config import PhantomConfig
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import optim
from llvm_jax.train.po_loss import pair_rows, po_loss
from llvm_jax.tree_utils import flatten

BETA, GAMMA, LAM = 2.0, 1.0, 0.5
LN2 = math.log(2.0)


def _logits_from_probs(target_probs, targets, vocab=4):
  """Logits whose softmax gives probability target_probs[r, t] to targets[r, t] (rest uniform)."""
  rows, seq = targets.shape
  probs = np.zeros((rows, seq, vocab))
  for r in range(rows):
    for t in range(seq):
      probs[r, t] = (1.0 - target_probs[r, t]) / (vocab - 1)
      probs[r, t, targets[r, t]] = target_probs[r, t]
  return jnp.asarray(np.log(probs), jnp.float32)


def test_po_loss_against_hand_computed_values():
  # Three pairs (chosen, rejected) of 3 positions; the third pair is batch padding (no answer tokens).
  targets = np.array([[[0, 1, 2], [0, 3, 0]], [[0, 0, 0], [1, 2, 3]], [[0, 0, 0], [0, 0, 0]]])
  target_mask = np.array([[[0, 1, 1], [0, 1, 0]], [[1, 0, 0], [1, 1, 1]], [[0, 0, 0], [0, 0, 0]]], np.float32)
  target_probs = np.full((6, 3), 0.9)
  target_probs[0, 1:] = [0.5, 0.25]  # pair 0 chosen: r_w = (ln 1/2 + ln 1/4) / 2 = -1.5 ln 2
  target_probs[1, 1] = 0.125  # pair 0 rejected: r_l = -3 ln 2
  target_probs[2, 0] = 0.1  # pair 1 chosen: r_w = ln 0.1
  target_probs[3] = 0.5  # pair 1 rejected: r_l = ln 0.5
  logits = _logits_from_probs(target_probs, targets.reshape(6, 3))
  tokens = np.array([[[10 * b + c] * 3 for c in range(2)] for b in range(3)], np.int32)
  batch = {
      "tokens": jnp.asarray(tokens),
      "segment_ids": jnp.ones((3, 2, 3), jnp.int32),
      "positions": jnp.broadcast_to(jnp.arange(3), (3, 2, 3)),
      "targets": jnp.asarray(targets),
      "target_mask": jnp.asarray(target_mask),
      "images": jnp.arange(3.0).reshape(3, 1, 1, 1, 1) * jnp.ones((3, 2, 2, 2, 3)),  # pair b's pixels all b
      "image_mask": jnp.array([[True, False], [True, True], [False, False]]),
  }
  calls = []

  def logits_fn(params, rows):
    calls.append(rows)
    return logits * params

  loss, metrics = po_loss(logits_fn, 1.0, batch, BETA, GAMMA, LAM)
  # One forward over 2B rows: 2b chosen, 2b + 1 rejected, the images of pair b repeated.
  assert len(calls) == 1
  rows = calls[0]
  np.testing.assert_array_equal(rows["tokens"][:, 0], [0, 1, 10, 11, 20, 21])
  np.testing.assert_array_equal(rows["images"][:, 0, 0, 0, 0], [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(rows["image_mask"], [[1, 0], [1, 0], [1, 1], [1, 1], [0, 0], [0, 0]])
  assert rows["targets"].shape == rows["target_mask"].shape == (6, 3)

  sft = [1.5 * LN2, math.log(10.0)]
  pref = [math.log(1 + math.e / 8), math.log(1 + 25 * math.e)]  # -log σ(3 ln 2 - 1), -log σ(-2 ln 5 - 1)
  expected = {
      "po_loss": (sft[0] + LAM * pref[0] + sft[1] + LAM * pref[1]) / 2,
      "sft_loss": sum(sft) / 2,
      "pref_loss": sum(pref) / 2,
      "chosen_logp": (-1.5 * LN2 + math.log(0.1)) / 2,
      "rejected_logp": (-3 * LN2 + math.log(0.5)) / 2,
      "reward_margin": (3 * LN2 - 2 * math.log(5.0)) / 2,
      "preference_accuracy": 0.5,
      "pairs": 2.0,
  }
  assert set(metrics) == set(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-6, err_msg=name)
  assert float(loss) == float(metrics["po_loss"])


def test_pair_rows_rejects_unpaired_fields():
  with pytest.raises(ValueError, match=r"\(B, 2, S\)"):
    pair_rows({"tokens": jnp.zeros((2, 3, 5), jnp.int32)})
  with pytest.raises(ValueError, match="unexpected batch keys"):
    pair_rows({"tokens": jnp.zeros((2, 2, 5), jnp.int32), "labels": jnp.zeros((2, 2, 5))})


# -- a tiny LLVM with Phantom ----------------------------------------------------------------------
CFG = dataclasses.replace(
    config_utils.tiny_llvm(), decoder=dataclasses.replace(config_utils.tiny_llvm().decoder, phantom=PhantomConfig())
)
PROMPT = [1] + [CFG.image_token_id] * CFG.tokens_per_image + [7, 8, 9]
CHOSEN, REJECTED = [20, 21, 22, 2], [30, 31, 2]


def _triple():
  """One preference triple (B = 1), right-padded to a common length."""
  seq = len(PROMPT) + max(len(CHOSEN), len(REJECTED))
  fields = {k: np.zeros((1, 2, seq), np.int32) for k in ("tokens", "segment_ids", "positions", "targets")}
  target_mask = np.zeros((1, 2, seq), np.float32)
  for c, answer in enumerate((CHOSEN, REJECTED)):
    ids = PROMPT + answer
    n = len(ids)
    fields["tokens"][0, c, :n] = ids
    fields["segment_ids"][0, c, :n] = 1
    fields["positions"][0, c, :n] = np.arange(n)
    fields["targets"][0, c, : n - 1] = ids[1:]
    target_mask[0, c, len(PROMPT) - 1 : n - 1] = 1.0  # positions predicting the answer tokens
  images = jax.random.normal(jax.random.PRNGKey(3), (1, 1, CFG.vision.image_size, CFG.vision.image_size, 3))
  return {
      **{k: jnp.asarray(v) for k, v in fields.items()},
      "target_mask": jnp.asarray(target_mask),
      "images": images,
      "image_mask": jnp.ones((1, 1), bool),
  }


@pytest.fixture(scope="module")
def setup():
  model = LLVM(CFG)
  batch = _triple()
  rows = pair_rows(batch)
  params = jax.jit(
      lambda: nn.unbox(
          model.init(
              jax.random.PRNGKey(0),
              rows["tokens"],
              images=rows["images"],
              image_mask=rows["image_mask"],
              segment_ids=rows["segment_ids"],
              positions=rows["positions"],
          )["params"]
      )
  )()

  def logits_fn(params, rows):
    return model.apply(
        {"params": params},
        rows["tokens"],
        images=rows["images"],
        image_mask=rows["image_mask"],
        segment_ids=rows["segment_ids"],
        positions=rows["positions"],
    )[0]

  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: po_loss(logits_fn, p, b, BETA, GAMMA, LAM), has_aux=True))
  return params, batch, grad_fn


def test_adam_steps_raise_chosen_and_lower_rejected(setup):
  params, batch, grad_fn = setup
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  (_, first), grads = grad_fn(params, batch)
  # The rejected answer shares the prompt, so it first moves with the chosen one; the preference
  # term separates them within ten steps (five sufficed for one initialisation, not another).
  for _ in range(10):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    (_, last), grads = grad_fn(params, batch)
  for name in ("po_loss", "chosen_logp", "rejected_logp", "reward_margin"):
    print(f"{name}: {float(first[name]):.4f} -> {float(last[name]):.4f}")
  assert float(last["chosen_logp"]) > float(first["chosen_logp"]) + 0.1
  assert float(last["rejected_logp"]) < float(first["rejected_logp"]) - 0.1
  assert float(last["po_loss"]) < float(first["po_loss"]) and float(last["preference_accuracy"]) == 1.0


def test_stage_patterns(setup):
  params, batch, grad_fn = setup
  paths = list(flatten(params))
  stage1 = optim.STAGE_RULES["po1"]  # the trainer's own presets
  trained = {path for path, on in flatten(optim.trainable_mask(params, stage1)).items() if on}
  assert trained == {p for p in paths if p.startswith("projector/") or "/attn/phantom/" in p}
  assert any("/attn/phantom/" in p for p in trained) and any(p.startswith("projector/") for p in trained)
  stage2 = optim.STAGE_RULES["po2"]
  assert all(flatten(optim.trainable_mask(params, stage2)).values())
  # One stage-1 step: the LLM and the vision tower stay bit-identical, the phantom modules move.
  labels = optim.group_labels(params, stage1)
  tx = optax.multi_transform({"lr_x1.0": optax.adam(1e-3), optim.FROZEN: optax.set_to_zero()}, labels)
  _, grads = grad_fn(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params)
  after = flatten(optax.apply_updates(params, updates))
  moved = {path for path, value in flatten(params).items() if not np.array_equal(value, after[path])}
  assert moved and moved <= trained and any("/attn/phantom/xattn_v/" in p for p in moved)
