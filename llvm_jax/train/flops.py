"""Analytic FLOPs of the model (for MFU and cost reports).

Conventions (as MaxText's MFU): a multiply-add is 2 FLOPs; causal attention counts half of the
T x T score and value products; training = 3 x forward (backward is twice the forward); no remat.
"""

from __future__ import annotations

from llvm_jax.models.config import DecoderConfig, LLVMConfig, VisionConfig

# Dense bf16 peak FLOP/s per chip, by `jax.Device.device_kind` prefix.
PEAK_FLOPS = {
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
}


def peak_flops(device_kind: str) -> float | None:
  for prefix, flops in PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      return flops
  return None


def decoder_layer_matmul_params(cfg: DecoderConfig) -> int:
  attn = cfg.embed_dim * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  mlp = 3 * cfg.embed_dim * cfg.mlp_dim
  return attn + mlp


def decoder_layer_forward_flops(cfg: DecoderConfig, tokens: int, context: int | None = None) -> float:
  """One decoder layer over `tokens` queries attending causally to `context` keys (default: tokens)."""
  context = tokens if context is None else context
  dense = 2 * decoder_layer_matmul_params(cfg) * tokens
  # QK^T and AV, each 2*T*S*H*d; causal: half of the full T x S products when T == S.
  attention = 2 * 2 * tokens * context * cfg.num_heads * cfg.head_dim
  if context == tokens:
    attention /= 2
  return dense + attention


def decoder_forward_flops(cfg: DecoderConfig, seq_len: int) -> float:
  head = 2 * cfg.embed_dim * cfg.vocab_size * seq_len
  return cfg.num_layers * decoder_layer_forward_flops(cfg, seq_len) + head


def vision_forward_flops(cfg: VisionConfig) -> float:
  """One image (tile) through the layers the feature layer needs; bidirectional attention."""
  n = cfg.num_positions
  w = cfg.width
  patch = 2 * (cfg.patch_size**2 * cfg.num_channels) * w * cfg.grid**2
  per_layer = 2 * (4 * w * w + 2 * w * cfg.mlp_dim) * n + 2 * 2 * n * n * w
  return patch + cfg.num_layers_used * per_layer


def projector_forward_flops(cfg: LLVMConfig) -> float:
  d = cfg.decoder.embed_dim
  vision_in = cfg.vision.width
  tokens = cfg.tokens_per_image
  if cfg.projector.kind == "linear":
    return 2 * vision_in * d * tokens
  if cfg.projector.kind == "pixel_shuffle_mlp":
    vision_in *= cfg.projector.shuffle_factor**2
  return 2 * (vision_in * d + d * d) * tokens


def forward_flops(cfg: LLVMConfig, seq_len: int, images: int) -> dict[str, float]:
  """Forward FLOPs of one sample of `seq_len` tokens with `images` images (tiles)."""
  parts = {"decoder": decoder_forward_flops(cfg.decoder, seq_len)}
  if cfg.vision is not None and images:
    parts["vision"] = images * vision_forward_flops(cfg.vision)
    parts["projector"] = images * projector_forward_flops(cfg)
  parts["total"] = sum(parts.values())
  return parts


def train_flops_per_sample(cfg: LLVMConfig, seq_len: int, images: int) -> float:
  return 3 * forward_flops(cfg, seq_len, images)["total"]
