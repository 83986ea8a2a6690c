"""p-MoD (mixture-of-depths over vision tokens): schedule, MoD layer against a per-sample reference,
skipped-token isolation and router gradients, reduced KV cache with decode parity, TroL, FLOPs."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llvm_jax import config_utils, convert, flops
from llvm_jax import cost as cost_lib
from llvm_jax.models import attention, hooks, masks, pmod, trol
from llvm_jax.models.config import DecoderConfig, LLVMConfig, PmodConfig, TrolConfig
from llvm_jax.models.decoder import MLP, Attention, DecoderLayer, init_cache
from llvm_jax.models.layers import RMSNorm
from llvm_jax.models.llvm import LLVM, decode_step, prefill
from llvm_jax.models.masks import default_positions
from llvm_jax.models.rope import rope_cos_sin
from tests.model_helpers import LM as DecoderLM
from tests.model_helpers import TINY_DECODER, run_layer

BASE = dataclasses.replace(TINY_DECODER, num_layers=3)
# Layers 1 and 2 are MoD layers keeping trunc(0.6·n) and trunc(0.3·n) of a row's n vision tokens.
EXPLICIT = PmodConfig(schedule="explicit", layers=(1, 2), ratios=(0.6, 0.3))
IMG = 60
NUM_VISION = 12
SEQ, PROMPT = 24, 17
TOL = 2e-5
# The decoder on token ids, IMG tokens being the vision tokens (p-MoD's targets).
LM = functools.partial(DecoderLM, image_token=IMG, num_vision=NUM_VISION)


def _batch():
  """Three rows: no padding / 12 vision tokens; left padding / 12; more padding / 6 (an unused image slot)."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, IMG, (3, SEQ))
  segments = np.ones((3, SEQ), np.int32)
  tokens[0, 2:14] = IMG
  segments[1, :2] = 0
  tokens[1, 4:16] = IMG
  segments[2, :6] = 0
  tokens[2, 9:15] = IMG
  return jnp.asarray(tokens), jnp.asarray(segments)


def _cfg(pmod_config=EXPLICIT, **overrides):
  return dataclasses.replace(BASE, pmod=pmod_config, **overrides)


def _forward(cfg):
  return jax.jit(lambda params, tokens, segments: LM(cfg).apply({"params": params}, tokens, segments)[0])


@pytest.fixture(scope="module")
def batch():
  return _batch()


@pytest.fixture(scope="module")
def params(batch):
  """Parameters of the EXPLICIT model with O(1) embeddings and random routers (w spread, ties-free)."""
  tokens, segments = batch
  p = nn.unbox(jax.jit(LM(_cfg()).init)(jax.random.PRNGKey(0), tokens, segments)["params"])
  k = jax.random.split(jax.random.PRNGKey(7), 3)
  decoder = dict(p["decoder"])
  decoder["embedding"] = jax.random.normal(k[0], decoder["embedding"].shape)
  decoder["pmod_router"] = {
      "kernel": 0.5 * jax.random.normal(k[1], (2, BASE.embed_dim)),
      "bias": 0.3 * jax.random.normal(k[2], (2,)),
  }
  return dict(p, decoder=decoder)


def _dense_params(params):
  return dict(params, decoder={k: v for k, v in params["decoder"].items() if k != "pmod_router"})


# ---------------------------------------------------------------------------------------------------
# A per-sample reference written from the paper's description (numpy selection, explicit loops).


def _ref_select(h, kernel, bias, vision, ratio):
  """Kept vision indices (top-k by w, earlier token on ties) and w of one row h (S, D)."""
  w = 0.2 * np.tanh(h @ kernel + bias) + 1.0
  vision_idx = np.nonzero(vision)[0]
  k = int(ratio * len(vision_idx))
  chosen = vision_idx[np.argsort(-w[vision_idx], kind="stable")[:k]]
  return chosen, w


