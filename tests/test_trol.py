"""TroL (traversal of layers): the mixer, both cache modes, scan/remat, gate-only training, accounting."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llvm_jax import flops
from llvm_jax.models import trol
from llvm_jax.models.config import LLVMConfig, TrolConfig
from llvm_jax.models.decoder import init_cache
from llvm_jax.train import optim
from tests.model_helpers import LM, TINY_DECODER, run_layer, stacked

BASE = dataclasses.replace(TINY_DECODER, num_layers=3)
BATCH, SEQ, PROMPT = 2, 12, 7
TOL = 1e-5


def _cfg(scan_layers=False, remat_policy=None, **trol_options):
  return dataclasses.replace(BASE, scan_layers=scan_layers, remat_policy=remat_policy, trol=TrolConfig(**trol_options))


def _forward(cfg):
  return jax.jit(lambda params, tokens: LM(cfg).apply({"params": params}, tokens)[0])


def _count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.PRNGKey(1), (BATCH, SEQ), 0, BASE.vocab_size)


@pytest.fixture(scope="module")
def base_params(tokens):
  return nn.unbox(jax.jit(LM(BASE).init)(jax.random.PRNGKey(0), tokens)["params"])


@pytest.fixture(scope="module")
def base_logits(base_params, tokens):
  return _forward(BASE)(base_params, tokens)


def _with_gates(base_params, kernel, bias):
  """The base model's parameters plus TroL gates (kernel (G, D), bias (G,))."""
  decoder = dict(base_params["decoder"], trol_gate={"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)})
  return dict(base_params, decoder=decoder)


def _random_gates(cfg, seed=2):
  g = trol.num_gates(cfg)
  kk, kb = jax.random.split(jax.random.PRNGKey(seed))
  # Large enough that w varies over (0, 1) from token to token.
  return 0.3 * jax.random.normal(kk, (g, BASE.embed_dim)), 0.5 * jax.random.normal(kb, (g,))


def _stacked(params):
  return stacked(params, BASE.num_layers)


def _incremental(cfg, params, tokens, steps_from):
  """Prefill tokens[:, :steps_from], then one decode step per remaining token; logits concatenated."""
  model = LM(cfg)
  prefill = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  step = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c, decode=True))
  logits, cache = prefill(params, tokens[:, :steps_from], init_cache(cfg, tokens.shape[0], SEQ + 4))
  outs = [logits]
  for i in range(steps_from, tokens.shape[1]):
    logits, cache = step(params, tokens[:, i : i + 1], cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("shared_gate", [False, True])
def test_closed_gate_reproduces_base_model_exactly(shared_gate, base_params, base_logits, tokens):
  cfg = _cfg(shared_gate=shared_gate)
  kernel, _ = _random_gates(cfg)
  # tanh(-1e4) == -1 in float32, so w == 0 for every token.
  params = _with_gates(base_params, kernel, jnp.full((trol.num_gates(cfg),), -1e4))
  np.testing.assert_array_equal(_forward(cfg)(params, tokens), base_logits)


def test_open_gate_applies_each_layer_twice(base_params, tokens):
  cfg = _cfg()
  kernel, _ = _random_gates(cfg)
  params = _with_gates(base_params, kernel, jnp.full((trol.num_gates(cfg),), 1e4))
  # Reference: a plain model of 2L layers where layers 2i and 2i+1 both hold layer i's weights.
  doubled_cfg = dataclasses.replace(BASE, num_layers=2 * BASE.num_layers)
  doubled = dict(base_params["decoder"])
  for i in range(BASE.num_layers):
    doubled.pop(f"layers_{i}")
  for i in range(2 * BASE.num_layers):
    doubled[f"layers_{i}"] = base_params["decoder"][f"layers_{i // 2}"]
  expected = _forward(doubled_cfg)({"decoder": doubled}, tokens)
  np.testing.assert_array_equal(_forward(cfg)(params, tokens), expected)


def test_mixer_against_formula():
  k = jax.random.split(jax.random.PRNGKey(3), 4)
  h1 = np.asarray(jax.random.normal(k[0], (2, 5, 16)))
  h2 = np.asarray(jax.random.normal(k[1], (2, 5, 16)))
  a = np.asarray(jax.random.normal(k[2], (16,)))
  b = 0.3
  w = 0.5 * np.tanh(np.einsum("btd,d->bt", h1, a) + b)[..., None] + 0.5
  assert w.min() < 0.1 and w.max() > 0.9  # the test reaches both ends of the gate
  np.testing.assert_allclose(
      trol.mix(jnp.asarray(h1), jnp.asarray(h2), jnp.asarray(a), jnp.asarray(b)),
      (1 - w) * h1 + w * h2,
      rtol=1e-6,
      atol=1e-6,
  )


def _reference_logits(cfg, params, tokens):
  """TroL written out from the formula: a loop over layers with numpy mixing."""
  dec = params["decoder"]
  segment_ids = jnp.ones(tokens.shape, jnp.int32)
  layer = lambda i, h: np.asarray(run_layer(BASE, dec[f"layers_{i}"], h, segment_ids))
  kernel, bias = np.asarray(dec["trol_gate"]["kernel"]), np.asarray(dec["trol_gate"]["bias"])
  traversed = range(cfg.num_layers) if cfg.trol.layers is None else cfg.trol.layers
  h = np.asarray(dec["embedding"])[np.asarray(tokens)]
  gate = 0
  for i in range(cfg.num_layers):
    h1 = layer(i, h)
    if i not in traversed:
      h = h1
      continue
    h2 = layer(i, h1)
    w = 0.5 * np.tanh(h1 @ kernel[gate] + bias[gate])[..., None] + 0.5
    h = (1 - w) * h1 + w * h2
    gate += not cfg.trol.shared_gate
  h = h / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + cfg.norm_eps) * np.asarray(dec["final_norm"]["scale"])
  return h @ np.asarray(dec["lm_head"]["kernel"])


