"""p-MoD: mixture-of-depths over vision tokens, an option of the shared decoder (`DecoderConfig.pmod`).

As in the official code (MCG-NJU/p-MoD, llava/model/language_model/pmod_llava_llama.py: `TokenRouter`,
`ModLayer`, `shifted_cos_with_ratio`), a MoD layer with retention ratio r, on input x:

    s = router(x) (Linear(D, 1)),  w = α·tanh(s) + β             (TanhNorm, α = 0.2, β = 1)
    keep every text token and, per row, the k = trunc(r·n_vision) vision tokens of largest w
    a = x + Attn(norm(x)),  m = MLP(norm(a))   over the kept tokens only, in order, original positions
    kept vision: a + w·m;   skipped vision: w·x;   text: a + m;   padding: x   (STRing)

Static shapes. A batch has a static number `num_vision` of vision-token slots per row (the LLVM passes
images.shape[1] · tokens_per_image, the image slots of the batch layout). A MoD layer gathers a static
S_kept = S − num_vision + trunc(r·num_vision) tokens: every row with num_vision vision tokens fills it
exactly with its text (or padding) and kept vision tokens. A row with fewer vision tokens (unused image
slots) keeps trunc(r·n) of its n and fits when its text and kept vision tokens fit in S_kept (padding
is never kept); `check_fits` raises otherwise on concrete inputs, and under jit what does not fit
passes through unchanged, as padding does. Kept tokens are gathered in order (slots past a row's kept
count are masked out as padding), the ordinary DecoderLayer runs on them with their original
positions, and the results are gathered back.

KV cache: a MoD layer caches its kept tokens only, in arrays of S_kept-sized prefill plus the decode
steps (`cache_length`), with its own bookkeeping under `CACHE_KEY` ({'segment_ids', 'positions',
'end'}) since its prefill wrote fewer slots than the shared cache's. Decode steps are text, always
kept: the dense layer runs over the shorter cache.

With TroL (DESIGN.md §6) the routing is decided once, before the first pass, and reused by the
second: the MoD layer F (fixed kept set and weights) is applied twice, h1 = F(x), h2 = F(h1), and the
TroL-Mixer mixes them; so a skipped vision token gives mix(w·x, w²·x).

p-MoD needs `scan_layers=False` (MoD layers keep different numbers of tokens; the config raises).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax.models import layers, phantom, trol
from llvm_jax.models.config import DecoderConfig, LLVMConfig, resolve_dtype
from llvm_jax.train import flops

Array = jax.Array
Cache = dict[str, Any]

# Key of a MoD layer's own slot bookkeeping inside its layer cache.
CACHE_KEY = "pmod"


def schedule_ratio(schedule: str, average_ratio: float, layer: int, num_layers: int) -> float:
  """The PRD ratio r(l): shifted cosine cos(π·l/(L−1))/2 + r̄, or shifted linear 0.5 − l/(L−1) + r̄.

  (The official code hard-codes L − 1 = 31; this uses the model's depth.)
  """
  span = max(num_layers - 1, 1)
  if schedule == "shiftedcos":
    return math.cos(math.pi * layer / span) / 2 + average_ratio
  if schedule == "shiftedlinear":
    return 0.5 - layer / span + average_ratio
  raise ValueError(f"no PRD formula for schedule {schedule!r}")


def layer_ratios(config: DecoderConfig) -> dict[int, float]:
  """MoD layer index -> retention ratio (empty when p-MoD is off)."""
  options = config.pmod
  if options is None or not options.enabled:
    return {}
  if options.schedule == "explicit":
    return dict(sorted(zip(options.layers, options.ratios)))
  ratios = {}
  for layer in range(config.num_layers):
    r = schedule_ratio(options.schedule, options.average_ratio, layer, config.num_layers)
    if r <= options.max_ratio:
      ratios[layer] = max(r, options.min_ratio)
  return ratios


def kept_count(ratio: float, num_vision: int) -> int:
  """k = trunc(r·n): vision tokens a MoD layer keeps out of n."""
  return int(ratio * num_vision)


def kept_length(seq_len: int, num_vision: int, ratio: float) -> int:
  """S_kept, the static length a MoD layer runs on: S − n + trunc(r·n) (at least 1 slot)."""
  return max(1, seq_len - num_vision + kept_count(ratio, num_vision))


def cache_length(config: DecoderConfig, layer: int | None, max_len: int, num_vision: int) -> int:
  """Slots of a layer's KV cache: `max_len` for a dense layer, fewer for a MoD layer (its prefill of
  `num_vision` vision tokens writes kept_length slots, each later token one)."""
  ratio = layer_ratios(config).get(layer)
  return max_len if ratio is None else kept_length(max_len, num_vision, ratio)


def init_cache_entries(batch: int, length: int) -> Cache:
  """A MoD layer's own slot bookkeeping: segment ids and positions of its `length` slots, and its end."""
  return {
      CACHE_KEY: {
          "segment_ids": jnp.zeros((batch, length), jnp.int32),
          "positions": jnp.zeros((batch, length), jnp.int32),
          "end": jnp.zeros((), jnp.int32),
      }
  }