def _ref_mod_layer(cfg, p, h, tokens, segments, positions, ratio, router, selections=None):
  """One MoD layer over a batch, sample by sample. router: (kernel, bias); selections: the (chosen,
  w) of every row to reuse (TroL's second pass), else chosen here. Returns (output, selections)."""
  out = np.array(h, dtype=np.float32)
  norm = lambda name, y: RMSNorm(cfg.norm_eps).apply({"params": p[name]}, y)
  used = []
  for b in range(h.shape[0]):
    valid = segments[b] != 0
    vision = (tokens[b] == IMG) & valid
    chosen, w = _ref_select(h[b], *router, vision, ratio) if selections is None else selections[b]
    used.append((chosen, w))
    kept = np.sort(np.concatenate([np.nonzero(valid & ~vision)[0], chosen]))
    xk = jnp.asarray(h[b, kept][None])
    cos, sin = rope_cos_sin(jnp.asarray(positions[b, kept][None]), cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    kept_positions = jnp.asarray(positions[b, kept][None])
    causal = masks.self_attention(jnp.ones((1, len(kept)), jnp.int32), kept_positions)
    ctx = hooks.LayerContext(cos, sin, causal, 0)
    a = xk + Attention(cfg).apply({"params": p["attn"]}, norm("input_norm", xk), ctx, None)[0]
    m = np.asarray(MLP(cfg).apply({"params": p["mlp"]}, norm("post_attn_norm", a)))[0]
    out[b, vision] = w[vision, None] * h[b, vision]
    scale = np.where(vision[kept], w[kept], 1.0)[:, None]
    out[b, kept] = np.asarray(a)[0] + scale * m
  return out, used


def _ref_logits(cfg, params, tokens, segments, traverse=False):
  """The model written out: dense layers on the full batch, MoD layers per sample; with traverse
  (TroL, gate fully open) each layer runs twice, a MoD layer reusing its first routing."""
  dec = params["decoder"]
  tokens, segments = np.asarray(tokens), np.asarray(segments)
  positions = np.asarray(default_positions(jnp.asarray(segments)))
  dense_cfg = dataclasses.replace(cfg, pmod=None, trol=None)
  ratios = pmod.layer_ratios(cfg)
  passes = 2 if traverse else 1
  h = np.asarray(dec["embedding"])[tokens]
  for i in range(cfg.num_layers):
    p = dec[f"layers_{i}"]
    if i in ratios:
      row = list(ratios).index(i)
      router = (np.asarray(dec["pmod_router"]["kernel"][row]), float(dec["pmod_router"]["bias"][row]))
      selections = None
      for _ in range(passes):
        h, selections = _ref_mod_layer(cfg, p, h, tokens, segments, positions, ratios[i], router, selections)
    else:
      for _ in range(passes):
        h = np.asarray(run_layer(dense_cfg, p, h, segments))
  h = RMSNorm(cfg.norm_eps).apply({"params": dec["final_norm"]}, jnp.asarray(h))
  return np.asarray(h) @ np.asarray(dec["lm_head"]["kernel"])


# ---------------------------------------------------------------------------------------------------


def test_prd_schedule_llava_7b_defaults():
  cfg = dataclasses.replace(BASE, num_layers=32, pmod=PmodConfig())
  ratios = pmod.layer_ratios(cfg)
  assert list(ratios) == list(range(8, 32))
  for layer, ratio in ratios.items():
    assert ratio == pytest.approx(max(math.cos(math.pi * layer / 31) / 2 + 0.5, 0.15), abs=1e-12)
  # Layer 7 would keep 0.880 > r_max; layer 8 keeps 0.8445; from layer 24 (0.121) the ratio is clamped to r_min.
  assert ratios[8] == pytest.approx(0.84448, abs=1e-5) and ratios[16] == pytest.approx(0.47467, abs=1e-5)
  assert ratios[23] == pytest.approx(0.15552, abs=1e-5) and all(ratios[l] == 0.15 for l in range(24, 32))
  linear = pmod.layer_ratios(dataclasses.replace(cfg, pmod=PmodConfig(schedule="shiftedlinear")))
  assert list(linear) == list(range(5, 32))  # 1 - l/31 <= 0.85 from l = 5
  assert linear[5] == pytest.approx(1 - 5 / 31) and linear[27] == 0.15
  assert pmod.layer_ratios(dataclasses.replace(cfg, pmod=PmodConfig(enabled=False))) == {}
  assert pmod.layer_ratios(_cfg()) == {1: 0.6, 2: 0.3}


def test_config_validation_and_from_dict():
  with pytest.raises(ValueError, match="exactly when"):
    PmodConfig(layers=(1,), ratios=(0.5,))
  with pytest.raises(ValueError, match="distinct layer indices"):
    _cfg(PmodConfig(schedule="explicit", layers=(1, 5), ratios=(0.5, 0.5)))
  parsed = LLVMConfig.from_dict({"decoder": {"pmod": {"schedule": "explicit", "layers": [1, 2], "ratios": [0.6, 0.3]}}})
  assert parsed.decoder.pmod == EXPLICIT
  with pytest.raises(ValueError, match="decoder.pmod.tanh_scal"):
    LLVMConfig.from_dict({"decoder": {"pmod": {"tanh_scal": 0.1}}})


def test_zero_routers_full_retention_equal_dense_layers(params, batch):
  tokens, segments = batch
  cfg = _cfg(PmodConfig(schedule="explicit", layers=(0, 1, 2), ratios=(1.0, 1.0, 1.0)))
  p = nn.unbox(jax.jit(LM(cfg).init)(jax.random.PRNGKey(3), tokens, segments)["params"])
  assert float(jnp.abs(p["decoder"]["pmod_router"]["kernel"]).max()) == 0.0  # zero init: every w = 1
  p = dict(p, decoder=dict(_dense_params(params)["decoder"], pmod_router=p["decoder"]["pmod_router"]))
  valid = np.asarray(segments) != 0
  got = np.asarray(_forward(cfg)(p, tokens, segments))[valid]
  dense = np.asarray(_forward(BASE)(_dense_params(params), tokens, segments))[valid]
  np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-5)
  # Not vacuous: a retention below 1 changes the output.
  half = _cfg(PmodConfig(schedule="explicit", layers=(0, 1, 2), ratios=(0.5, 0.5, 0.5)))
  assert np.abs(np.asarray(_forward(half)(p, tokens, segments))[valid] - dense).max() > 2e-3


