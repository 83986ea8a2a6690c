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
steps (`ModLayer.cache_length`), with its own bookkeeping under `CACHE_KEY` ({'segment_ids', 'positions',
'end'}) since its prefill wrote fewer slots than the shared cache's. Decode steps are text, always
kept: the dense layer runs over the shorter cache.

With TroL the routing is decided once, before the first pass, and reused by the
second: the MoD layer F (fixed kept set and weights) is applied twice, h1 = F(x), h2 = F(h1), and the
TroL-Mixer mixes them; so a skipped vision token gives mix(w·x, w²·x).

Scanned stacks: MoD layers of different ratios have different static shapes, so a scanned stack cuts
them into `pmod.scan_groups` stages sized by their largest ratio (`stage_ratios`), each layer keeping
its own k inside; scanned and unrolled stacks compute the same function.

In the layer loop (`hooks.py`) p-MoD is two hooks: `Routing` (outside TroL: the routing is decided
once per layer) and `ModLayer` (inside TroL: each pass runs the layer on the kept tokens).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax.models import hooks, layers, masks
from llvm_jax.models.config import DecoderConfig, resolve_dtype

Array = jax.Array
Cache = dict[str, Any]

# Key of a MoD layer's own slot bookkeeping inside its layer cache.
CACHE_KEY = "pmod"
# Key of a MoD layer's routing in LayerContext.extras (from Routing to ModLayer).
ROUTING_KEY = "pmod_routing"


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
        "kernel": self.param(
            "kernel", layers.logical_init(init, ("pmod_layers", "embed")), (count, cfg.embed_dim), pdtype
        )
    }
    if cfg.pmod.router_bias:
      routers["bias"] = self.param("bias", layers.logical_init(init, ("pmod_layers",)), (count,), pdtype)
    return routers


def router_weight(x: Array, router: dict[str, Array], config: DecoderConfig) -> Array:
  """w = α·tanh(s) + β with s = router(x), (B, S) float32."""
  s = jnp.einsum("bsd,d->bs", x, router["kernel"].astype(x.dtype), preferred_element_type=jnp.float32)
  if "bias" in router:
    s = s + router["bias"].astype(jnp.float32)
  return config.pmod.tanh_scale * jnp.tanh(s) + config.pmod.tanh_bias


def kept_table(ratio: float, num_vision: int) -> np.ndarray:
  """(num_vision + 1,) int32: trunc(r·n) for a row holding n = 0..num_vision vision tokens."""
  return np.asarray([kept_count(ratio, n) for n in range(num_vision + 1)], np.int32)


def select(
    weight: Array, vision_mask: Array, segment_ids: Array, num_vision: int, ratio: float, table: Array | None = None
) -> dict[str, Array]:
  """Which tokens a MoD layer keeps, and where they go (static shapes).

  Returns 'kept' (B, S) bool: text tokens and each row's top-k vision tokens by weight (k = trunc(r·n)
  of its n vision tokens; ties go to the earlier token); 'index' (B, S_kept): the kept tokens in
  order, then filler; 'valid' (B, S_kept): the slots holding kept tokens; 'slot' (B, S): each kept
  token's slot. `ratio` sizes S_kept; `table` (`kept_table`, default that of `ratio`) gives k per
  row, so a layer of a scanned stage keeps its own k inside the stage's larger S_kept.
  """
  b, s = weight.shape
  s_kept = kept_length(s, num_vision, ratio)
  k_max = kept_count(ratio, num_vision)
  present = segment_ids != 0
  vision = vision_mask & present
  kept = ~vision_mask & present
  if k_max:
    table = kept_table(ratio, num_vision) if table is None else table
    # k of a row with n vision tokens from a table, so it equals the static k_max when n = num_vision.
    k = jnp.asarray(table)[jnp.minimum(jnp.sum(vision, axis=1), num_vision)]
    _, top = jax.lax.top_k(jnp.where(vision, weight, -jnp.inf), k_max)
    chosen = jnp.arange(k_max)[None, :] < k[:, None]
    kept |= jnp.zeros((b, s), bool).at[jnp.arange(b)[:, None], top].set(chosen)
  rank = jnp.cumsum(kept, axis=1, dtype=jnp.int32)
  # What does not fit passes through as padding does (check_fits raises on concrete inputs).
  kept &= rank <= s_kept
  rank = jnp.minimum(rank, s_kept)
  # method='sort': one sort, no while loop (the default binary search is a loop per MoD layer, whose body
  # XLA's cost analysis counts once and whose iterations run one after another).
  slots = jnp.arange(1, s_kept + 1, dtype=jnp.int32)
  index = jax.vmap(lambda r: jnp.searchsorted(r, slots, side="left", method="sort"))(rank)
  return {
      "kept": kept,
      "index": jnp.minimum(index, s - 1),
      "valid": jnp.arange(s_kept)[None, :] < rank[:, -1:],
      "slot": jnp.maximum(rank - 1, 0),
  }