class Routers(nn.Module):
  """The routers of every MoD layer: kernel (M, D) and, with router_bias, bias (M,), M MoD layers."""

  config: DecoderConfig

  @nn.compact
  def __call__(self) -> dict[str, Array]:
    cfg = self.config
    pdtype = resolve_dtype(cfg.param_dtype)
    count = len(layer_ratios(cfg))
    if cfg.pmod.router_init == "zeros":
      init = nn.initializers.zeros
    else:
      bound = cfg.embed_dim**-0.5  # PyTorch nn.Linear(D, 1): weight and bias ~ U(±1/√D)
      init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    routers = {
        "kernel": self.param("kernel", layers.logical_init(init, ("pmod_layers", "embed")), (count, cfg.embed_dim), pdtype)
    }
    if cfg.pmod.router_bias:
      routers["bias"] = self.param("bias", layers.logical_init(init, ("pmod_layers",)), (count,), pdtype)
    return routers


def layer_router(config: DecoderConfig, routers: dict[str, Array], layer: int) -> dict[str, Array]:
  """One MoD layer's router row out of `Routers()`."""
  row = list(layer_ratios(config)).index(layer)
  return {name: value[row] for name, value in routers.items()}


def router_weight(x: Array, router: dict[str, Array], config: DecoderConfig) -> Array:
  """w = α·tanh(s) + β with s = router(x), (B, S) float32."""
  s = jnp.einsum("bsd,d->bs", x, router["kernel"].astype(x.dtype), preferred_element_type=jnp.float32)
  if "bias" in router:
    s = s + router["bias"].astype(jnp.float32)
  return config.pmod.tanh_scale * jnp.tanh(s) + config.pmod.tanh_bias


def select(weight: Array, vision_mask: Array, segment_ids: Array, num_vision: int, ratio: float) -> dict[str, Array]:
  """Which tokens a MoD layer keeps, and where they go (static shapes).

  Returns 'kept' (B, S) bool: text tokens and each row's top-k vision tokens by weight (k = trunc(r·n)
  of its n vision tokens; ties go to the earlier token); 'index' (B, S_kept): the kept tokens in
  order, then filler; 'valid' (B, S_kept): the slots holding kept tokens; 'slot' (B, S): each kept
  token's slot.
  """
  b, s = weight.shape
  s_kept = kept_length(s, num_vision, ratio)
  k_max = kept_count(ratio, num_vision)
  present = segment_ids != 0
  vision = vision_mask & present
  kept = ~vision_mask & present
  if k_max:
    # k of a row with n vision tokens from a table, so it equals the static k_max when n = num_vision.
    per_count = jnp.asarray([kept_count(ratio, n) for n in range(num_vision + 1)], jnp.int32)
    k = per_count[jnp.minimum(jnp.sum(vision, axis=1), num_vision)]
    _, top = jax.lax.top_k(jnp.where(vision, weight, -jnp.inf), k_max)
    chosen = jnp.arange(k_max)[None, :] < k[:, None]
    kept |= jnp.zeros((b, s), bool).at[jnp.arange(b)[:, None], top].set(chosen)
  rank = jnp.cumsum(kept, axis=1, dtype=jnp.int32)
  # What does not fit passes through as padding does (check_fits raises on concrete inputs).
  kept &= rank <= s_kept
  rank = jnp.minimum(rank, s_kept)
  index = jax.vmap(lambda r: jnp.searchsorted(r, jnp.arange(1, s_kept + 1, dtype=jnp.int32), side="left"))(rank)
  return {
      "kept": kept,
      "index": jnp.minimum(index, s - 1),
      "valid": jnp.arange(s_kept)[None, :] < rank[:, -1:],
      "slot": jnp.maximum(rank - 1, 0),
  }


