"""Model hyper-parameters as frozen dataclasses (hashable, so they can be Flax module attributes).

The experiment config (an `ml_collections.ConfigDict`) holds a `model` block with the same fields;
`LLVMConfig.from_dict` turns it into these dataclasses and rejects any unknown key by name, so a
typo in a config fails at once instead of silently training the default.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

import jax.numpy as jnp

T = TypeVar("T")

# The implementations of models/attention.py, which takes them from here (the config imports nothing of the
# model).
ATTENTION_IMPLEMENTATIONS = ("xla", "blocked", "cudnn", "splash", "cpu_flash")
# How a dense layer computes its weight gradient (models/layers.py): 'xla' | 'cpu' (cpu_kernels.dense_matmul).
DENSE_IMPLEMENTATIONS = ("xla", "cpu")


def _check_dense_impl(owner: str, impl: str) -> None:
  if impl not in DENSE_IMPLEMENTATIONS:
    raise ValueError(f"{owner}.dense_impl must be one of {DENSE_IMPLEMENTATIONS}, got {impl!r}")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str) -> Any:
  """Maps a dtype name from a config ('float32', 'bfloat16') to the jnp dtype."""
  if name not in DTYPES:
    raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
  return DTYPES[name]


def _nested_config(cls: type, name: str) -> type | None:
  """The dataclass type of field `name` of `cls` (from its type hint, `X` or `X | None`), or None."""
  hint = typing.get_type_hints(cls)[name]
  candidates = typing.get_args(hint) or (hint,)
  nested = [c for c in candidates if dataclasses.is_dataclass(c)]
  return nested[0] if nested else None


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
    nested = _nested_config(cls, name)
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
class TrolConfig:
  """TroL, traversal of layers (models/trol.py): traversed layers run twice, a TroL-Mixer mixes the passes."""

  # One gate for every traversed layer, as the released TroL weights were trained (an accident of
  # the official code); False: one gate per traversed layer (the intended design).
  shared_gate: bool = False
  # Indices of the traversed layers, e.g. tuple(range(8)) for the lowest 8; None = every layer.
  layers: tuple[int, ...] | None = None
  # 'zeros' (default): a = 0, b = 0, so w = 0.5 for every token and the start is deterministic;
  # 'normal': a ~ N(0, 0.02^2), b = 0; 'torch': a, b ~ U(+-1/sqrt(D)), PyTorch's nn.Linear default
  # (the official code's initialisation).
  gate_init: str = "zeros"
  # With a KV cache: 'full' (default) keeps a second cache for pass 2, so decoding computes the
  # training-time function; 'official' traverses the prompt only and decodes each token with one
  # plain pass over pass-1 K/V (the released behaviour).
  decode_traversal: str = "full"
  # False: off, exactly as `decoder.trol = None` (the experiment config keeps every technique block
  # present, so `--config.model.decoder.trol.enabled=True` switches it on from the command line).
  enabled: bool = True

  def __post_init__(self):
    if self.gate_init not in ("zeros", "normal", "torch"):
      raise ValueError(f"trol.gate_init must be zeros, normal or torch, got {self.gate_init!r}")
    if self.decode_traversal not in ("official", "full"):
      raise ValueError(f"trol.decode_traversal must be official or full, got {self.decode_traversal!r}")


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
  """Phantom dimension (models/phantom.py): each attention's head dim d grows to 2d with q/k/v
  cross-attended to the first token of the sequence (the 'sos'), then two gates mix back to d."""

  # Scale of the phantom branch (the official code's XAttention eta): tiny, so a fresh branch is
  # nearly a no-op. A fixed constant unless `eta_learnable`, where it is the initial value.
  eta: float = 1e-4
  # True: each attention layer gets a trainable float32 scalar `phantom/eta`, initialised to `eta`
  # (equal outputs at init) and trained with the phantom modules. False (the official code): a
  # constant, and no such parameter in the tree.
  eta_learnable: bool = False
  # KV cache: 'expanded' caches the 2d-wide K' = [K; K*], V' = [V; V*] (cheaper per step);
  # 'recompute' caches d-wide K/V and recomputes K*, V* over the whole cache each call (as released).
  # Both are exact.
  cache: str = "expanded"
  # 'torch': every weight and bias ~ U(+-1/sqrt(fan_in)), PyTorch's nn.Linear default (the official
  # code's initialisation); 'normal': kernels ~ N(0, 0.02^2), gate biases 0.
  init: str = "torch"
  # False: off, exactly as `decoder.phantom = None`.
  enabled: bool = True

  def __post_init__(self):
    if self.cache not in ("expanded", "recompute"):
      raise ValueError(f"phantom.cache must be expanded or recompute, got {self.cache!r}")
    if self.init not in ("torch", "normal"):
      raise ValueError(f"phantom.init must be torch or normal, got {self.init!r}")
    # A learnable eta starts positive: at 0 every XAttn module (and, through eta**2 in Q*.K*, eta's
    # own q/k path) gets no gradient. A fixed eta may be any float, as before.
    if self.eta_learnable and not 0 < self.eta < float("inf"):
      raise ValueError(f"phantom.eta must be a finite number > 0 when eta_learnable, got {self.eta!r}")


@dataclasses.dataclass(frozen=True)
class PmodConfig:
  """p-MoD, mixture-of-depths over vision tokens (models/pmod.py): MoD layers run attention and MLP
  on the text tokens plus the top-k vision tokens by a learned router, and cache only those."""

  # False: off, exactly as `decoder.pmod = None` (normalised to None by DecoderConfig).
  enabled: bool = True
  # Which layers are MoD layers and their retention ratios r: 'shiftedcos' / 'shiftedlinear' (PRD,
  # progressive ratio decay: r(l) from the layer index, a MoD layer iff r(l) <= max_ratio, using
  # max(r(l), min_ratio)), or 'explicit' (`layers` and `ratios`).
  schedule: str = "shiftedcos"
  # PRD: the average ratio r̄ and the bounds (official 'shiftedcos_decay_0.85_0.15', router factor 0.5).
  average_ratio: float = 0.5
  max_ratio: float = 0.85
  min_ratio: float = 0.15
  # schedule='explicit': MoD layer indices and one retention ratio in [0, 1] per layer.
  layers: tuple[int, ...] | None = None
  ratios: tuple[float, ...] | None = None
  # TanhNorm of the router logit s: w = tanh_scale·tanh(s) + tanh_bias (official 'tanh_0.2_1').
  tanh_scale: float = 0.2
  tanh_bias: float = 1.0
  # Router Linear(D, 1): with a bias (official mod_bias_enabled) and 'zeros' init (mod_special_init:
  # every w starts at tanh_bias), or 'torch' (PyTorch nn.Linear's U(+-1/sqrt(D))).
  router_bias: bool = True
  router_init: str = "zeros"
  # Scanned stacks (scan_layers=True): the MoD layers form at most about this many scanned stages,
  # each sized by its largest ratio (more stages: closer to the unrolled FLOPs, longer compiles).
  scan_groups: int = 4

  def __post_init__(self):
    if self.schedule not in ("shiftedcos", "shiftedlinear", "explicit"):
      raise ValueError(f"pmod.schedule must be shiftedcos, shiftedlinear or explicit, got {self.schedule!r}")
    if self.scan_groups < 1:
      raise ValueError(f"pmod.scan_groups must be >= 1, got {self.scan_groups}")
    if self.router_init not in ("zeros", "torch"):
      raise ValueError(f"pmod.router_init must be zeros or torch, got {self.router_init!r}")
    if not 0.0 <= self.min_ratio <= self.max_ratio:
      raise ValueError(f"pmod: need 0 <= min_ratio <= max_ratio, got {self.min_ratio}, {self.max_ratio}")
    explicit = self.layers is not None or self.ratios is not None
    if (self.schedule == "explicit") != explicit:
      raise ValueError("pmod.layers and pmod.ratios are given exactly when pmod.schedule='explicit'")
    if explicit:
      if self.layers is None or self.ratios is None or len(self.layers) != len(self.ratios):
        raise ValueError(f"pmod.layers={self.layers} and pmod.ratios={self.ratios} need one ratio per layer")
      if not all(0.0 <= r <= 1.0 for r in self.ratios):
        raise ValueError(f"pmod.ratios={self.ratios}: every ratio must be in [0, 1]")


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
  # Attention kernel (models/attention.py): 'xla' (einsum, the reference) | 'blocked' (online softmax,
  # any backend, O(T) memory) | 'cudnn' (GPU flash) | 'splash' (TPU Pallas, no-cache calls) |
  # 'cpu_flash' (C++ FlashAttention for XLA:CPU, built on first use).
  attention_impl: str = "xla"
  # Query and key tile of 'blocked' and 'splash' (capped at the sequence): smaller tiles hold less
  # memory at once, larger ones run faster on accelerators.
  attention_block_size: int = 512
  # Weight gradients of the dense layers: 'xla' | 'cpu' (a C++ kernel for XLA:CPU, built on first use, that
  # splits the tokens between the threads where XLA:CPU uses one).
  dense_impl: str = "xla"
  # TroL traversal of layers; None (or a block with enabled=False, normalised to None) = off.
  trol: TrolConfig | None = None
  # Phantom dimension in every attention layer; None (or enabled=False) = off.
  phantom: PhantomConfig | None = None
  # p-MoD mixture-of-depths over vision tokens; None (or enabled=False) = off.
  pmod: PmodConfig | None = None

  def __post_init__(self):
    # One way to be off: a disabled block becomes None, so the model code only tests `is not None`.
    for name in ("trol", "phantom", "pmod"):
      block = getattr(self, name)
      if block is not None and not block.enabled:
        object.__setattr__(self, name, None)
    if self.family not in ("llama", "qwen2", "phi3"):
      raise ValueError(f"decoder.family must be llama, qwen2 or phi3, got {self.family!r}")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f"decoder.attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention_impl!r}"
      )
    _check_dense_impl("decoder", self.dense_impl)
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"decoder.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
    if self.trol is not None and self.trol.layers is not None:
      trol_layers = self.trol.layers
      if (
          not trol_layers
          or len(set(trol_layers)) != len(trol_layers)
          or not all(0 <= i < self.num_layers for i in trol_layers)
      ):
        raise ValueError(f"decoder.trol.layers={trol_layers}: need distinct layer indices in [0, {self.num_layers})")
    if self.pmod is not None:
      if self.pmod.layers is not None and (
          len(set(self.pmod.layers)) != len(self.pmod.layers)
          or not all(0 <= i < self.num_layers for i in self.pmod.layers)
      ):
        raise ValueError(
            f"decoder.pmod.layers={self.pmod.layers}: need distinct layer indices in [0, {self.num_layers})"
        )


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT tower. `kind`: 'clip' | 'siglip' | 'internvit' (see models/vision.py).

  `depth` is the tower's full depth as in the HF checkpoint; only the layers the selected feature
  layer needs are built (`num_layers_used`).
  """

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
  # Index 0 is the embedding output (after CLIP's pre-norm), index i the output of layer i.
  feature_layer: int = -2
  # 'default' drops the first token, 'full' keeps every token (as in LLaVA / InternVL). Note that,
  # as in transformers' LLaVA, 'default' drops the first token even for SigLIP, which has no CLS
  # token (so it drops a patch): SigLIP towers normally use 'full'.
  feature_select: str = "default"
  # MLP activation, a key of layers.ACTIVATIONS; None = the kind's default (clip: quick_gelu,
  # siglip: gelu_tanh, internvit: gelu).
  act: str | None = None
  # InternViT options.
  qkv_bias: bool = True
  qk_norm: bool = False
  norm_type: str = "layer_norm"
  layer_scale: bool = False
  # InternViT: a LayerNorm after the last layer (HF `use_mean_pooling=False`); like transformers'
  # InternVL it is applied only when feature_layer == -1.
  post_norm: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"
  # None (no rematerialisation) | 'full' | 'dots' | 'dots_no_batch' (see layers.REMAT_POLICIES).
  remat_policy: str | None = None
  # The attention kernel, as the decoder's (models/attention.py): 'xla' (einsum) | 'blocked' | 'cudnn' |
  # 'splash' | 'cpu_flash'. 'blocked' and 'splash' pad the tokens up to whole tiles (splash's are
  # multiples of 128: CLIP-L/336's 577 and InternViT-448's 1025 tokens run in 640 and 1152), the
  # padding keys masked. The tile of 'blocked' and 'splash': 128 pads 1025 tokens to 1152.
  attention_impl: str = "xla"
  attention_block_size: int = 128
  # As the decoder's.
  dense_impl: str = "xla"

  def __post_init__(self):
    if self.kind not in ("clip", "siglip", "internvit"):
      raise ValueError(f"vision.kind must be clip, siglip or internvit, got {self.kind!r}")
    if self.feature_select not in ("default", "full"):
      raise ValueError(f"vision.feature_select must be default or full, got {self.feature_select!r}")
    if self.image_size < self.patch_size:
      raise ValueError(f"vision.image_size={self.image_size} is smaller than patch {self.patch_size}")
    # A size that is not a multiple of the patch (SigLIP so400m: 384 px, patch 14) is allowed: the
    # patch conv drops the last image_size % patch_size pixel rows / columns, as in transformers.
    if self.width % self.num_heads:
      raise ValueError(f"vision.width={self.width} is not a multiple of num_heads={self.num_heads}")
    if not -self.depth - 1 <= self.feature_layer <= self.depth:
      raise ValueError(
          f"vision.feature_layer={self.feature_layer} out of range for depth {self.depth} "
          f"(hidden-state indices {-self.depth - 1}..{self.depth})"
      )
    if self.norm_type not in ("layer_norm", "rms_norm"):
      raise ValueError(f"vision.norm_type must be layer_norm or rms_norm, got {self.norm_type!r}")
    if self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"vision.attention_impl must be one of {ATTENTION_IMPLEMENTATIONS}, got {self.attention_impl!r}")
    _check_dense_impl("vision", self.dense_impl)
    if self.attention_block_size < 1:
      raise ValueError(f"vision.attention_block_size must be positive, got {self.attention_block_size}")
    if self.kind != "internvit":
      odd = [
          name
          for name, value, default in (
              ("qkv_bias", self.qkv_bias, True),
              ("qk_norm", self.qk_norm, False),
              ("norm_type", self.norm_type, "layer_norm"),
              ("layer_scale", self.layer_scale, False),
              ("post_norm", self.post_norm, False),
          )
          if value != default
      ]
      if odd:
        raise ValueError(f"vision.{', vision.'.join(odd)}: InternViT-only option(s) set for kind {self.kind!r}")

  @property
  def has_cls(self) -> bool:
    return self.kind != "siglip"

  @property
  def activation(self) -> str:
    """The MLP activation name (a key of layers.ACTIVATIONS)."""
    if self.act is not None:
      return self.act
    return {"clip": "quick_gelu", "siglip": "gelu_tanh", "internvit": "gelu"}[self.kind]

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    """Tokens entering the first layer (patches plus CLS where the tower has one)."""
    return self.grid**2 + int(self.has_cls)

  @property
  def num_layers_used(self) -> int:
    """Layers run to reach `feature_layer` (hidden-state index; negative counts from the end)."""
    return self.feature_layer if self.feature_layer >= 0 else self.depth + 1 + self.feature_layer

  @property
  def num_features(self) -> int:
    """Tokens per image out of the tower after feature selection ('default' drops the first)."""
    return self.num_positions - int(self.feature_select == "default")


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
  """Vision -> LLM projector. `kind`: 'mlp2x_gelu' | 'linear' | 'pixel_shuffle_mlp' (InternVL).

  'mlp2x_gelu': Linear -> act -> Linear (LLaVA); 'linear': one Linear (no transformers
  equivalent); 'pixel_shuffle_mlp': pixel shuffle, LayerNorm, Linear -> act -> Linear (InternVL).
  """

  kind: str = "mlp2x_gelu"
  # InternVL: pixel shuffle keeps (ratio * grid)^2 tokens with 1/ratio^2 times the channels.
  downsample_ratio: float = 0.5
  norm_eps: float = 1e-5
  # Activation between the two Linears (a key of layers.ACTIVATIONS; HF projector_hidden_act).
  act: str = "gelu"
  # Biases of the Linears (LLaVA's multimodal_projector_bias; InternVL always has them).
  bias: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"
  # As the decoder's.
  dense_impl: str = "xla"

  def __post_init__(self):
    _check_dense_impl("projector", self.dense_impl)
    if self.kind not in ("mlp2x_gelu", "linear", "pixel_shuffle_mlp"):
      raise ValueError(f"projector.kind unknown: {self.kind!r}")
    if self.kind == "pixel_shuffle_mlp":
      k = 1.0 / self.downsample_ratio
      if abs(k - round(k)) > 1e-6 or round(k) < 1:
        raise ValueError(f"projector.downsample_ratio={self.downsample_ratio}: 1/ratio must be an integer")

  @property
  def shuffle_factor(self) -> int:
    """Pixel shuffle merges shuffle_factor x shuffle_factor neighbouring tokens (2 for ratio 0.5)."""
    return int(round(1.0 / self.downsample_ratio))


