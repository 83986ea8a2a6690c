"""`transformers` config <-> our config dataclasses, for the decoder families we support."""

from __future__ import annotations

from typing import Any

from llvm_jax.models.config import DecoderConfig, RopeConfig

_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3"}


def rope_from_hf(params: dict[str, Any] | None) -> RopeConfig:
  params = dict(params or {})
  kind = params.pop("rope_type", params.pop("type", "default"))
  fields = {"theta": params.pop("rope_theta", 10000.0), "type": kind}
  for key in (
      "factor",
      "partial_rotary_factor",
      "low_freq_factor",
      "high_freq_factor",
      "original_max_position_embeddings",
      "beta_fast",
      "beta_slow",
      "mscale",
      "mscale_all_dim",
      "truncate",
      "attention_factor",
  ):
    if params.get(key) is not None:
      fields[key] = params.pop(key)
  for key in ("short_factor", "long_factor"):
    if params.get(key) is not None:
      fields[key] = tuple(float(v) for v in params.pop(key))
  leftovers = {k: v for k, v in params.items() if v is not None}
  if leftovers:
    raise ValueError(f"unsupported rope parameters {sorted(leftovers)} in {kind!r} rope config")
  return RopeConfig(**fields)


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
  out: dict[str, Any] = {"rope_theta": rope.theta, "rope_type": rope.type}
  if rope.partial_rotary_factor != 1.0:
    out["partial_rotary_factor"] = rope.partial_rotary_factor
  per_type = {
      "linear": ("factor",),
      "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
      "yarn": (
          "factor",
          "original_max_position_embeddings",
          "beta_fast",
          "beta_slow",
          "mscale",
          "mscale_all_dim",
          "truncate",
          "attention_factor",
      ),
      "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor", "long_factor"),
  }
  for key in per_type.get(rope.type, ()):
    value = getattr(rope, key)
    if value is not None:
      out[key] = list(value) if isinstance(value, tuple) else value
  return out


def decoder_config_from_hf(hf: Any, **overrides: Any) -> DecoderConfig:
  """DecoderConfig from a LlamaConfig / Qwen2Config / Phi3Config; rejects features we lack."""
  family = _FAMILIES.get(hf.model_type)
  if family is None:
    raise ValueError(f"unsupported decoder model_type {hf.model_type!r}; supported: {sorted(_FAMILIES)}")
  if getattr(hf, "hidden_act", "silu") != "silu":
    raise ValueError(f"{hf.model_type}: hidden_act={hf.hidden_act!r} unsupported (SwiGLU with silu only)")
  if getattr(hf, "mlp_bias", False):
    raise ValueError(f"{hf.model_type}: mlp_bias=True is unsupported")
  sliding_window = None
  if family == "phi3":
    sliding_window = getattr(hf, "sliding_window", None)
  elif family == "qwen2" and getattr(hf, "use_sliding_window", False):
    raise ValueError("qwen2: use_sliding_window=True (per-layer windows) is unsupported")
  qkv_bias = True if family == "qwen2" else bool(getattr(hf, "attention_bias", False))
  if family == "phi3" and getattr(hf, "attention_bias", False):
    raise ValueError("phi3: attention_bias=True is unsupported")
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
  fields = dict(
      family=family,
      vocab_size=hf.vocab_size,
      embed_dim=hf.hidden_size,
      num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads,
      num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
      head_dim=head_dim,
      mlp_dim=hf.intermediate_size,
      norm_eps=hf.rms_norm_eps,
      qkv_bias=qkv_bias,
      tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
      max_position_embeddings=hf.max_position_embeddings,
      sliding_window=sliding_window,
      rope=rope_from_hf(getattr(hf, "rope_parameters", None)),
  )
  fields.update(overrides)
  return DecoderConfig(**fields)


def decoder_config_to_hf(cfg: DecoderConfig, **extra: Any) -> Any:
  """The matching transformers config object for a DecoderConfig."""
  import transformers  # lazy: a heavy import, only paid when an HF model is actually used

  common = dict(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.embed_dim,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      num_key_value_heads=cfg.num_kv_heads,
      intermediate_size=cfg.mlp_dim,
      rms_norm_eps=cfg.norm_eps,
      tie_word_embeddings=cfg.tie_embeddings,
      max_position_embeddings=cfg.max_position_embeddings,
      rope_parameters=rope_to_hf(cfg.rope),
      hidden_act="silu",
  )
  common.update(extra)
  if cfg.family == "llama":
    return transformers.LlamaConfig(head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, **common)
  if cfg.family == "qwen2":
    if not cfg.qkv_bias:
      raise ValueError("qwen2 always has q/k/v biases; qkv_bias=False cannot be exported as qwen2")
    return transformers.Qwen2Config(head_dim=cfg.head_dim, **common)
  if cfg.head_dim * cfg.num_heads != cfg.embed_dim:
    raise ValueError("phi3 derives head_dim = hidden_size / num_heads; this config cannot be exported")
  # Phi3Config's default special-token ids (32000) fall outside small vocabularies; token ids
  # belong to the tokenizer and are passed in `extra` when known.
  common = {"pad_token_id": None, "bos_token_id": None, "eos_token_id": None, **common}
  if cfg.rope.original_max_position_embeddings is not None:
    # Phi3Config reads this top-level field over the one inside rope_parameters.
    common["original_max_position_embeddings"] = cfg.rope.original_max_position_embeddings
  return transformers.Phi3Config(sliding_window=cfg.sliding_window, **common)