def check_fits(config: DecoderConfig, vision_mask: Any, segment_ids: Any, num_vision: int) -> None:
  """Raises if a row's text plus kept vision tokens exceed a MoD layer's S_kept, or it has more than
  `num_vision` vision tokens. Concrete (host) arrays only; traced values are skipped."""
  if isinstance(vision_mask, jax.core.Tracer) or isinstance(segment_ids, jax.core.Tracer):
    return
  present = np.asarray(segment_ids) != 0
  vision = np.asarray(vision_mask).astype(bool) & present
  n = vision.sum(axis=1)
  text = (present & ~vision).sum(axis=1)
  seq_len = present.shape[1]
  if (n > num_vision).any():
    raise ValueError(f"p-MoD: rows {np.nonzero(n > num_vision)[0].tolist()} hold more than num_vision={num_vision} vision tokens")
  for layer, ratio in layer_ratios(config).items():
    need = text + np.asarray([kept_count(ratio, int(c)) for c in n])
    bad = np.nonzero(need > kept_length(seq_len, num_vision, ratio))[0]
    if bad.size:
      raise ValueError(
          f"p-MoD layer {layer} (r={ratio:.3f}) keeps {kept_length(seq_len, num_vision, ratio)} tokens of "
          f"{seq_len} (num_vision={num_vision}), but rows {bad.tolist()} need {need[bad].tolist()}: a row with "
          "fewer vision tokens needs as much more padding"
      )


def _take(a: Array, index: Array) -> Array:
  """a (B, S, ...) at index (B, S') along axis 1."""
  return jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)


def apply_layer(
    layer: nn.Module,
    module: nn.Module,
    x: Array,
    *,
    segment_ids: Array,
    positions: Array,
    cos: Array,
    sin: Array,
    mask: Array,
    layer_cache: Cache | None,
    router: dict[str, Array],
    vision_mask: Array | None,
    num_vision: int,
    ratio: float,
    config: DecoderConfig,
    decode: bool,
    trol_gate: dict[str, Array] | None,
) -> tuple[Array, Cache | None]:
  """A MoD decoder layer (optionally traversed by TroL); returns the new hidden state and layer cache.

  `layer` is the decoder's DecoderLayer and `module` the Decoder (TroL binds to it); segment_ids,
  positions, cos, sin and mask are the decoder's for this call (mask is used only when nothing is
  routed and there is no cache). Routing happens when the call holds vision slots (num_vision > 0).
  """
  from llvm_jax.models.decoder import attention_mask  # decoder imports this module

  routed = vision_mask is not None and num_vision > 0
  if not routed and layer_cache is None:
    # Nothing to route (text-only batch): the dense layer, exactly.
    run = lambda h, m, c: layer(h, cos, sin, m, c, 0, _sos(config, segment_ids, segment_ids))
    if trol_gate is None:
      return run(x, mask, None)
    return trol.apply_layer(lambda _: run, module, x, mask, None, 0, trol_gate, config, decode)

  if routed:
    weight = router_weight(x, router, config)
    route = select(weight, vision_mask.astype(bool), segment_ids, num_vision, ratio)
    index = route["index"]
    x_kept = _take(x, index)
    seg_kept = jnp.where(route["valid"], _take(segment_ids, index), 0)
    pos_kept, cos, sin = _take(positions, index), _take(cos, index), _take(sin, index)
    vision_kept = _take(vision_mask.astype(bool), index)
    # STRing: kept vision tokens scale their MLP update by w, text tokens do not.
    mlp_weight = jnp.where(vision_kept, _take(weight, index), 1.0)[..., None]
  else:
    # A decode step or text-only prefill into the layer's own (shorter) cache: every token is kept.
    x_kept, seg_kept, pos_kept, mlp_weight = x, segment_ids, positions, None

  s_kept = x_kept.shape[1]
  slots = jnp.broadcast_to(jnp.arange(s_kept, dtype=jnp.int32)[None], seg_kept.shape)
  if layer_cache is None:
    write_index, inner_cache, book = 0, None, None
    k_seg, k_pos, k_slots = seg_kept, pos_kept, slots
  else:
    if CACHE_KEY not in layer_cache:
      raise ValueError("a p-MoD layer needs its own cache entries: build the cache with init_cache(config, ...)")
    book = layer_cache[CACHE_KEY]
    inner_cache = {k: v for k, v in layer_cache.items() if k != CACHE_KEY}
    write_index = book["end"]
    k_seg = jax.lax.dynamic_update_slice(book["segment_ids"], seg_kept, (0, write_index))
    k_pos = jax.lax.dynamic_update_slice(book["positions"], pos_kept, (0, write_index))
    k_slots = jnp.broadcast_to(jnp.arange(k_seg.shape[1], dtype=jnp.int32)[None], k_seg.shape)
  kept_mask = attention_mask(seg_kept, pos_kept, slots + write_index, k_seg, k_pos, k_slots, config.sliding_window)
  sos_slot = _sos(config, seg_kept, k_seg)
  run = lambda h, m, c: layer(h, cos, sin, m, c, write_index, sos_slot, mlp_weight)
  if trol_gate is None:
    y_kept, new_cache = run(x_kept, kept_mask, inner_cache)
  else:
    y_kept, new_cache = trol.apply_layer(
        lambda _: run, module, x_kept, kept_mask, inner_cache, write_index, trol_gate, config, decode
    )
  if book is not None:
    new_cache = {**new_cache, CACHE_KEY: {"segment_ids": k_seg, "positions": k_pos, "end": write_index + s_kept}}
  if not routed:
    return y_kept, new_cache

  w = weight[..., None]
  skipped = (w * x.astype(jnp.float32)).astype(x.dtype)
  if trol_gate is not None:
    # Both passes skip the token: h1 = w·x, h2 = w·h1, mixed by the gate of h1.
    skipped = trol.mix(skipped, (w * skipped.astype(jnp.float32)).astype(x.dtype), trol_gate["kernel"], trol_gate["bias"])
  passthrough = jnp.where(vision_mask.astype(bool)[..., None], skipped, x)
  return jnp.where(route["kept"][..., None], _take(y_kept, route["slot"]), passthrough), new_cache