@dataclasses.dataclass(frozen=True)
class DeepStackConfig:
  """DeepStack (models/deepstack.py): high-resolution crops, regrouped into groups aligned with the
  global view's tokens, are added to the image positions before successive LLM (or ViT) layers."""

  # The crop grid (g_h, g_w): g_h * g_w crops, each the size of the global view, row-major.
  num_crops: tuple[int, int] = (2, 2)
  # How the (g_h*P, g_w*P) crop map becomes g_h*g_w groups of P*P: '2d' (dilated: group (i, j) =
  # map[i::g_h, j::g_w]), '1d' (stride over the flattened map), 'grid' (group k = crop k).
  sampling: str = "2d"
  # DeepStack-L: group k is added before decoder layer start + k * interval.
  llm: bool = True
  start: int = 1
  interval: int = 1
  # DeepStack-V: group k is added to the non-CLS tokens before ViT layer vit_start + k; None = off.
  vit_start: int | None = None
  # DeepStack-V: the crops' ViT hidden-state index that is regrouped (read it through `crop_layer`).
  # None (default) = vit_start: the path the official code runs (clip_encoder.py), where the crops go
  # through ViT layers 0..vit_start-1 together with the global view and their hidden states at
  # vit_start are regrouped. An explicit index 0..vit_start is an option: 0 = the patch embeddings
  # (after CLIP's pre-norm), the official code's unreached branch.
  vit_crop_layer: int | None = None
  # False: off, exactly as `model.deepstack = None`.
  enabled: bool = True

  def __post_init__(self):
    if len(self.num_crops) != 2 or min(self.num_crops) < 1:
      raise ValueError(f"deepstack.num_crops must be (g_h, g_w) >= 1, got {self.num_crops}")
    if self.sampling not in ("2d", "1d", "grid"):
      raise ValueError(f"deepstack.sampling must be 2d, 1d or grid, got {self.sampling!r}")
    if not self.llm and self.vit_start is None:
      raise ValueError("deepstack: llm=False and vit_start=None inject nothing; set one of them or drop the block")
    if self.start < 0 or self.interval < 1:
      raise ValueError(f"deepstack: need start >= 0 and interval >= 1, got {self.start}, {self.interval}")
    if (self.vit_start is not None and self.vit_start < 0) or (self.vit_crop_layer or 0) < 0:
      raise ValueError(f"deepstack: vit_start={self.vit_start}, vit_crop_layer={self.vit_crop_layer} must be >= 0")
    if self.vit_crop_layer is not None:
      if self.vit_start is None:
        raise ValueError(
            f"deepstack.vit_crop_layer={self.vit_crop_layer} is set but vit_start=None (DeepStack-V is off); "
            "set deepstack.vit_start or leave deepstack.vit_crop_layer unset"
        )
      if self.vit_crop_layer > self.vit_start:
        raise ValueError(
            f"deepstack.vit_crop_layer={self.vit_crop_layer} must be <= deepstack.vit_start={self.vit_start} "
            "(None = vit_start, the official path)"
        )

  @property
  def num_groups(self) -> int:
    return self.num_crops[0] * self.num_crops[1]

  @property
  def crop_layer(self) -> int:
    """DeepStack-V: the crops' ViT hidden-state index that is regrouped (`vit_crop_layer`, None =
    vit_start); 0 without DeepStack-V."""
    if self.vit_crop_layer is not None:
      return self.vit_crop_layer
    return self.vit_start if self.vit_start is not None else 0

  @property
  def llm_layers(self) -> tuple[int, ...]:
    """The decoder layer each group is added before (empty without DeepStack-L)."""
    return tuple(self.start + k * self.interval for k in range(self.num_groups)) if self.llm else ()


