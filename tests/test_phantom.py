"""Phantom dimension: attention against the formulas, near-no-op init, padding / packing, both cache
modes, parameter count, GQA, scan / remat, and TroL composition."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llvm_jax.models import hooks, masks, phantom
from llvm_jax.models.attention import einsum_attention
from llvm_jax.models.config import PhantomConfig, TrolConfig
from llvm_jax.models.decoder import init_cache
from llvm_jax.train import optim, trainer
from llvm_jax.tree_utils import flatten
from tests.model_helpers import LM, TINY_DECODER, stacked

BASE = dataclasses.replace(TINY_DECODER, num_layers=2)
D = BASE.head_dim
SEQ, PROMPT = 12, 7
# A large eta so that the phantom branch moves the logits well above the tolerances below.
STRONG = 0.5
TOL = 1e-5


def _cfg(eta=STRONG, cache="expanded", eta_learnable=False, **options):
  return dataclasses.replace(BASE, phantom=PhantomConfig(eta=eta, cache=cache, eta_learnable=eta_learnable), **options)


@jax.jit
def _forward_strong(params, tokens, segment_ids):
  return LM(_cfg()).apply({"params": params}, tokens, segment_ids)[0]


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


def _strip_phantom(tree):
  if isinstance(tree, dict):
    return {k: _strip_phantom(v) for k, v in tree.items() if k != "phantom"}
  return tree


def _stacked(params):
  return stacked(params, BASE.num_layers)


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.PRNGKey(1), (3, SEQ), 0, BASE.vocab_size)


@pytest.fixture(scope="module")
def params(tokens):
  init = jax.jit(lambda t: LM(_cfg()).init(jax.random.PRNGKey(0), t, jnp.ones(t.shape, jnp.int32))["params"])
  return nn.unbox(init(tokens))


# -- the attention against the formulas ------------------------------------------------------------
def _gelu(x):
  return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _xattn(p, x, s):
  """XAttn for one token: x (H, d) attends over the heads of its sos s (H, d); kernels are (in, out)."""
  a, b, c = _gelu(x @ p["q"]["kernel"]), _gelu(s @ p["k"]["kernel"]), _gelu(s @ p["v"]["kernel"])
  return _gelu((_softmax(a @ b.T / math.sqrt(D)) @ c) @ p["o"]["kernel"])


def _reference(p, q, k, v, segments, eta):
  """Phantom attention written out with loops, the official way: K/V repeated to H heads first."""
  p = jax.tree.map(np.asarray, p)
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  bsz, t = segments.shape
  out = np.zeros(q.shape)
  for b in range(bsz):
    sos = {s: int(np.argmax(segments[b] == s)) for s in set(segments[b].tolist()) - {0}}
    qs, ks, vs = np.zeros(q[b].shape), np.zeros(k[b].shape), np.zeros(v[b].shape)
    for i in range(t):
      if segments[b, i]:
        j = sos[segments[b, i]]
        qs[i] = eta * _xattn(p["xattn_q"], q[b, i], q[b, j])
        ks[i] = eta * _xattn(p["xattn_k"], k[b, i], k[b, j])
        vs[i] = v[b, i] + eta * _xattn(p["xattn_v"], v[b, i], v[b, j])
    q2, k2, v2 = (np.concatenate(pair, axis=-1) for pair in ((q[b], qs), (k[b], ks), (v[b], vs)))
    for i in range(t):
      if not segments[b, i]:
        continue
      keys = [j for j in range(i + 1) if segments[b, j] == segments[b, i]]
      for h in range(q.shape[2]):
        probs = _softmax(np.array([q2[i, h] @ k2[j, h] for j in keys]) / math.sqrt(D))
        o = sum(pr * v2[j, h] for pr, j in zip(probs, keys))
        o1, o2 = o[:D], o[D:]
        z = (o1 @ p["gate_1"]["kernel"] + p["gate_1"]["bias"]) - (o2 @ p["gate_2"]["kernel"] + p["gate_2"]["bias"])
        g = 1.0 / (1.0 + np.exp(-z))
        out[b, i, h] = g * o1 + (1 - g) * o2
  return out


def test_attention_against_reference(params):
  cfg = _cfg()
  rng = jax.random.split(jax.random.PRNGKey(5), 3)
  bsz, t = 3, 7
  q = jax.random.normal(rng[0], (bsz, t, BASE.num_heads, D))
  k = jax.random.normal(rng[1], (bsz, t, BASE.num_kv_heads, D))
  v = jax.random.normal(rng[2], (bsz, t, BASE.num_kv_heads, D))
  # Left-padded, packed (two segments, right-padded), plain.
  segments = jnp.array([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2, 0], [1] * 7], jnp.int32)
  mask = masks.self_attention(segments, masks.default_positions(segments))
  ctx = hooks.LayerContext(None, None, mask, 0)
  p = params["decoder"]["layers_0"]["attn"]["phantom"]
  got, cache = jax.jit(phantom.Phantom(cfg).apply)({"params": p}, q, k, v, ctx, None)
  assert cache is None and got.shape == q.shape
  valid = np.asarray(segments != 0)[..., None, None]
  expected = _reference(p, q, k, v, np.asarray(segments), STRONG)
  np.testing.assert_allclose(np.where(valid, got, 0), expected, rtol=TOL, atol=TOL)
  # The phantom branch matters at this eta: plain attention is far from it.
  plain = einsum_attention(q, k, v, mask.dense(), D**-0.5)
  assert np.abs(np.where(valid, got - plain, 0)).max() > 1e-2


def test_sos_slots_follow_segments():
  q_segments = jnp.array([[0, 0, 1, 1], [1, 1, 2, 0]], jnp.int32)
  self_mask = masks.self_attention(q_segments, masks.default_positions(q_segments))
  np.testing.assert_array_equal(phantom.sos_slots(self_mask), [[-1, -1, 2, 2], [0, 0, 2, -1]])
  # With a cache: a right-padded prompt then a decode token of segment 1 at slot 5.
  k_segments = jnp.array([[1, 1, 1, 0, 0, 1, 0]], jnp.int32)
  k_slots = jnp.arange(7, dtype=jnp.int32)[None]
  one = jnp.array([[1]], jnp.int32)
  cached = masks.MaskInfo(one, one * 5, one, k_segments, k_slots, k_slots)
  np.testing.assert_array_equal(phantom.sos_slots(cached), [[0]])
  # Keys sliced out of a cache (TroL's 'official' second pass) keep their absolute slots.
  np.testing.assert_array_equal(phantom.sos_slots(cached.keys_slice(5, 2)), [[5]])


# -- parameters ------------------------------------------------------------------------------------
def test_added_parameters_and_gqa_shapes(params, tokens):
  base = _strip_phantom(params)
  added = _count(params) - _count(base)
  assert added == BASE.num_layers * (12 * D * D + 2 * D + 2) == BASE.num_layers * phantom.added_params_per_layer(BASE)
  attn = params["decoder"]["layers_1"]["attn"]
  assert attn["k"]["kernel"].shape == (BASE.embed_dim, BASE.num_kv_heads, D)
  for name in ("xattn_q", "xattn_k", "xattn_v"):
    assert {n: w["kernel"].shape for n, w in attn["phantom"][name].items()} == {n: (D, D) for n in "qkvo"}
  assert attn["phantom"]["gate_1"]["kernel"].shape == (D, 1) and attn["phantom"]["gate_1"]["bias"].shape == (1,)
  # 'torch' init: nn.Linear's U(±1/√d) for every weight and bias.
  leaves = np.concatenate([np.ravel(x) for x in jax.tree.leaves(attn["phantom"])])
  assert np.abs(leaves).max() <= D**-0.5 and leaves.std() > 0.5 * D**-0.5 / math.sqrt(3)
  # Logical axis names and param_dtype.
  boxed = jax.eval_shape(
      lambda: LM(_cfg(param_dtype="bfloat16")).init(jax.random.PRNGKey(0), tokens, jnp.ones(tokens.shape, jnp.int32))
  )["params"]
  boxed_phantom = boxed["decoder"]["layers_0"]["attn"]["phantom"]
  assert boxed_phantom["xattn_k"]["q"]["kernel"].names == ("head_dim", "phantom_head_dim")
  assert boxed_phantom["gate_2"]["bias"].names == ("phantom_gate",)
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(boxed_phantom))} == {jnp.dtype(jnp.bfloat16)}


def test_cache_shapes():
  bsz, hkv = 2, BASE.num_kv_heads
  expanded = init_cache(_cfg(cache="expanded"), bsz, 16)["layers"][0]
  recompute = init_cache(_cfg(cache="recompute"), bsz, 16)["layers"][0]
  assert expanded["k"].shape == expanded["v"].shape == (bsz, 16, hkv, 2 * D)
  assert recompute["k"].shape == recompute["v"].shape == (bsz, 16, hkv, D)
  sos = jax.tree.map(jnp.shape, recompute[phantom.SOS_CACHE_KEY])
  assert sos == {"q": (bsz, 1, BASE.num_heads, D), "k": (bsz, 1, hkv, D), "v": (bsz, 1, hkv, D)}


# -- the model -------------------------------------------------------------------------------------
def test_near_no_op_at_init(params, tokens):
  segment_ids = jnp.ones(tokens.shape, jnp.int32)
  base = LM(BASE).apply({"params": _strip_phantom(params)}, tokens, segment_ids)[0]
  on = LM(_cfg(eta=1e-4)).apply({"params": params}, tokens, segment_ids)[0]
  relative = float(jnp.abs(on - base).max() / jnp.abs(base).max())
  print(f"phantom eta=1e-4 vs off: max relative logit difference {relative:.2e}")
  assert 0 < relative < 1e-3


def test_padding_and_packing_give_each_sequence_its_own_logits(params, tokens):
  segment_ids = jnp.array([[1] * SEQ, [0] * 3 + [1] * 9, [1] * 9 + [0] * 3], jnp.int32)  # left-padded  # right-padded
  batch = _forward_strong(params, tokens, segment_ids)
  alone = lambda row, lo, hi: _forward_strong(params, tokens[row : row + 1, lo:hi], jnp.ones((1, hi - lo), jnp.int32))[
      0
  ]
  np.testing.assert_allclose(batch[1, 3:], alone(1, 3, SEQ), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(batch[2, :9], alone(2, 0, 9), rtol=TOL, atol=TOL)
  # A packed row: two segments, each with its own sos.
  packed = _forward_strong(params, tokens[:1], jnp.array([[1] * 5 + [2] * 7], jnp.int32))[0]
  np.testing.assert_allclose(packed[:5], alone(0, 0, 5), rtol=TOL, atol=TOL)
  np.testing.assert_allclose(packed[5:], alone(0, 5, SEQ), rtol=TOL, atol=TOL)


def _incremental(cfg, params, tokens, segment_ids):
  """Prefill the first PROMPT tokens, then one decode step per remaining token; logits concatenated."""
  model = LM(cfg)
  prefill = jax.jit(lambda p, t, s, c: model.apply({"params": p}, t, s, c))
  step = jax.jit(lambda p, t, s, c: model.apply({"params": p}, t, s, c, decode=True))
  cache = init_cache(cfg, tokens.shape[0], SEQ + 2)
  logits, cache = prefill(params, tokens[:, :PROMPT], segment_ids[:, :PROMPT], cache)
  outs = [logits]
  for i in range(PROMPT, tokens.shape[1]):
    logits, cache = step(params, tokens[:, i : i + 1], segment_ids[:, i : i + 1], cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


# Full row; left-padded row; packed prompt (segments 1 and 2) whose decoding continues segment 2.
CACHE_SEGMENTS = [[1] * SEQ, [0] * 3 + [1] * 9, [1] * 3 + [2] * 9]


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("cache", ["expanded", "recompute"])
def test_decoding_equals_full_sequence(cache, scan_layers, params, tokens):
  segment_ids = jnp.array(CACHE_SEGMENTS, jnp.int32)
  full = _forward_strong(params, tokens, segment_ids)
  cfg = _cfg(cache=cache, scan_layers=scan_layers)
  incremental = _incremental(cfg, _stacked(params) if scan_layers else params, tokens, segment_ids)
  valid = (segment_ids != 0)[..., None]
  np.testing.assert_allclose(jnp.where(valid, incremental, 0), jnp.where(valid, full, 0), rtol=TOL, atol=TOL)


def test_scanned_and_rematerialised_match_unscanned(params, tokens):
  segment_ids = jnp.array(CACHE_SEGMENTS, jnp.int32)

  def loss_and_grad(cfg, p):
    loss = lambda p: jnp.mean(jnp.square(LM(cfg).apply({"params": p}, tokens, segment_ids)[0]))
    return jax.jit(jax.value_and_grad(loss))(p)

  loss, grads = loss_and_grad(_cfg(), params)
  scanned_loss, scanned_grads = loss_and_grad(_cfg(scan_layers=True, remat_policy="full"), _stacked(params))
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), scanned_grads, _stacked(grads))
  # Phantom parameters get gradients.
  assert float(jnp.abs(grads["decoder"]["layers_0"]["attn"]["phantom"]["xattn_k"]["q"]["kernel"]).max()) > 0


def test_with_trol_decoding_equals_full_sequence(params, tokens):
  cfg = _cfg(trol=TrolConfig(decode_traversal="full", gate_init="normal"))
  segment_ids = jnp.array(CACHE_SEGMENTS, jnp.int32)
  trol_gate = {
      "kernel": 0.3 * jax.random.normal(jax.random.PRNGKey(7), (BASE.num_layers, BASE.embed_dim)),
      "bias": jnp.zeros((BASE.num_layers,)),
  }
  both = dict(params, decoder=dict(params["decoder"], trol_gate=trol_gate))
  full = jax.jit(lambda p: LM(cfg).apply({"params": p}, tokens, segment_ids)[0])(both)
  assert np.abs(full - _forward_strong(params, tokens, segment_ids)).max() > 1e-2  # TroL is on
  incremental = _incremental(cfg, both, tokens, segment_ids)
  valid = (segment_ids != 0)[..., None]
  np.testing.assert_allclose(jnp.where(valid, incremental, 0), jnp.where(valid, full, 0), rtol=TOL, atol=TOL)


# -- eta: fixed (no parameter) or learnable (one float32 parameter per layer) -----------------------
def _with_eta(params, values):
  """A copy of (unscanned) `params` with each layer's phantom/eta set to values[i]."""
  params = jax.tree.map(lambda x: x, params)
  for i, value in enumerate(values):
    params["decoder"][f"layers_{i}"]["attn"]["phantom"]["eta"] = jnp.full((1,), value, jnp.float32)
  return params


