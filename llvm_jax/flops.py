"""Analytic FLOPs of the model, every technique's extra work included: the one place FLOPs are counted.

Conventions (as MaxText's MFU): a multiply-add is 2 FLOPs; causal attention counts half of the T x T
score and value products (each query sees T/2 keys on average); a training step is 3 x forward
(backward = 2 x forward); rematerialisation is not counted. Matmuls are counted, elementwise work is
not, except the few technique additions listed below (so a technique's count is never zero).

Per technique, on top of the dense decoder (attention projections, MLP, attention, LM head), the
vision tower (patch embedding, bidirectional layers) and the projector:
  TroL      a second pass of every traversed layer (its Phantom work included), plus the TroL-Mixer:
            the gate's dot product (2D) and the mix (3D) per token;
  Phantom   per layer and token: the XAttn modules (four d x d matmuls per head on the H query and
            2 x Hkv key/value heads, and the sos softmax's H x H (Hkv x Hkv) scores and values),
            attention over a 2d-wide head (twice the score and value FLOPs) and the two Linear(d, 1)
            gates per head;
  p-MoD     each MoD layer runs on the text plus its kept vision tokens only (S − n + trunc(r·n),
            attention over those alone), plus the router (2D per token of the layer's input); a
            scanned stack runs each stage at its largest ratio (`pmod.stage_ratios`): those extra
            slots are overhead, not model FLOPs, and are not counted;
  DeepStack DeepStack-L runs the g_h*g_w crops through the vision tower and projector and adds G x T x D
            residuals; DeepStack-V runs the crops' patch embedding and their first `crop_layer` ViT
            layers (`DeepStackConfig.crop_layer`, default vit_start) and adds G x grid² x Dv residuals.

XLA's `compiled.cost_analysis()['flops']` differs: it counts masked (causal) attention in full,
elementwise ops (norms, softmax, activations, RoPE, residual adds) at about one FLOP per element, and
rematerialised forwards again; `causal=False` below gives the all-keys count to compare with it.

  flops.train_flops_per_sample(cfg, seq_len, images)   # the trainer's and the benchmarks' MFU
  flops.forward_flops(cfg, seq_len, images)            # one sample's forward, by part
  flops.decode_flops_per_token(cfg, context)           # one decode step of one row
"""

from __future__ import annotations

import dataclasses
from typing import Any

from llvm_jax.models.config import DecoderConfig, LLVMConfig, VisionConfig
from llvm_jax.models.pmod import kept_count, kept_length, layer_ratios
from llvm_jax.models.trol import num_gates, traversed_layers

# Dense bf16 peak FLOP/s per chip, by `jax.Device.device_kind` prefix. TPUs: Cloud TPU system
# architecture pages (v4 275, v5e 197, v5p 459, v6e Trillium 918 TFLOP/s); GPUs: NVIDIA datasheets
# (dense, no sparsity).
PEAK_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # deviceless v5p topologies report 'TPU v5'
    "TPU v6 lite": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one chip of this `device_kind`, None when unknown."""
  # Longest prefix first, so 'TPU v5 lite' does not match 'TPU v5'.
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if device_kind.startswith(prefix):
      return PEAK_FLOPS[prefix]
  return None


# --- The dense blocks ---------------------------------------------------------------------------


def decoder_layer_matmul_params(cfg: DecoderConfig) -> int:
  """Weights one token multiplies through in a decoder layer (q, k, v, o and the gated MLP)."""
  attn = cfg.embed_dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * cfg.embed_dim * cfg.mlp_dim
  return attn + mlp


def causal_keys(tokens: float, causal: bool = True) -> float:
  """Mean keys per query of self-attention over `tokens`: T/2 causal (the MFU convention), else T."""
  return tokens / 2 if causal else tokens


def decoder_layer_forward_flops(cfg: DecoderConfig, tokens: float, keys: float | None = None) -> float:
  """One plain decoder layer over `tokens` queries, each attending to `keys` keys (default: causal, T/2)."""
  keys = causal_keys(tokens) if keys is None else keys
  dense = 2 * decoder_layer_matmul_params(cfg) * tokens
  attention = 2 * 2 * tokens * keys * cfg.num_heads * cfg.head_dim  # q·k and p·v
  return dense + attention


def lm_head_flops(cfg: DecoderConfig, tokens: float) -> float:
  return 2 * cfg.embed_dim * cfg.vocab_size * tokens


def vision_forward_flops(cfg: VisionConfig) -> float:
  """One image (tile) through the layers the feature layer needs; bidirectional attention."""
  n, w = cfg.num_positions, cfg.width
  patch = 2 * (cfg.patch_size**2 * cfg.num_channels) * w * cfg.grid**2
  per_layer = 2 * (4 * w * w + 2 * w * cfg.mlp_dim) * n + 2 * 2 * n * n * w
  return patch + cfg.num_layers_used * per_layer


def projector_forward_flops(cfg: LLVMConfig) -> float:
  """One image's features through the projector."""
  d = cfg.decoder.embed_dim
  vision_in = cfg.vision.width
  tokens = cfg.tokens_per_image
  if cfg.projector.kind == "linear":
    return 2 * vision_in * d * tokens
  if cfg.projector.kind == "pixel_shuffle_mlp":
    vision_in *= cfg.projector.shuffle_factor**2
  return 2 * (vision_in * d + d * d) * tokens