@dataclasses.dataclass(frozen=True)
class LLVMConfig:
  """Vision tower + projector + decoder; images replace runs of `image_token_id` in the text."""

  decoder: DecoderConfig = dataclasses.field(default_factory=DecoderConfig)
  vision: VisionConfig | None = dataclasses.field(default_factory=VisionConfig)
  projector: ProjectorConfig = dataclasses.field(default_factory=ProjectorConfig)
  image_token_id: int = 32000
  # DeepStack high-resolution crops stacked into layers; None (or enabled=False, normalised to None) = off.
  deepstack: DeepStackConfig | None = None

  def __post_init__(self):
    if self.deepstack is not None and not self.deepstack.enabled:
      object.__setattr__(self, "deepstack", None)  # one way to be off (see DecoderConfig)
    ds = self.deepstack
    if ds is None:
      return
    if self.vision is None:
      raise ValueError("deepstack needs a vision tower (model.vision is None)")
    if ds.llm and ds.llm_layers[-1] >= self.decoder.num_layers:
      raise ValueError(
          f"deepstack: {ds.num_groups} groups at decoder layers {ds.llm_layers} exceed num_layers="
          f"{self.decoder.num_layers}; lower model.deepstack.start / model.deepstack.interval or use fewer "
          "model.deepstack.num_crops (data.deepstack_grid follows num_crops)"
      )
    used = self.vision.num_layers_used
    if ds.vit_start is not None and ds.vit_start + ds.num_groups > used:
      raise ValueError(
          f"deepstack: {ds.num_groups} groups from ViT layer vit_start={ds.vit_start} exceed the "
          f"{used} ViT layers run up to vision.feature_layer"
      )
    if ds.crop_layer > used:
      raise ValueError(f"deepstack.vit_crop_layer={ds.crop_layer} exceeds the {used} ViT layers run")

  @property
  def tokens_per_image(self) -> int:
    """Placeholder tokens one image (one tile for InternVL) expands to in the text."""
    if self.vision is None:
      return 0
    n = self.vision.num_features
    if self.projector.kind == "pixel_shuffle_mlp":
      # The projector needs a square grid divisible by the shuffle factor (it raises otherwise).
      side = self.vision.grid // self.projector.shuffle_factor
      n = side * side
    return n

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> LLVMConfig:
    """Builds the config from a (ConfigDict-like) mapping; unknown keys raise naming them."""
    if hasattr(values, "to_dict"):
      values = values.to_dict()
    return _from_dict(cls, values, "model")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