def test_learnable_eta_parameters(params, tokens):
  # Fixed (the default): no eta anywhere in the tree.
  assert not [k for k in flatten(params) if k.endswith("/eta")]
  cfg = _cfg(param_dtype="bfloat16")
  learnable = dataclasses.replace(cfg, phantom=dataclasses.replace(cfg.phantom, eta_learnable=True))
  boxed = jax.eval_shape(lambda: LM(learnable).init(jax.random.PRNGKey(0), tokens, jnp.ones(tokens.shape, jnp.int32)))[
      "params"
  ]
  etas = {k: v for k, v in flatten(nn.unbox(boxed)).items() if k.endswith("/eta")}
  assert set(etas) == {f"decoder/layers_{i}/attn/phantom/eta" for i in range(BASE.num_layers)}
  assert {(v.shape, v.dtype) for v in etas.values()} == {((1,), jnp.dtype(jnp.float32))}  # float32 under bf16
  assert boxed["decoder"]["layers_0"]["attn"]["phantom"]["eta"].names == ("phantom_eta",)
  assert phantom.added_params_per_layer(learnable) == phantom.added_params_per_layer(cfg) + 1
  init = jax.jit(lambda t: LM(_cfg(eta_learnable=True)).init(jax.random.PRNGKey(0), t, jnp.ones(t.shape, jnp.int32)))
  init = nn.unbox(init(tokens))
  for i in range(BASE.num_layers):
    np.testing.assert_array_equal(init["params"]["decoder"][f"layers_{i}"]["attn"]["phantom"]["eta"], [STRONG])
  # Trained wherever the phantom modules are: PO step 1's stage rule and init_hf's fresh-parameter rule.
  labels = flatten(optim.group_labels(_with_eta(params, [STRONG] * 2), optim.STAGE_RULES["po1"]))
  assert labels["decoder/layers_1/attn/phantom/eta"] == labels["decoder/layers_1/attn/phantom/gate_1/bias"] != "frozen"
  assert trainer.TECHNIQUE_PARAMS.match("decoder/layers/layer/attn/phantom/eta")
  # A learnable eta starts > 0; a fixed one may be anything, as before.
  with pytest.raises(ValueError, match="eta must be a finite number > 0"):
    PhantomConfig(eta=0.0, eta_learnable=True)
  PhantomConfig(eta=0.0), PhantomConfig(eta=-1.0)