# --- Technique additions ------------------------------------------------------------------------


def phantom_layer_flops(cfg: DecoderConfig, tokens: float, keys: float) -> float:
  """Phantom's extra forward FLOPs in one layer for `tokens` queries over `keys` keys each."""
  d, h, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  # XAttn_q over H heads, XAttn_k and XAttn_v over Hkv: four Linear(d, d) each, and the sos
  # softmax's scores and values over the heads.
  xattn = 2 * 4 * d * d * (h + 2 * hkv) + 2 * 2 * d * (h * h + 2 * hkv * hkv)
  wider_attention = 2 * 2 * h * d * keys  # the extra d of q·k and p·v
  gates = 2 * 2 * h * d  # gate_1(O1) and gate_2(O2), Linear(d, 1) per head
  return tokens * (xattn + wider_attention + gates)


def trol_mixer_flops(cfg: DecoderConfig, tokens: float) -> float:
  """The TroL-Mixer of one traversed layer: gate aᵀh1 (2D) and (1 − w)·h1 + w·h2 (3D) per token."""
  return 5 * cfg.embed_dim * tokens


def pmod_router_flops(cfg: DecoderConfig, tokens: float) -> float:
  """A MoD layer's router, Linear(D, 1), over every token of its input."""
  return 2 * cfg.embed_dim * tokens


def deepstack_flops_per_image(cfg: LLVMConfig) -> dict[str, float]:
  """DeepStack's extra forward FLOPs per image: the crops' encoding and the residual additions."""
  ds = cfg.deepstack
  if ds is None:
    return {"crops": 0.0, "injection": 0.0}
  groups = ds.num_groups
  crops = groups * (vision_forward_flops(cfg.vision) + projector_forward_flops(cfg)) if ds.llm else 0.0
  injection = groups * cfg.tokens_per_image * cfg.decoder.embed_dim if ds.llm else 0.0
  if ds.vit_start is not None:
    crop_vision = dataclasses.replace(cfg.vision, feature_layer=ds.crop_layer)
    crops += groups * vision_forward_flops(crop_vision)
    injection += groups * cfg.vision.grid**2 * cfg.vision.width
  return {"crops": float(crops), "injection": float(injection)}


# --- Whole model --------------------------------------------------------------------------------


def decoder_flops(cfg: DecoderConfig, seq_len: int, num_vision: int = 0, causal: bool = True) -> dict[str, float]:
  """Forward FLOPs of the decoder over `seq_len` tokens, `num_vision` of them vision tokens (p-MoD's
  routing targets), by part; causal=False counts every key (as XLA does for masked attention)."""
  ratios = layer_ratios(cfg)
  traversed = set(traversed_layers(cfg))
  base = phantom = trol_extra = routers = 0.0
  for layer in range(cfg.num_layers):
    tokens = seq_len
    if layer in ratios:
      tokens = kept_length(seq_len, num_vision, ratios[layer])
      routers += pmod_router_flops(cfg, seq_len)
    keys = causal_keys(tokens, causal)
    layer_flops = decoder_layer_forward_flops(cfg, tokens, keys)
    extra = phantom_layer_flops(cfg, tokens, keys) if cfg.phantom is not None else 0.0
    base += layer_flops
    phantom += extra
    if layer in traversed:
      # The second pass (Phantom included) on the same tokens, and the mixer.
      trol_extra += layer_flops + extra + trol_mixer_flops(cfg, tokens)
  head = lm_head_flops(cfg, seq_len)
  total = base + phantom + trol_extra + routers + head
  return {"layers": base, "phantom": phantom, "trol": trol_extra, "pmod_routers": routers, "head": head, "total": total}