def test_against_per_sample_reference(params, batch):
  tokens, segments = batch
  cfg = _cfg()
  expected = _ref_logits(cfg, params, tokens, segments)
  got = np.asarray(_forward(cfg)(params, tokens, segments))
  np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)
  dense = np.asarray(_forward(BASE)(_dense_params(params), tokens, segments))
  assert np.abs(got - dense)[np.asarray(segments) != 0].max() > 2e-3


def test_splash_attention_runs_the_kept_tokens(params, batch, monkeypatch):
  """Splash (its Pallas kernel in the interpreter: no TPU here) on the MoD layers' kept tokens, whose
  count is no multiple of 128 (padded in segment 0): the same logits and parameter gradients as the
  einsum path."""
  lengths = []

  def interpreted(q, *args, **kwargs):
    lengths.append(q.shape[1])
    return splash(q, *args, **kwargs, interpret=True)

  splash = attention.splash_attention
  monkeypatch.setattr(attention, "splash_attention", interpreted)
  tokens, segments = batch
  valid = np.asarray(segments) != 0

  def loss_and_grads(cfg):
    def loss(p):
      logits = LM(cfg).apply({"params": p}, tokens, segments)[0]
      return jnp.sum(jnp.where(segments[..., None] != 0, jnp.tanh(logits), 0.0)), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, got), got_grads = loss_and_grads(_cfg(attention_impl="splash"))
  (_, want), want_grads = loss_and_grads(_cfg())
  # Layer 0 is dense (24 tokens), layers 1 and 2 keep 24 - 12 + trunc(0.6 * 12) and + trunc(0.3 * 12).
  assert sorted(set(lengths)) == [15, 19, 24]
  with pytest.raises(ValueError, match="sliding window"):
    loss_and_grads(_cfg(attention_impl="splash", sliding_window=4))
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=TOL, atol=TOL)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_select_matches_reference_choice(batch):
  tokens, segments = batch
  weight = jax.random.uniform(jax.random.PRNGKey(5), tokens.shape)
  vision = tokens == IMG
  route = pmod.select(weight, vision, segments, NUM_VISION, 0.6)
  assert route["index"].shape == (3, SEQ - NUM_VISION + 7)
  for b in range(3):
    order = np.argsort(-np.asarray(weight[b])[np.asarray(vision[b])], kind="stable")
    chosen = np.nonzero(np.asarray(vision[b]))[0][order[: int(0.6 * int(vision[b].sum()))]]
    text = np.nonzero(~np.asarray(vision[b]) & (np.asarray(segments[b]) != 0))[0]
    kept = np.sort(np.concatenate([text, chosen]))
    np.testing.assert_array_equal(np.nonzero(np.asarray(route["kept"][b]))[0], kept)
    n = len(kept)
    np.testing.assert_array_equal(np.asarray(route["index"][b, :n]), kept)
    assert np.asarray(route["valid"][b]).sum() == n
  # Row 2 holds 6 vision tokens (trunc(0.6·6) = 3 kept) and 12 text tokens: 15 of the 19 slots.
  assert int(route["valid"][2].sum()) == 15