def check_fits(config: DecoderConfig, vision_mask: Any, segment_ids: Any, num_vision: int) -> None:
  """Raises if a row's text plus kept vision tokens exceed a MoD layer's S_kept, or it has more than
  `num_vision` vision tokens. Concrete (host) arrays only; traced values are skipped."""
  if vision_mask is None or isinstance(vision_mask, jax.core.Tracer) or isinstance(segment_ids, jax.core.Tracer):
    return
  present = np.asarray(segment_ids) != 0
  vision = np.asarray(vision_mask).astype(bool) & present
  n = vision.sum(axis=1)
  text = (present & ~vision).sum(axis=1)
  seq_len = present.shape[1]
  if (n > num_vision).any():
    raise ValueError(
        f"p-MoD: rows {np.nonzero(n > num_vision)[0].tolist()} hold more than num_vision={num_vision} vision tokens"
    )
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


def stage_ratios(config: DecoderConfig, scanned: bool) -> dict[int, float]:
  """MoD layer -> the ratio that sizes its static shapes (S_kept, cache length).

  Unrolled: the layer's own ratio. Scanned: the MoD layers are cut into `pmod.scan_groups` runs of
  consecutive layers, each sized by its largest ratio, so each run is one scanned stage; a layer
  keeps its own k inside (the extra slots are padding), so the function is the unrolled one.
  """
  ratios = layer_ratios(config)
  if not scanned or not ratios:
    return ratios
  runs: list[list[int]] = []
  for layer in ratios:
    if runs and runs[-1][-1] == layer - 1:
      runs[-1].append(layer)
    else:
      runs.append([layer])
  groups = max(config.pmod.scan_groups, len(runs))
  sized = {}
  for run in runs:
    # This run's share of the groups, at least one.
    parts = max(1, round(groups * len(run) / len(ratios)))
    for chunk in np.array_split(np.asarray(run), min(parts, len(run))):
      top = max(ratios[int(l)] for l in chunk)
      sized.update({int(l): top for l in chunk})
  return sized


def route(
    x: Array, ctx: hooks.LayerContext, router: dict[str, Array], table: Array, ratio: float, config: DecoderConfig
) -> dict[str, Array]:
  """The routing of one MoD layer on input x: router weights and `select`'s choice."""
  weight = router_weight(x, router, config)
  chosen = select(weight, ctx.vision_mask.astype(bool), ctx.mask.q_segment_ids, ctx.num_vision, ratio, table)
  return {**chosen, "weight": weight}


def run_routed(layer: hooks.LayerFn, config: DecoderConfig) -> hooks.LayerFn:
  """The MoD layer F: `layer` on the kept tokens of the routing in ctx.extras (decided once, outside
  TroL, so both passes keep the same tokens), STRing outputs for the rest (see the module docstring).

  Without a routing (decode steps, text-only calls) every token is kept: with a cache, the layer
  runs over its own shorter cache; without one, it is the dense layer exactly.
  """

  def mod_layer(x: Array, ctx: hooks.LayerContext, layer_cache: Cache | None) -> tuple[Array, Cache | None]:
    routing = ctx.extras.get(ROUTING_KEY)
    if routing is None and layer_cache is None:
      return layer(x, ctx, None)
    segment_ids, positions = ctx.mask.q_segment_ids, ctx.mask.q_positions
    cos, sin, mlp_weight = ctx.cos, ctx.sin, ctx.mlp_weight
    if routing is not None:
      if ctx.mask.sliding_window is not None and ctx.attention_impl == "splash":
        raise ValueError(
            "p-MoD with attention_impl 'splash' and a sliding window: splash's window counts token indices, "
            "but the kept tokens' positions skip the dropped vision tokens; use 'xla' or 'blocked'"
        )
      index = routing["index"]
      x_kept = _take(x, index)
      seg_kept = jnp.where(routing["valid"], _take(segment_ids, index), 0)
      pos_kept, cos, sin = _take(positions, index), _take(cos, index), _take(sin, index)
      vision_kept = _take(ctx.vision_mask.astype(bool), index)
      # STRing: kept vision tokens scale their MLP update by w, text tokens do not.
      mlp_weight = jnp.where(vision_kept, _take(routing["weight"], index), 1.0)[..., None]
    else:
      x_kept, seg_kept, pos_kept = x, segment_ids, positions

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
    kept_mask = masks.MaskInfo(seg_kept, slots + write_index, pos_kept, k_seg, k_slots, k_pos, ctx.mask.sliding_window)
    inner_extras = {k: v for k, v in ctx.extras.items() if k != ROUTING_KEY}
    inner_ctx = ctx.replace(
        cos=cos, sin=sin, mask=kept_mask, write_index=write_index, mlp_weight=mlp_weight, extras=inner_extras
    )
    y_kept, new_cache = layer(x_kept, inner_ctx, inner_cache)
    if book is not None:
      new_cache = {**new_cache, CACHE_KEY: {"segment_ids": k_seg, "positions": k_pos, "end": write_index + s_kept}}
    if routing is None:
      return y_kept, new_cache
    # Skipped vision tokens: w·x (STRing); text and padding that were not kept pass through.
    skipped = (routing["weight"][..., None] * x.astype(jnp.float32)).astype(x.dtype)
    passthrough = jnp.where(ctx.vision_mask.astype(bool)[..., None], skipped, x)
    return jnp.where(routing["kept"][..., None], _take(y_kept, routing["slot"]), passthrough), new_cache

  return mod_layer