def decoder_forward_flops(cfg: DecoderConfig, seq_len: int, num_vision: int = 0, causal: bool = True) -> float:
  """Forward FLOPs of the decoder (total of `decoder_flops`)."""
  return decoder_flops(cfg, seq_len, num_vision, causal)["total"]


def vision_tokens(cfg: LLVMConfig, images: float) -> int:
  """Vision tokens of a sample with `images` images (tiles); a fractional mean rounds."""
  return int(round(images * cfg.tokens_per_image)) if cfg.vision is not None else 0


def forward_flops(cfg: LLVMConfig, seq_len: int, images: float, causal: bool = True) -> dict[str, float]:
  """Forward FLOPs of one sample of `seq_len` tokens (image tokens included) with `images` images
  (tiles; a batch mean may be fractional), by part: decoder, vision, projector, deepstack, total."""
  use_images = cfg.vision is not None and images > 0
  parts = {
      "decoder": decoder_forward_flops(cfg.decoder, seq_len, vision_tokens(cfg, images) if use_images else 0, causal)
  }
  if use_images:
    parts["vision"] = images * vision_forward_flops(cfg.vision)
    parts["projector"] = images * projector_forward_flops(cfg)
    if cfg.deepstack is not None:
      ds = deepstack_flops_per_image(cfg)
      parts["deepstack"] = images * (ds["crops"] + ds["injection"])
  parts["total"] = sum(parts.values())
  return parts


def train_flops_per_sample(cfg: LLVMConfig, seq_len: int, images: float) -> float:
  """Training FLOPs of one sample: 3 x forward (causal attention at ½, no remat), techniques included."""
  return 3 * forward_flops(cfg, seq_len, images)["total"]


def prefill_flops(cfg: LLVMConfig, text_tokens: int, images: float = 1) -> dict[str, float]:
  """Forward FLOPs of a prompt of `images` images (tiles) and `text_tokens` text tokens, by part."""
  return forward_flops(cfg, text_tokens + vision_tokens(cfg, images), images)


def decode_flops_per_token(cfg: LLVMConfig, context: int, num_vision: int = 0) -> float:
  """One decode step of one row at `context` cache slots (the new token included), `num_vision` of
  them vision tokens of the prompt.

  Every key is attended (no causal ½); a MoD layer attends only to its kept slots; TroL adds a second
  pass of each traversed layer with 'full' decoding and nothing with 'official'; Phantom's 'recompute'
  cache recomputes XAttn_k and XAttn_v over every cached slot. DeepStack costs nothing here.
  """
  dec = cfg.decoder
  ratios = layer_ratios(dec)
  traversed = set(traversed_layers(dec)) if dec.trol is not None and dec.trol.decode_traversal == "full" else set()
  d, hkv = dec.head_dim, dec.num_kv_heads
  total = lm_head_flops(dec, 1)
  for layer in range(dec.num_layers):
    keys = context if layer not in ratios else context - num_vision + kept_count(ratios[layer], num_vision)
    layer_flops = decoder_layer_forward_flops(dec, 1, keys)
    if dec.phantom is not None:
      layer_flops += phantom_layer_flops(dec, 1, keys)
      if dec.phantom.cache == "recompute":
        layer_flops += keys * 2 * (2 * 4 * d * d * hkv + 2 * 2 * d * hkv * hkv)
    total += layer_flops
    if layer in traversed:
      total += layer_flops + trol_mixer_flops(dec, 1)
  return total


# --- Per-technique reports (benchmarks, experiments/cost_table.py) -------------------------------


def trol_overhead(config: DecoderConfig, seq_len: int, causal: bool = True) -> dict[str, float]:
  """Analytic cost of TroL on `config` (forward, per token; multiply by 3 for a training step).

  Training / prefill at `seq_len` tokens counts causal attention at ½ (seq_len / 2 keys per token),
  as MFU conventions do; causal=False counts all seq_len keys, as XLA's cost analysis of a masked
  dense attention does. Decoding one token at context `seq_len` attends to seq_len keys; it costs
  nothing extra with 'official' decoding and a second pass of each traversed layer with 'full'.
  Phantom, when also on, is counted in the layers; p-MoD is not (no vision tokens here).
  """
  if config.trol is None:
    raise ValueError("trol_overhead: config.trol is None (TroL is off)")
  parts = decoder_flops(config, seq_len, causal=causal)
  base = parts["total"] - parts["trol"]
  llvm = LLVMConfig(decoder=config, vision=None)
  decode = decode_flops_per_token(llvm, seq_len)
  decode_base = decode_flops_per_token(LLVMConfig(decoder=dataclasses.replace(config, trol=None), vision=None), seq_len)
  return {
      "traversed_layers": len(traversed_layers(config)),
      "added_params": num_gates(config) * (config.embed_dim + 1),
      "base_flops_per_token": base / seq_len,
      "added_flops_per_token": parts["trol"] / seq_len,
      "flops_ratio": parts["total"] / base,
      "decode_base_flops_per_token": decode_base,
      "decode_added_flops_per_token": decode - decode_base,
  }