class OneMoDLayer(nn.Module):
  """A single MoD layer (the decoder's own p-MoD hooks around a DecoderLayer), returning the hidden state."""

  config: DecoderConfig

  @nn.compact
  def __call__(self, x, tokens, segments):
    cfg = self.config
    positions = default_positions(segments)
    cos, sin = rope_cos_sin(positions, cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
    ctx = hooks.LayerContext(
        cos, sin, masks.self_attention(segments, positions), 0, vision_mask=tokens == IMG, num_vision=NUM_VISION
    )
    router = {
        "kernel": self.param("kernel", nn.initializers.normal(0.5), (cfg.embed_dim,)),
        "bias": self.param("bias", nn.initializers.zeros, ()),
    }
    layer = DecoderLayer(cfg, name="layer")
    fn = pmod.MOD_LAYER.wrap(layer, cfg, 0.5, None)
    fn = pmod.ROUTING.wrap(fn, cfg, 0.5, {"router": router, "table": pmod.kept_table(0.5, NUM_VISION)})
    out, _ = fn(x, ctx, None)
    return out


def test_skipped_tokens_isolated_and_router_gradients(batch):
  tokens, segments = batch
  cfg = _cfg(PmodConfig(schedule="explicit", layers=(0,), ratios=(0.5,)), num_layers=1)
  layer = OneMoDLayer(cfg)
  x = jax.random.normal(jax.random.PRNGKey(11), tokens.shape + (BASE.embed_dim,))
  p = jax.jit(layer.init)(jax.random.PRNGKey(12), x, tokens, segments)["params"]
  apply = jax.jit(lambda p, x: layer.apply({"params": p}, x, tokens, segments))
  kernel, bias = np.asarray(p["kernel"]), float(p["bias"])
  w = 0.2 * np.tanh(np.asarray(x) @ kernel + bias) + 1.0
  vision = np.asarray(tokens == IMG) & (np.asarray(segments) != 0)
  kept = np.zeros(tokens.shape, bool)
  for b in range(3):
    chosen, _ = _ref_select(np.asarray(x[b]), kernel, bias, vision[b], 0.5)
    kept[b, chosen] = True
  kept |= ~vision & (np.asarray(segments) != 0)
  skipped = vision & ~kept
  b, j = 0, int(np.nonzero(skipped[0])[0][0])
  # Perturb a skipped token orthogonally to the router kernel: its w (so the selection) is unchanged.
  delta = np.array(jax.random.normal(jax.random.PRNGKey(13), (BASE.embed_dim,)))
  delta -= (delta @ kernel) / (kernel @ kernel) * kernel
  x2 = x.at[b, j].add(jnp.asarray(delta))
  out, out2 = np.asarray(apply(p, x)), np.asarray(apply(p, x2))
  np.testing.assert_array_equal(out2[kept], out[kept])
  np.testing.assert_allclose(out2[b, j], w[b, j] * np.asarray(x2[b, j]), rtol=1e-6, atol=1e-6)  # w·x
  np.testing.assert_allclose(out[skipped], (w[..., None] * np.asarray(x))[skipped], rtol=1e-6, atol=1e-6)

  coeff = jax.random.normal(jax.random.PRNGKey(14), out.shape)

  def loss(p, select):
    return jnp.sum(
        jnp.where(jnp.asarray(select)[..., None], layer.apply({"params": p}, x, tokens, segments) * coeff, 0)
    )

  grad_kept = jax.grad(loss)(p, kept & vision)
  grad_skipped = jax.grad(loss)(p, skipped)
  assert np.abs(np.asarray(grad_kept["kernel"])).max() > 1e-3
  # Skipped tokens: out = w·x, so d/dkernel = Σ (coeff·x) · 0.2·(1 − tanh²(s)) · x.
  t = np.tanh(np.asarray(x) @ kernel + bias)
  dw = np.sum(np.asarray(coeff) * np.asarray(x), axis=-1) * 0.2 * (1 - t * t) * skipped
  np.testing.assert_allclose(grad_skipped["kernel"], np.einsum("bs,bsd->d", dw, np.asarray(x)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grad_skipped["bias"], dw.sum(), rtol=1e-4, atol=1e-5)


def _incremental(cfg, params, tokens, segments, max_len=SEQ):
  """Prefill tokens[:, :PROMPT] (all vision tokens inside), then one decode step per remaining token."""
  model = LM(cfg)
  prefill_fn = jax.jit(lambda p, t, s, c: model.apply({"params": p}, t, s, c))
  step = jax.jit(lambda p, t, s, c: model.apply({"params": p}, t, s, c, decode=True, num_vision=0))
  cache = init_cache(cfg, tokens.shape[0], max_len, num_vision=NUM_VISION)
  logits, cache = prefill_fn(params, tokens[:, :PROMPT], segments[:, :PROMPT], cache)
  outs = [logits]
  for i in range(PROMPT, tokens.shape[1]):
    logits, cache = step(params, tokens[:, i : i + 1], segments[:, i : i + 1], cache)
    outs.append(logits)
  return np.asarray(jnp.concatenate(outs, axis=1)), cache


def test_prefill_decode_matches_full_sequence_with_reduced_cache(params, batch):
  tokens, segments = batch
  cfg = _cfg()
  full = np.asarray(_forward(cfg)(params, tokens, segments))
  got, cache = _incremental(cfg, params, tokens, segments)
  valid = np.asarray(segments) != 0
  np.testing.assert_allclose(got[valid], full[valid], rtol=TOL, atol=TOL)
  # Layer 0 is dense (24 slots); MoD layers hold 24 − 12 + trunc(r·12) slots: 19 and 15.
  assert [c["k"].shape[1] for c in cache["layers"]] == [24, 19, 15]
  assert [c["v"].shape[1] for c in cache["layers"]] == [24, 19, 15]
  # Prefill wrote 17 − 12 + k slots, each decode step one more.
  assert [int(c["pmod"]["end"]) for c in cache["layers"][1:]] == [12 + 7, 8 + 7]
  assert int(cache["end"]) == SEQ


def test_trol_composition(params, batch):
  """Routing decided once per layer and reused by TroL's second pass; incremental decoding exact."""
  tokens, segments = batch
  cfg = _cfg(trol=TrolConfig())
  kernel = 0.3 * jax.random.normal(jax.random.PRNGKey(21), (trol.num_gates(cfg), BASE.embed_dim))
  gated = lambda bias: dict(params, decoder=dict(params["decoder"], trol_gate={"kernel": kernel, "bias": bias}))
  valid = np.asarray(segments) != 0
  forward = _forward(cfg)
  # Gate fully open (w = 1): every layer is applied twice, a MoD layer with its first routing.
  open_gate = np.asarray(forward(gated(jnp.full((3,), 1e4)), tokens, segments))
  expected = _ref_logits(cfg, params, tokens, segments, traverse=True)
  np.testing.assert_allclose(open_gate, expected, rtol=TOL, atol=TOL)
  # Gate closed (w = 0): the p-MoD model without TroL.
  closed = np.asarray(forward(gated(jnp.full((3,), -1e4)), tokens, segments))
  np.testing.assert_allclose(closed, np.asarray(_forward(_cfg())(params, tokens, segments)), rtol=1e-6, atol=1e-6)
  # A mixing gate, prefill + decode against the full sequence.
  p = gated(0.5 * jax.random.normal(jax.random.PRNGKey(22), (3,)))
  full = np.asarray(forward(p, tokens, segments))
  got, cache = _incremental(cfg, p, tokens, segments)
  np.testing.assert_allclose(got[valid], full[valid], rtol=TOL, atol=TOL)
  assert [c["trol"]["k"].shape[1] for c in cache["layers"]] == [24, 19, 15]


def test_trol_official_prefill_traverses_kept_prompt(params, batch):
  """TroL 'official': pass 2 of the prefill attends to the chunk's own kept tokens (the MoD layer's
  mask sliced in its own slot space), so a prefill equals the full forward of the prompt."""
  tokens, segments = batch
  cfg = _cfg(trol=TrolConfig(decode_traversal="official"))
  p = dict(
      params,
      decoder=dict(
          params["decoder"],
          trol_gate={
              "kernel": 0.3 * jax.random.normal(jax.random.PRNGKey(23), (3, BASE.embed_dim)),
              "bias": jnp.zeros((3,)),
          },
      ),
  )
  prompt, prompt_segments = tokens[:, :PROMPT], segments[:, :PROMPT]
  cache = init_cache(cfg, tokens.shape[0], SEQ, num_vision=NUM_VISION)
  logits, cache = jax.jit(lambda p, c: LM(cfg).apply({"params": p}, prompt, prompt_segments, c))(p, cache)
  valid = np.asarray(prompt_segments) != 0
  full = np.asarray(_forward(cfg)(p, prompt, prompt_segments))
  np.testing.assert_allclose(np.asarray(logits)[valid], full[valid], rtol=TOL, atol=TOL)
  assert [int(c["pmod"]["end"]) for c in cache["layers"][1:]] == [12, 8]


def test_remat_matches(params, batch):
  tokens, segments = batch
  np.testing.assert_allclose(
      _forward(_cfg(remat_policy="full"))(params, tokens, segments),
      _forward(_cfg())(params, tokens, segments),
      rtol=1e-6,
      atol=1e-6,
  )


def _train_flops(cfg, tokens, segments):
  model = LM(cfg)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens, segments)["params"]

  def loss(p):
    logits = model.apply({"params": p}, tokens, segments)[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1))

  analysis = jax.jit(jax.value_and_grad(loss)).lower(params).compile().cost_analysis()
  return float((analysis[0] if isinstance(analysis, (list, tuple)) else analysis)["flops"])