def test_learnable_eta_matches_fixed_at_init_and_gets_gradients(params, tokens):
  segment_ids = jnp.array(CACHE_SEGMENTS, jnp.int32)
  learnable = _with_eta(params, [STRONG] * BASE.num_layers)
  cfg = _cfg(eta_learnable=True)
  got = jax.jit(lambda p: LM(cfg).apply({"params": p}, tokens, segment_ids)[0])(learnable)
  np.testing.assert_array_equal(got, _forward_strong(params, tokens, segment_ids))

  def loss_and_grad(cfg, p):
    loss = lambda p: jnp.mean(jnp.square(LM(cfg).apply({"params": p}, tokens, segment_ids)[0]))
    return jax.jit(jax.value_and_grad(loss))(p)

  # Per-layer values away from the init, so each layer must read its own eta.
  moved = _with_eta(params, [0.3, 0.7])
  loss, grads = loss_and_grad(cfg, moved)
  for i in range(BASE.num_layers):
    assert float(jnp.abs(grads["decoder"][f"layers_{i}"]["attn"]["phantom"]["eta"]).max()) > 0
  scanned_loss, scanned_grads = loss_and_grad(_cfg(eta_learnable=True, scan_layers=True), _stacked(moved))
  np.testing.assert_allclose(scanned_loss, loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), scanned_grads, _stacked(grads))


@pytest.mark.parametrize("cache", ["expanded", "recompute"])
def test_learnable_eta_decoding_equals_full_sequence(cache, params, tokens):
  segment_ids = jnp.array(CACHE_SEGMENTS, jnp.int32)
  moved = _stacked(_with_eta(params, [0.3, 0.7]))
  cfg = _cfg(cache=cache, eta_learnable=True, scan_layers=True)
  full = jax.jit(lambda p: LM(cfg).apply({"params": p}, tokens, segment_ids)[0])(moved)
  assert np.abs(full - _forward_strong(params, tokens, segment_ids)).max() > 1e-3  # the etas are read
  incremental = _incremental(cfg, moved, tokens, segment_ids)
  valid = (segment_ids != 0)[..., None]
  np.testing.assert_allclose(jnp.where(valid, incremental, 0), jnp.where(valid, full, 0), rtol=TOL, atol=TOL)
