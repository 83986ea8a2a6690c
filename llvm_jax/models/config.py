"""Model hyper-parameters as frozen dataclasses (hashable, so they can be Flax module attributes).

The experiment config (an `ml_collections.ConfigDict`) holds a `model` block with the same fields;
`LLVMConfig.from_dict` turns it into these dataclasses and rejects any unknown key by name, so a
typo in a config fails at once instead of silently training the default.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp

T = TypeVar("T")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str) -> Any:
  """Maps a dtype name from a config ('float32', 'bfloat16') to the jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def _from_dict(cls: type[T], values: Mapping[str, Any] | None, where: str) -> T:
  """Builds dataclass `cls` from a mapping, recursing into nested dataclass fields.

  Raises a ValueError naming every unknown key (with the closest valid name) so config typos
  surface immediately.
  """
  values = dict(values or {})
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = [k for k in values if k not in fields]
  if unknown:
    hints = []
    for key in unknown:
      close = difflib.get_close_matches(key, list(fields), n=1)
      hints.append(f"{where}.{key}" + (f" (did you mean {where}.{close[0]}?)" if close else ""))
    raise ValueError(f"unknown config key(s): {', '.join(hints)}")
  kwargs = {}
  for name, value in values.items():
    nested = _NESTED.get((cls.__name__, name))
    if nested is not None:
      kwargs[name] = None if value is None else _from_dict(nested, value, f"{where}.{name}")
    elif isinstance(value, list):
      kwargs[name] = tuple(value)
    else:
      kwargs[name] = value
  return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding, including the scaling variants of Llama, Qwen2 and Phi-3.

  `type`: 'default' | 'linear' | 'llama3' | 'yarn' | 'longrope' (names as in transformers).
  """

  theta: float = 10000.0
  type: str = "default"
  factor: float | None = None
  partial_rotary_factor: float = 1.0
  # llama3
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int | None = None
  # yarn
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float | None = None
  mscale_all_dim: float | None = None
  truncate: bool = True
  attention_factor: float | None = None
  # longrope
  short_factor: tuple[float, ...] | None = None
  long_factor: tuple[float, ...] | None = None


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A decoder-only LLM: Llama, Qwen2 (q/k/v bias) and Phi-3 share this shape."""

  family: str = "llama"
  vocab_size: int = 32000
  embed_dim: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 32
  head_dim: int = 128
  mlp_dim: int = 11008
  norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  # Keys further back than this many positions are masked (Phi-3 mini); None = full attention.
  sliding_window: int | None = None
  rope: RopeConfig = dataclasses.field(default_factory=RopeConfig)
  dtype: str = "float32"
  param_dtype: str = "float32"
  # Layers as one scanned module (params stacked on a leading 'layers' axis): faster compiles.
  scan_layers: bool = False
  # None (no rematerialisation) | 'full' | 'dots' | 'dots_no_batch' (see layers.REMAT_POLICIES).
  remat_policy: str | None = None

  def __post_init__(self):
    if self.family not in ("llama", "qwen2", "phi3"):
      raise ValueError(f"decoder.family must be llama, qwen2 or phi3, got {self.family!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"decoder.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
      )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT tower. `kind`: 'clip' | 'siglip' | 'internvit'."""

  kind: str = "clip"
  image_size: int = 336
  patch_size: int = 14
  num_channels: int = 3
  width: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 4096
  norm_eps: float = 1e-5
  # Hidden-state index whose features are used (LLaVA: -2, the penultimate layer; InternVL: -1).
  feature_layer: int = -2
  # 'default' drops the CLS token, 'full' keeps every token (as in LLaVA / InternVL).
  feature_select: str = "default"
  # InternViT options.
  qkv_bias: bool = True
  qk_norm: bool = False
  norm_type: str = "layer_norm"
  layer_scale: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.kind not in ("clip", "siglip", "internvit"):
      raise ValueError(f"vision.kind must be clip, siglip or internvit, got {self.kind!r}")
    if self.feature_select not in ("default", "full"):
      raise ValueError(f"vision.feature_select must be default or full, got {self.feature_select!r}")
    if self.image_size % self.patch_size:
      raise ValueError(f"vision.image_size={self.image_size} not divisible by patch {self.patch_size}")

  @property
  def has_cls(self) -> bool:
    return self.kind != "siglip"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_features(self) -> int:
    """Tokens per image out of the tower after feature selection."""
    n = self.grid**2
    if self.has_cls and self.feature_select == "full":
      n += 1
    return n


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Vision -> LLM projector. `kind`: 'mlp2x_gelu' | 'linear' | 'pixel_shuffle_mlp' (InternVL)."""

  kind: str = "mlp2x_gelu"
  # InternVL: pixel shuffle keeps (ratio * grid)^2 tokens with 1/ratio^2 times the channels.
  downsample_ratio: float = 0.5
  norm_eps: float = 1e-5
  dtype: str = "float32"
  param_dtype: str = "float32"

  def __post_init__(self):
    if self.kind not in ("mlp2x_gelu", "linear", "pixel_shuffle_mlp"):
      raise ValueError(f"projector.kind unknown: {self.kind!r}")


@dataclasses.dataclass(frozen=True)
class LLVMConfig:
  """Vision tower + projector + decoder; images replace runs of `image_token_id` in the text."""

  decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
  vision: VisionConfig | None = dataclasses.field(default_factory=VisionConfig)
  projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
  image_token_id: int = 32000

  @property
  def tokens_per_image(self) -> int:
    """Placeholder tokens one image (one tile for InternVL) expands to in the text."""
    if self.vision is None:
      return 0
    n = self.vision.num_features
    if self.projector.kind == "pixel_shuffle_mlp":
      side = int(round(self.vision.grid * self.projector.downsample_ratio))
      n = side * side
    return n

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "LLVMConfig":
    """Builds the config from a (ConfigDict-like) mapping; unknown keys raise naming them."""
    if hasattr(values, "to_dict"):
      values = values.to_dict()
    return _from_dict(cls, values, "model")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


_NESTED = {
    ("DecoderConfig", "rope"): RopeConfig,
    ("LLVMConfig", "decoder"): DecoderConfig,
    ("LLVMConfig", "vision"): VisionConfig,
    ("LLVMConfig", "projector"): ProjectorConfig,
}