def _sos(config: DecoderConfig, q_segments: Array, k_segments: Array) -> Array | None:
  """Phantom's sos slots in the layer's own slot space (None without Phantom)."""
  return phantom.sos_slots(q_segments, k_segments) if config.phantom is not None else None


def pmod_cost(config: LLVMConfig, seq_len: int, n_vision: int) -> dict[str, float]:
  """Analytic cost of one sample of `seq_len` tokens, `n_vision` of them vision tokens, with and
  without p-MoD (`config.decoder.pmod`): forward FLOPs (flops.py conventions: causal attention at ½;
  a training step is 3x) and the KV-cache bytes after its prefill (the whole cache pytree of
  init_cache, in the compute dtype), and the vision tokens' own KV ratio (mean retention over the
  layers). Other techniques' extra compute is not counted.
  """
  from llvm_jax.models.decoder import init_cache  # decoder imports this module

  dec = config.decoder
  ratios = layer_ratios(dec)
  if not ratios:
    raise ValueError("pmod_cost: config.decoder.pmod is off")
  dense = dataclasses.replace(dec, pmod=None)
  tokens = [kept_length(seq_len, n_vision, ratios[l]) if l in ratios else seq_len for l in range(dec.num_layers)]
  head = 2 * dec.embed_dim * dec.vocab_size * seq_len
  routers = len(ratios) * 2 * dec.embed_dim * seq_len
  decoder_dense = dec.num_layers * flops.decoder_layer_forward_flops(dec, seq_len) + head
  decoder_pmod = sum(flops.decoder_layer_forward_flops(dec, t) for t in tokens) + head + routers
  encoder = 0.0
  if config.vision is not None and n_vision:
    images = n_vision / config.tokens_per_image
    encoder = images * (flops.vision_forward_flops(config.vision) + flops.projector_forward_flops(config))

  def cache_bytes(cfg: DecoderConfig, num_vision: int) -> int:
    shapes = jax.eval_shape(lambda: init_cache(cfg, 1, seq_len, num_vision=num_vision))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(shapes))

  kv_dense, kv_pmod = cache_bytes(dense, 0), cache_bytes(dec, n_vision)
  return {
      "mod_layers": len(ratios),
      "kept_tokens_per_layer": tokens,
      "decoder_flops_dense": decoder_dense,
      "decoder_flops_pmod": decoder_pmod,
      "decoder_flops_ratio": decoder_pmod / decoder_dense,
      "flops_dense": decoder_dense + encoder,
      "flops_pmod": decoder_pmod + encoder,
      "flops_ratio": (decoder_pmod + encoder) / (decoder_dense + encoder),
      "kv_bytes_dense": kv_dense,
      "kv_bytes_pmod": kv_pmod,
      "kv_ratio": kv_pmod / kv_dense,
      # The vision tokens' share of the cache alone: the mean retention over all layers.
      "vision_kv_ratio": (
          sum(kept_count(ratios[l], n_vision) if l in ratios else n_vision for l in range(dec.num_layers))
          / (dec.num_layers * n_vision) if n_vision else 1.0
      ),
  }