def pmod_cost(config: LLVMConfig, seq_len: int, n_vision: int) -> dict[str, Any]:
  """FLOPs of one sample of `seq_len` tokens, `n_vision` of them vision tokens, with and without p-MoD
  (`config.decoder.pmod`; any other technique counted in both), and the vision tokens' KV retention
  (mean over the layers). The KV-cache bytes themselves are `cost.pmod_kv_bytes`.
  """
  dec = config.decoder
  ratios = layer_ratios(dec)
  if not ratios:
    raise ValueError("pmod_cost: config.decoder.pmod is off")
  dense = dataclasses.replace(dec, pmod=None)
  images = n_vision / config.tokens_per_image if config.vision is not None and n_vision else 0.0
  dense_cfg = dataclasses.replace(config, decoder=dense)
  decoder_dense = decoder_forward_flops(dense, seq_len)
  decoder_pmod = decoder_forward_flops(dec, seq_len, n_vision)
  total_dense = forward_flops(dense_cfg, seq_len, images)["total"] if images else decoder_dense
  encoder = total_dense - decoder_dense
  retained = sum(kept_count(ratios[l], n_vision) if l in ratios else n_vision for l in range(dec.num_layers))
  return {
      "mod_layers": len(ratios),
      "kept_tokens_per_layer": [
          kept_length(seq_len, n_vision, ratios[l]) if l in ratios else seq_len for l in range(dec.num_layers)
      ],
      "decoder_flops_dense": decoder_dense,
      "decoder_flops_pmod": decoder_pmod,
      "decoder_flops_ratio": decoder_pmod / decoder_dense,
      "flops_dense": decoder_dense + encoder,
      "flops_pmod": decoder_pmod + encoder,
      "flops_ratio": (decoder_pmod + encoder) / (decoder_dense + encoder),
      # The vision tokens' share of the cache alone: the mean retention over all layers.
      "vision_kv_ratio": retained / (dec.num_layers * n_vision) if n_vision else 1.0,
  }


def deepstack_cost(config: LLVMConfig, text_tokens: int = 0) -> dict[str, Any]:
  """Analytic forward cost of DeepStack against the base model and plain LLaVA with the crops'
  tokens in the context, per sample of `text_tokens` text tokens and one image."""
  ds = config.deepstack
  if ds is None:
    raise ValueError("deepstack_cost needs a config with a deepstack block")
  groups = ds.num_groups
  tokens = config.tokens_per_image
  view = vision_forward_flops(config.vision) + projector_forward_flops(config)
  extra = deepstack_flops_per_image(config)
  context = text_tokens + tokens
  plain_context = text_tokens + tokens * (1 + groups)
  llm = decoder_forward_flops(config.decoder, context, tokens)
  llm_plain = decoder_forward_flops(config.decoder, plain_context, tokens * (1 + groups))
  total = view + extra["crops"] + llm + extra["injection"]
  total_plain = (1 + groups) * view + llm_plain
  return {
      "groups": groups,
      "llm_layers": ds.llm_layers,
      "vit_layers": () if ds.vit_start is None else tuple(range(ds.vit_start, ds.vit_start + groups)),
      "extra_params": 0,
      "context_tokens": context,
      "context_tokens_plain_hires": plain_context,
      "vision_flops_per_image": view,
      "vision_flops_per_image_deepstack": view + extra["crops"],
      "vision_flops_ratio": (view + extra["crops"]) / view,
      "injection_flops": extra["injection"],
      "llm_flops": llm,
      "llm_flops_plain_hires": llm_plain,
      "total_flops": total,
      "total_flops_plain_hires": total_plain,
      "total_flops_ratio_vs_plain_hires": total / total_plain,
  }