@pytest.mark.parametrize("options", [dict(), dict(shared_gate=True), dict(layers=(0, 2))])
def test_model_against_reference(options, base_params, base_logits, tokens):
  cfg = _cfg(**options)
  params = _with_gates(base_params, *_random_gates(cfg))
  got = _forward(cfg)(params, tokens)
  np.testing.assert_allclose(got, _reference_logits(cfg, params, tokens), rtol=TOL, atol=TOL)
  assert np.abs(got - base_logits).max() > 1e-2  # traversal changes the function


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("layers", [None, (0, 2)])
def test_full_decoding_equals_full_sequence(scan_layers, layers, base_params, tokens):
  cfg = _cfg(scan_layers=scan_layers, layers=layers, decode_traversal="full")
  params = _with_gates(base_params, *_random_gates(cfg))
  full = _forward(_cfg(layers=layers))(params, tokens)
  if scan_layers:
    params = _stacked(params)
  incremental, cache = _incremental(cfg, params, tokens, PROMPT)
  np.testing.assert_allclose(incremental, full, rtol=TOL, atol=TOL)
  # Pass-2 caches exist exactly where layers traverse (every layer of a scanned stack).
  if not scan_layers:
    assert [trol.PASS2_CACHE_KEY in c for c in cache["layers"]] == [i in (layers or range(3)) for i in range(3)]


@pytest.mark.parametrize("scan_layers,layers", [(False, None), (True, (0, 2))])
def test_official_decoding(scan_layers, layers, base_params, tokens):
  cfg = _cfg(scan_layers=scan_layers, layers=layers, decode_traversal="official")
  params = _with_gates(base_params, *_random_gates(cfg))
  full = _forward(_cfg(layers=layers))(params, tokens)
  base = base_params
  if scan_layers:
    params, base = _stacked(params), _stacked(base_params)
  incremental, _ = _incremental(cfg, params, tokens, PROMPT)
  # The prompt is traversed: prefill logits are the full-sequence (training-time) logits.
  np.testing.assert_allclose(incremental[:, :PROMPT], full[:, :PROMPT], rtol=TOL, atol=TOL)
  # Each decoded token takes one plain pass over pass-1 K/V: the base model decoding from the TroL
  # prefill cache (the cache holds pass-1 K/V only, so the base model can read it).
  base_cfg = dataclasses.replace(BASE, scan_layers=scan_layers)
  step = jax.jit(lambda p, t, c: LM(base_cfg).apply({"params": p}, t, cache=c, decode=True))
  _, cache = jax.jit(lambda p, t, c: LM(cfg).apply({"params": p}, t, cache=c))(
      params, tokens[:, :PROMPT], init_cache(cfg, BATCH, SEQ + 4)
  )
  if scan_layers:
    # TroL's scanned stack is staged by traversal; the base model's is one stage of every layer.
    cache["layers"] = [jax.tree.map(lambda *xs: jnp.concatenate(xs), *cache["layers"])]
  expected = []
  for i in range(PROMPT, SEQ):
    logits, cache = step(base, tokens[:, i : i + 1], cache)
    expected.append(logits)
  np.testing.assert_allclose(incremental[:, PROMPT:], jnp.concatenate(expected, 1), rtol=TOL, atol=TOL)
  # ... which is not the training-time function.
  assert np.abs(incremental[:, PROMPT:] - full[:, PROMPT:]).max() > 1e-2


