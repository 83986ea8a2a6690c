"""The one layer loop: scanned (with full remat) equals unrolled for each technique and their combinations,
forward, gradients and cached decoding. Phantom alone is in tests/test_phantom.py (the same check)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llvm_jax.models import decoder as decoder_lib
from llvm_jax.models.config import PhantomConfig, PmodConfig, TrolConfig
from llvm_jax.models.decoder import init_cache
from tests.model_helpers import LM as DecoderLM
from tests.model_helpers import TINY_DECODER, stacked

BASE = dataclasses.replace(TINY_DECODER, num_layers=4)
IMG, NUM_VISION, SEQ, PROMPT = 60, 8, 16, 12
RESIDUAL_LAYERS = (1, 2)
TECHNIQUES = {
    "trol": dict(trol=TrolConfig(layers=(0, 1, 2), gate_init="normal")),
    "phantom": dict(phantom=PhantomConfig(eta=0.5)),
    # Three MoD layers of different ratios: a scanned stack needs stages for them.
    "pmod": dict(
        pmod=PmodConfig(
            schedule="explicit", layers=(1, 2, 3), ratios=(0.75, 0.5, 0.25), scan_groups=2, router_init="torch"
        )
    ),
    "deepstack": {},
}
# Each technique alone (Phantom: test_phantom.py), the pairing with the most interplay (TroL reusing
# p-MoD's routing), all four.
LM = functools.partial(DecoderLM, image_token=IMG, num_vision=NUM_VISION)
COMBOS = [("trol",), ("pmod",), ("deepstack",), ("trol", "pmod"), tuple(TECHNIQUES)]


def _cfg(combo, **overrides):
  options = {}
  for name in combo:
    options.update(TECHNIQUES[name])
  return dataclasses.replace(BASE, **options, **overrides)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, IMG, (2, SEQ))
  tokens[:, 1 : 1 + NUM_VISION] = IMG
  residuals = rng.normal(size=(len(RESIDUAL_LAYERS), 2, SEQ, BASE.embed_dim)) * (tokens == IMG)[None, :, :, None]
  return jnp.asarray(tokens), jnp.asarray(residuals, jnp.float32)


@pytest.mark.parametrize("combo", COMBOS, ids="+".join)
def test_scanned_equals_unrolled(combo, batch):
  tokens, residuals = batch
  residuals = residuals if "deepstack" in combo else None
  cfg = _cfg(combo)
  init = jax.jit(lambda key, t, r: LM(cfg).init(key, t, residuals=r, residual_layers=RESIDUAL_LAYERS))
  params = nn.unbox(init(jax.random.key(0), tokens, residuals)["params"])

  def loss_and_grads(config, p):
    loss = (
        lambda p: jnp.sum(
            LM(config).apply({"params": p}, tokens, residuals=residuals, residual_layers=RESIDUAL_LAYERS)[0] ** 2
        )
        / tokens.size
    )
    return jax.jit(jax.value_and_grad(loss))(p)

  loss, grads = loss_and_grads(cfg, params)
  scan_loss, scan_grads = loss_and_grads(_cfg(combo, scan_layers=True, remat_policy="full"), stacked(params, 4))
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), scan_grads, stacked(grads, 4))


def test_pmod_scan_stages():
  cfg = _cfg(("pmod",), scan_layers=True)
  # Layer 0 is dense; layers 1-3 split in two stages sized by their largest ratio.
  assert [(s.start, s.stop) for s in decoder_lib.layer_plan(cfg)] == [(0, 1), (1, 3), (3, 4)]
  assert [(s.start, s.stop) for s in decoder_lib.layer_plan(_cfg(("pmod",)))] == [(i, i + 1) for i in range(4)]


@pytest.mark.parametrize("combo", [("pmod",), ("trol", "phantom", "pmod")], ids="+".join)
def test_scanned_cached_decoding_equals_full_sequence(combo, batch):
  tokens, _ = batch
  cfg = _cfg(combo, scan_layers=True)
  unrolled = _cfg(combo)
  params = nn.unbox(jax.jit(LM(unrolled).init)(jax.random.key(0), tokens)["params"])
  full = jax.jit(lambda p, t: LM(unrolled).apply({"params": p}, t)[0])(params, tokens)
  model = LM(cfg)
  prefill = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c, decode=True, num_vision=0))
  params = stacked(params, 4)
  logits, cache = prefill(params, tokens[:, :PROMPT], init_cache(cfg, 2, SEQ, num_vision=NUM_VISION))
  outs = [logits]
  for i in range(PROMPT, SEQ):
    logits, cache = step(params, tokens[:, i : i + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=2e-5, atol=2e-5)