def test_train_step_flops_drop(batch):
  tokens, segments = batch
  # PRD for 3 layers: r = 1.0, 0.5, 0 -> MoD layers 1 (r = 0.5) and 2 (r = 0.15).
  cfg = _cfg(PmodConfig())
  assert pmod.layer_ratios(cfg) == pytest.approx({1: 0.5, 2: 0.15})
  dense, sparse = _train_flops(BASE, tokens, segments), _train_flops(cfg, tokens, segments)
  cost = flops.pmod_cost(LLVMConfig(decoder=cfg, vision=None), SEQ, NUM_VISION)
  assert cost["kept_tokens_per_layer"] == [24, 18, 13]
  # XLA counts 77.0% of the dense step; the analytic count says 77.1%.
  assert sparse / dense == pytest.approx(cost["decoder_flops_ratio"], abs=0.02)
  assert sparse / dense < 0.8


def test_llvm_prefill_decode_with_images():
  """Through the LLVM: the image tokens are routed, prefill sizes the cache from the image slots."""
  base = config_utils.tiny_llvm(embed_dim=32, num_layers=2)
  cfg = dataclasses.replace(base, decoder=dataclasses.replace(base.decoder, pmod=PmodConfig()))
  model = LLVM(cfg)
  params = convert.init_params(model, jax.random.PRNGKey(0))
  params["decoder"]["pmod_router"] = {
      "kernel": jax.random.normal(jax.random.PRNGKey(1), (1, 32)),
      "bias": jnp.zeros((1,)),
  }
  n = cfg.tokens_per_image
  text = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 10), 5, cfg.decoder.vocab_size))
  tokens = jnp.asarray(np.concatenate([text[:, :2], np.full((2, n), cfg.image_token_id), text[:, 2:]], axis=1))
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 1, 32, 32, 3))
  image_mask = jnp.ones((2, 1), bool)
  full = jax.jit(lambda p: model.apply({"params": p}, tokens, images, image_mask)[0])(params)
  prompt = n + 4
  logits, cache = jax.jit(lambda p: prefill(model, p, tokens[:, :prompt], tokens.shape[1], images, image_mask))(params)
  outs = [logits]
  step = jax.jit(lambda p, t, c: decode_step(model, p, t, c))
  for i in range(prompt, tokens.shape[1]):
    logits, cache = step(params, tokens[:, i : i + 1], cache)
    outs.append(logits)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=TOL, atol=TOL)
  # Layer 1 (r = 0.15): 26 − 16 + trunc(0.15·16) = 12 slots.
  assert [c["k"].shape[1] for c in cache["layers"]] == [26, 12]