def test_official_prefill_extension_attends_to_its_own_chunk(base_params, tokens):
  """A second prefill chunk: pass 1 sees the cache, pass 2 only the chunk (as the official code)."""
  cfg = _cfg(decode_traversal="official")
  params = _with_gates(base_params, *_random_gates(cfg))
  model = LM(cfg)
  apply = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  _, cache = apply(params, tokens[:, :PROMPT], init_cache(cfg, BATCH, SEQ))
  got, _ = apply(params, tokens[:, PROMPT:], cache)
  # Reference, layer by layer over the whole sequence: pass 1 causal over everything (the prompt's
  # K/V come from the cache), pass 2 block-diagonal: the prompt and the chunk each see only themselves.
  dec = params["decoder"]
  pos = jnp.broadcast_to(jnp.arange(SEQ)[None], (BATCH, SEQ))
  causal = jnp.ones((BATCH, SEQ), jnp.int32)
  # Two segments, the prompt and the chunk: each sees only itself (positions stay global).
  block_diagonal = jnp.where(pos >= PROMPT, 2, 1)
  layer = lambda i, h, segments: run_layer(BASE, dec[f"layers_{i}"], h, segments, positions=pos)
  h = dec["embedding"][tokens]
  for i in range(BASE.num_layers):
    h1 = layer(i, h, causal)
    h = trol.mix(h1, layer(i, h1, block_diagonal), dec["trol_gate"]["kernel"][i], dec["trol_gate"]["bias"][i])
  x = h[:, PROMPT:]
  x = x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + BASE.norm_eps) * dec["final_norm"]["scale"]
  np.testing.assert_allclose(got, x @ dec["lm_head"]["kernel"], rtol=TOL, atol=TOL)


def test_llvm_decode_step_passes_decode_flag(base_params, tokens):
  from llvm_jax.models.llvm import LLVM, decode_step, prefill

  cfg = _cfg(decode_traversal="official")
  model = LLVM(LLVMConfig(decoder=cfg, vision=None))
  params = _with_gates(base_params, *_random_gates(cfg))
  _, cache = prefill(model, params, tokens[:, :PROMPT], SEQ)
  got, _ = decode_step(model, params, tokens[:, PROMPT : PROMPT + 1], cache)
  expected, _ = decode_step(
      LLVM(LLVMConfig(decoder=BASE, vision=None)), base_params, tokens[:, PROMPT : PROMPT + 1], cache
  )
  np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize(
    "options,gates",
    [(dict(shared_gate=True), 1), (dict(), 3), (dict(layers=(0, 2)), 2), (dict(shared_gate=True, layers=(1,)), 1)],
)
def test_parameter_overhead_exact(options, gates, base_params, tokens):
  cfg = _cfg(gate_init="torch", **options)
  params = nn.unbox(jax.eval_shape(LM(cfg).init, jax.random.PRNGKey(0), tokens)["params"])
  added = _count(params) - _count(base_params)
  assert added == gates * (BASE.embed_dim + 1) == flops.trol_overhead(cfg, SEQ)["added_params"]
  assert params["decoder"]["trol_gate"]["kernel"].shape == (gates, BASE.embed_dim)


def test_dtypes_follow_config(tokens):
  cfg = dataclasses.replace(_cfg(), dtype="bfloat16", param_dtype="bfloat16")
  params = jax.eval_shape(LM(cfg).init, jax.random.PRNGKey(0), tokens)
  assert nn.unbox(params)["params"]["decoder"]["trol_gate"]["kernel"].dtype == jnp.bfloat16
  logits = jax.eval_shape(LM(cfg).apply, params, tokens)[0]
  assert logits.dtype == jnp.bfloat16
  h1, h2 = jnp.ones((1, 2, 4), jnp.bfloat16), jnp.zeros((1, 2, 4), jnp.bfloat16)
  assert trol.mix(h1, h2, jnp.zeros(4), jnp.zeros(())).dtype == jnp.bfloat16


def test_gate_init_options(tokens):
  for gate_init, check in (
      ("zeros", lambda k, b: np.all(k == 0) and np.all(b == 0)),
      ("normal", lambda k, b: 0.01 < k.std() < 0.03 and np.all(b == 0)),
      ("torch", lambda k, b: np.abs(k).max() <= BASE.embed_dim**-0.5 and k.std() > 0.1 and b[0] != 0),
  ):
    gates = nn.unbox(
        LM(_cfg(gate_init=gate_init)).init(jax.random.PRNGKey(0), tokens)["params"]["decoder"]["trol_gate"]
    )
    assert check(np.asarray(gates["kernel"]), np.asarray(gates["bias"])), gate_init