class Routing(hooks.Technique):
  """p-MoD's outer hook: routes a MoD layer's input once (before TroL, which reuses the routing)."""

  name = "pmod_routing"
  param_name = "pmod_router"

  def enabled(self, config: DecoderConfig) -> bool:
    return bool(layer_ratios(config))

  def param_module(self, config: DecoderConfig) -> nn.Module:
    return Routers(config)

  def signature(self, config: DecoderConfig, layer: int, scanned: bool) -> float | None:
    return stage_ratios(config, scanned).get(layer)

  def layer_inputs(self, config: DecoderConfig, params: Any, num_vision: int, residual_layers: tuple[int, ...]) -> Any:
    ratios = layer_ratios(config)
    rows = np.zeros(config.num_layers, np.int32)
    rows[list(ratios)] = np.arange(len(ratios))
    tables = np.zeros((config.num_layers, num_vision + 1), np.int32)
    for layer, ratio in ratios.items():
      tables[layer] = kept_table(ratio, num_vision)
    return {"router": {name: value[rows] for name, value in params.items()}, "table": tables}

  def wrap(self, fn: hooks.LayerFn, config: DecoderConfig, signature: float | None, inputs: Any) -> hooks.LayerFn:
    if signature is None:
      return fn

    def routed(x: Array, ctx: hooks.LayerContext, layer_cache: Cache | None) -> tuple[Array, Cache | None]:
      if ctx.vision_mask is None or not ctx.num_vision:
        return fn(x, ctx, layer_cache)
      routing = route(x, ctx, inputs["router"], inputs["table"], signature, config)
      return fn(x, ctx.replace(extras={**ctx.extras, ROUTING_KEY: routing}), layer_cache)

    return routed

  def check_call(self, config: DecoderConfig, vision_mask: Any, segment_ids: Any, num_vision: int) -> None:
    check_fits(config, vision_mask, segment_ids, num_vision)


class ModLayer(hooks.Technique):
  """p-MoD's inner hook: a MoD layer runs on its kept tokens and caches only those."""

  name = "pmod"

  def enabled(self, config: DecoderConfig) -> bool:
    return bool(layer_ratios(config))

  def signature(self, config: DecoderConfig, layer: int, scanned: bool) -> float | None:
    return stage_ratios(config, scanned).get(layer)

  def wrap(self, fn: hooks.LayerFn, config: DecoderConfig, signature: float | None, inputs: Any) -> hooks.LayerFn:
    return fn if signature is None else run_routed(fn, config)

  def cache_length(self, config: DecoderConfig, signature: float | None, max_len: int, num_vision: int) -> int:
    # A MoD layer's prefill of `num_vision` vision tokens writes kept_length slots, each later token one.
    return max_len if signature is None else kept_length(max_len, num_vision, signature)

  def cache_entries(
      self, config: DecoderConfig, signature: float | None, layer_cache: Cache, batch: int, max_len: int, dtype: Any
  ) -> Cache:
    # A MoD layer writes fewer slots than the shared cache, so it tracks its own.
    return layer_cache if signature is None else {**layer_cache, **init_cache_entries(batch, max_len)}


ROUTING = Routing()
MOD_LAYER = ModLayer()