def test_more_image_slots_than_the_row_holds():
  """Packed rows can have more image slots than room (3 slots of 64 tokens in 96): the static vision
  count is capped at the row length (uncapped, top-k over 28 tokens would ask for 30), and the kept
  tokens are those of the row's real image, as with one slot."""
  base = config_utils.tiny_llvm(embed_dim=32, num_layers=2)
  pmod = PmodConfig(schedule="explicit", layers=(0, 1), ratios=(0.95, 0.9))
  model = LLVM(dataclasses.replace(base, decoder=dataclasses.replace(base.decoder, pmod=pmod)))
  params = convert.init_params(model, jax.random.PRNGKey(0))
  n = model.config.tokens_per_image
  text = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 10), 5, base.decoder.vocab_size))
  # 26 tokens then 2 of padding: a row with fewer vision tokens than its slots needs that room.
  real = np.concatenate([text[:, :2], np.full((2, n), base.image_token_id), text[:, 2:]], axis=1)
  tokens = jnp.asarray(np.pad(real, ((0, 0), (0, 2))))
  segments = jnp.asarray(np.pad(np.ones_like(real), ((0, 0), (0, 2))))
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 2, 32, 32, 3))
  assert int(0.95 * 2 * n) > tokens.shape[1]
  apply = jax.jit(lambda imgs, mask: model.apply({"params": params}, tokens, imgs, mask, segments)[0])
  two_slots = apply(images, jnp.asarray([[True, False]] * 2))
  one_slot = apply(images[:, :1], jnp.ones((2, 1), bool))
  np.testing.assert_allclose(two_slots[:, : real.shape[1]], one_slot[:, : real.shape[1]], rtol=TOL, atol=TOL)