def test_gate_only_training_step(base_params, tokens):
  cfg = _cfg(layers=(0, 1))
  params = _with_gates(base_params, *_random_gates(cfg))
  # The trainer's own TroL step-1 preset (projector + gates; this decoder-only model has no projector).
  trained = optim.trainable_mask(params, optim.STAGE_RULES["trol1"])
  labels = jax.tree.map(lambda on: "train" if on else "freeze", trained)
  assert _count([p for p, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if l == "train"]) == 2 * 33
  tx = optax.multi_transform({"train": optax.adam(1e-2), "freeze": optax.set_to_zero()}, labels)

  def loss(p):
    logits = LM(cfg).apply({"params": p}, tokens[:, :-1])[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  @jax.jit
  def step(p, opt_state):
    grads = jax.grad(loss)(p)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), grads

  new, grads = step(params, tx.init(params))
  assert np.abs(grads["decoder"]["trol_gate"]["kernel"]).min() > 0  # gradients reach every gate entry
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), params, new)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(changed)}
  assert {k for k, v in flat.items() if v} == {"['decoder']['trol_gate']['bias']", "['decoder']['trol_gate']['kernel']"}
  assert float(loss(new)) < float(loss(params))


@pytest.mark.parametrize("layers", [None, (1,)])
def test_scanned_equals_unscanned(layers, base_params, tokens):
  cfg = _cfg(layers=layers)
  params = _with_gates(base_params, *_random_gates(cfg))
  np.testing.assert_allclose(
      _forward(_cfg(scan_layers=True, layers=layers))(_stacked(params), tokens),
      _forward(cfg)(params, tokens),
      rtol=1e-6,
      atol=1e-6,
  )


@pytest.mark.parametrize("scan_layers,layers", [(False, None), (True, (0, 2))])
def test_remat_gives_same_gradients(scan_layers, layers, base_params, tokens):
  params = _with_gates(base_params, *_random_gates(_cfg(layers=layers)))
  if scan_layers:
    params = _stacked(params)

  def grads(remat_policy):
    cfg = _cfg(scan_layers=scan_layers, remat_policy=remat_policy, layers=layers)
    loss = lambda p: jnp.mean(LM(cfg).apply({"params": p}, tokens)[0] ** 2)
    return jax.jit(jax.grad(loss))(params)

  plain, remat = grads(None), grads("full")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat, plain)
  assert np.abs(plain["decoder"]["trol_gate"]["kernel"]).min() > 0


def test_overhead_accounting():
  cfg = dataclasses.replace(BASE, trol=TrolConfig(layers=(0, 1)))
  d, hd, f, s = BASE.embed_dim, BASE.head_dim, BASE.mlp_dim, 16
  layer = 2 * d * (4 + 2 * 2) * hd + 2 * 4 * hd * d + 6 * d * f + 4 * 4 * hd * s / 2
  got = flops.trol_overhead(cfg, s)
  assert got["added_flops_per_token"] == 2 * (layer + 5 * d)
  assert got["base_flops_per_token"] == 3 * layer + 2 * d * BASE.vocab_size
  assert got["decode_added_flops_per_token"] > got["added_flops_per_token"]  # 'full' decodes with all keys
  official = dataclasses.replace(cfg, trol=TrolConfig(layers=(0, 1), decode_traversal="official"))
  assert flops.trol_overhead(official, s)["decode_added_flops_per_token"] == 0


@pytest.mark.parametrize("options", [dict(), dict(shared_gate=True, layers=(1,))])
def test_analytic_flops_match_xla_cost_analysis(options):
  tokens = jnp.zeros((BATCH, 32), jnp.int32)

  def xla_flops(cfg):
    params = jax.eval_shape(LM(cfg).init, jax.random.PRNGKey(0), tokens)
    return jax.jit(lambda p, t: LM(cfg).apply(p, t)[0]).lower(params, tokens).compile().cost_analysis()["flops"]

  cfg = _cfg(**options)
  # XLA counts the masked dense attention in full, hence causal=False.
  expected = flops.trol_overhead(cfg, 32, causal=False)["flops_ratio"]
  np.testing.assert_allclose(xla_flops(cfg) / xla_flops(BASE), expected, rtol=5e-3)


def test_config_from_dict_and_validation():
  cfg = LLVMConfig.from_dict({"decoder": {"num_layers": 4, "trol": {"layers": [0, 1], "shared_gate": True}}})
  assert cfg.decoder.trol == TrolConfig(layers=(0, 1), shared_gate=True)
  with pytest.raises(ValueError, match="trol.gate_nit"):
    LLVMConfig.from_dict({"decoder": {"trol": {"gate_nit": "zeros"}}})
  with pytest.raises(ValueError, match="decode_traversal"):
    TrolConfig(decode_traversal="half")
  with pytest.raises(ValueError, match="trol.layers"):
    dataclasses.replace(BASE, trol=TrolConfig(layers=(0, 3)))