def test_pmod_cost_llava_7b():
  from configs.llava import llava_7b

  base = llava_7b("llama")
  cfg = dataclasses.replace(base, decoder=dataclasses.replace(base.decoder, pmod=PmodConfig(), dtype="bfloat16"))
  cost = {**flops.pmod_cost(cfg, 640, 576), **cost_lib.pmod_kv_bytes(cfg, 640, 576)}
  assert cost["mod_layers"] == 24
  kept = [640 if l < 8 else 64 + int(max(math.cos(math.pi * l / 31) / 2 + 0.5, 0.15) * 576) for l in range(32)]
  assert cost["kept_tokens_per_layer"] == kept
  # KV cache: k and v (bf16) of every slot, the shared int32 segment ids / positions / end, and each
  # MoD layer's own int32 bookkeeping of its slots.
  per_slot, shared = 2 * 32 * 128 * 2, 2 * 4 * 640 + 4
  assert cost["kv_bytes_dense"] == 32 * 640 * per_slot + shared
  assert cost["kv_bytes_pmod"] == sum(kept) * per_slot + shared + sum(2 * 4 * k + 4 for k in kept[8:])
  assert cost["kv_ratio"] == pytest.approx(sum(kept) / (32 * 640), abs=2e-3)
  assert 0.4 < cost["decoder_flops_ratio"] < 0.7 and cost["decoder_flops_ratio"] < cost["flops_ratio"] < 1


def test_training_batches_that_overflow_a_mod_layer_are_rejected_on_the_host():
  """Inside jit, tokens past a MoD layer's static kept length would skip it silently; the data
  iterator's batch check (llvm.check_batch, which main passes) raises on the host batch instead,
  naming the rows."""
  from llvm_jax.models import llvm

  base = config_utils.tiny_llvm(embed_dim=32, num_layers=2)
  cfg = dataclasses.replace(
      base, decoder=dataclasses.replace(base.decoder, pmod=PmodConfig(schedule="explicit", layers=(1,), ratios=(0.5,)))
  )
  n, seq = cfg.tokens_per_image, 40
  images = np.zeros((2, 2, 32, 32, 3), np.float32)  # two slots a row: 32 vision slots, 16 + 24 fit
  tokens = np.full((2, seq), 7, np.int32)
  tokens[:, :n] = cfg.image_token_id
  segments = np.ones((2, seq), np.int32)
  segments[0, n + 4 :] = 0  # row 0: one image and 4 text tokens; row 1: one image and 24 text tokens
  batch = {"tokens": tokens, "segment_ids": segments, "images": images}
  llvm.check_batch(base, batch)  # without p-MoD nothing overflows
  with pytest.raises(ValueError, match=r"rows \[1\] need"):
    llvm.check_batch(cfg, batch)
  llvm.check_batch(cfg, {k: v[:1] for k, v in batch.items()})
  llvm.check_batch(cfg, {"tokens": tokens, "segment_ids": segments})  # text-only rows: no vision tokens
  # A preference batch (B, 2, S): the overflowing row as the rejected answer of pair 0.
  pairs = {"tokens": tokens[None], "segment_ids": segments[None], "images": images[:1]}
  with pytest.raises(ValueError, match=r"rows \[1\] need"):
    llvm.check_batch(cfg, pairs)
