"""HF <-> llvm_jax mapping tables and config converters of the vision towers and projectors.

Key prefixes (transformers 5.23; checked by tests/test_vision_parity.py). The tables' HF keys are
relative to the tower root; pass `prefix` (or use `Table.with_prefixes`) for the container:

    model                                              in-memory state_dict()         save_pretrained / hub files
    LlavaForConditionalGeneration, InternVLFor...      model.vision_tower.            vision_tower.  (older hub
                                                       model.multi_modal_projector.   LLaVA files: vision_tower.vision_model.)
                                                                                      multi_modal_projector.
    CLIPVisionModel, SiglipVisionModel,                '' (no prefix)                 '' ; hub CLIPModel / SiglipModel
    InternVLVisionModel (standalone)                                                  files and transformers-4 saves
                                                                                      of CLIPVisionModel: vision_model.
                                                                                      (their text_model.* keys are not ours)

HF weights that LLaVA / InternVL features never use are listed in the tables' `ignore` regexes: the
tower layers past the feature layer, CLIP's / SigLIP's post_layernorm, SigLIP's pooling head,
InternViT's final `layernorm` unless feature_layer is -1, and InternViT's mask_token. Exporting
(`ours_to_hf`) therefore writes no such keys; transformers initialises them when loading, and they
do not affect the features.
"""

from __future__ import annotations

import re
from typing import Any

from llvm_jax.convert.core import Rule, Table, conv_patch, linear, per_layer, reshape, rule
from llvm_jax.models.config import ProjectorConfig, VisionConfig

# Activation names: transformers' ACT2FN keys <-> keys of llvm_jax.models.layers.ACTIVATIONS.
_ACT_FROM_HF = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}
_ACT_TO_HF = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}

_KIND_OF_MODEL_TYPE = {"clip_vision_model": "clip", "siglip_vision_model": "siglip", "internvl_vision": "internvit"}


def _act_from_hf(name: str, where: str) -> str:
  if name not in _ACT_FROM_HF:
    raise ValueError(f"{where}={name!r} is not supported; supported: {sorted(_ACT_FROM_HF)}")
  return _ACT_FROM_HF[name]


def _unused_layers(cfg: VisionConfig, layer_key: str) -> tuple[str, ...]:
  unused = range(cfg.num_layers_used, cfg.depth)
  if not unused:
    return ()
  return (re.escape(layer_key) + r"(?:" + "|".join(str(i) for i in unused) + r")\.",)


def vision_table(cfg: VisionConfig, prefix: str = "") -> Table:
  """The tower's mapping; HF keys are `prefix` + keys relative to the tower root (see above)."""
  h, d, D = cfg.num_heads, cfg.head_dim, cfg.width
  head_split = reshape((h, d), (h * d,))
  if cfg.kind in ("clip", "siglip"):
    layer = "encoder.layers.{i}."
    layer_rules = [
        rule(layer + "self_attn.out_proj.weight", "layers_{i}/attn/o/kernel", linear(in_shape=(h, d))),
        rule(layer + "self_attn.out_proj.bias", "layers_{i}/attn/o/bias"),
        rule(layer + "layer_norm1.weight", "layers_{i}/norm1/scale"),
        rule(layer + "layer_norm1.bias", "layers_{i}/norm1/bias"),
        rule(layer + "layer_norm2.weight", "layers_{i}/norm2/scale"),
        rule(layer + "layer_norm2.bias", "layers_{i}/norm2/bias"),
    ]
    for name in ("q", "k", "v"):
      layer_rules += [
          rule(layer + f"self_attn.{name}_proj.weight", f"layers_{{i}}/attn/{name}/kernel", linear((h, d))),
          rule(layer + f"self_attn.{name}_proj.bias", f"layers_{{i}}/attn/{name}/bias", head_split),
      ]
    for fc in ("fc1", "fc2"):
      layer_rules += [
          rule(layer + f"mlp.{fc}.weight", f"layers_{{i}}/mlp/{fc}/kernel", linear()),
          rule(layer + f"mlp.{fc}.bias", f"layers_{{i}}/mlp/{fc}/bias"),
      ]
    rules = [
        rule("embeddings.patch_embedding.weight", "patch_embed/kernel", conv_patch()),
        rule("embeddings.position_embedding.weight", "pos_embed"),
    ]
    if cfg.kind == "clip":
      rules += [
          rule("embeddings.class_embedding", "cls_token"),
          rule("pre_layrnorm.weight", "pre_norm/scale"),
          rule("pre_layrnorm.bias", "pre_norm/bias"),
      ]
      ignore = (r"post_layernorm\.",)
    else:
      rules.append(rule("embeddings.patch_embedding.bias", "patch_embed/bias"))
      ignore = (r"post_layernorm\.", r"head\.")
    ignore += _unused_layers(cfg, "encoder.layers.")
  else:  # internvit
    layer = "encoder.layer.{i}."
    layer_rules = [
        rule(layer + "attention.projection_layer.weight", "layers_{i}/attn/o/kernel", linear(in_shape=(h, d))),
        rule(layer + "attention.projection_layer.bias", "layers_{i}/attn/o/bias"),
        rule(layer + "layernorm_before.weight", "layers_{i}/norm1/scale"),
        rule(layer + "layernorm_after.weight", "layers_{i}/norm2/scale"),
    ]
    if cfg.norm_type == "layer_norm":
      layer_rules += [
          rule(layer + "layernorm_before.bias", "layers_{i}/norm1/bias"),
          rule(layer + "layernorm_after.bias", "layers_{i}/norm2/bias"),
      ]
    for name in ("q", "k", "v"):
      layer_rules.append(
          rule(layer + f"attention.{name}_proj.weight", f"layers_{{i}}/attn/{name}/kernel", linear((h, d)))
      )
      if cfg.qkv_bias:
        layer_rules.append(rule(layer + f"attention.{name}_proj.bias", f"layers_{{i}}/attn/{name}/bias", head_split))
    if cfg.qk_norm:
      layer_rules += [
          rule(layer + "attention.q_norm.weight", "layers_{i}/attn/q_norm/scale"),
          rule(layer + "attention.k_norm.weight", "layers_{i}/attn/k_norm/scale"),
      ]
    for fc in ("fc1", "fc2"):
      layer_rules += [
          rule(layer + f"mlp.{fc}.weight", f"layers_{{i}}/mlp/{fc}/kernel", linear()),
          rule(layer + f"mlp.{fc}.bias", f"layers_{{i}}/mlp/{fc}/bias"),
      ]
    if cfg.layer_scale:
      # Without layer_scale the HF lambdas are reported as unexpected (never silently dropped);
      # vision_config_to_hf then exports layer_scale_init_value=1.0 so HF's fresh lambdas are no-ops.
      layer_rules += [rule(layer + "lambda_1", "layers_{i}/lambda_1"), rule(layer + "lambda_2", "layers_{i}/lambda_2")]
    rules = [
        rule("embeddings.cls_token", "cls_token", reshape((D,), (1, 1, D))),
        rule("embeddings.position_embeddings", "pos_embed", reshape((cfg.num_positions, D), (1, cfg.num_positions, D))),
        rule("embeddings.patch_embeddings.projection.weight", "patch_embed/kernel", conv_patch()),
        rule("embeddings.patch_embeddings.projection.bias", "patch_embed/bias"),
    ]
    ignore = (r"embeddings\.mask_token",)
    if cfg.post_norm and cfg.feature_layer == -1:
      rules += [rule("layernorm.weight", "post_norm/scale"), rule("layernorm.bias", "post_norm/bias")]
    else:
      ignore += (r"layernorm\.",)
    ignore += _unused_layers(cfg, "encoder.layer.")
  table = Table(tuple(rules + per_layer(cfg.num_layers_used, layer_rules)), ignore)
  return _prefixed(table, prefix)


def projector_table(cfg: ProjectorConfig, prefix: str = "") -> Table:
  """`multi_modal_projector.*` keys relative to the projector root (LLaVA / InternVL names).

  'linear' has no transformers class; its one Linear is mapped to `linear_1.*` for round trips.
  """
  names = ("linear_1",) if cfg.kind == "linear" else ("linear_1", "linear_2")
  rules = []
  for name in names:
    rules.append(rule(f"{name}.weight", f"{name}/kernel", linear()))
    if cfg.bias:
      rules.append(rule(f"{name}.bias", f"{name}/bias"))
  if cfg.kind == "pixel_shuffle_mlp":
    rules += [rule("layer_norm.weight", "norm/scale"), rule("layer_norm.bias", "norm/bias")]
  return _prefixed(Table(tuple(rules)), prefix)


def _prefixed(table: Table, prefix: str) -> Table:
  if not prefix:
    return table
  return Table(
      tuple(Rule(prefix + r.hf, r.ours, r.hook) for r in table.rules),
      tuple(re.escape(prefix) + p for p in table.ignore),
  )


# ---------------------------------------------------------------------------------------------
# Config converters.


def _square(value: Any, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"non-square vision {name} {tuple(value)} is not supported")
    return int(value[0])
  return int(value)


def vision_config_from_hf(hf: Any, feature_layer: int, feature_select: str) -> VisionConfig:
  """Our VisionConfig for a CLIPVisionConfig / SiglipVisionConfig / InternVLVisionConfig.

  `feature_layer` / `feature_select` are the multimodal config's vision_feature_layer and
  vision_feature_select_strategy (a list of feature layers is not supported).
  """
  model_type = getattr(hf, "model_type", None)
  if model_type not in _KIND_OF_MODEL_TYPE:
    raise ValueError(f"vision tower model_type {model_type!r} unsupported; supported: {sorted(_KIND_OF_MODEL_TYPE)}")
  if not isinstance(feature_layer, int):
    raise ValueError(f"vision_feature_layer={feature_layer!r}: only a single int layer is supported")
  kind = _KIND_OF_MODEL_TYPE[model_type]
  common = dict(
      kind=kind,
      image_size=_square(hf.image_size, "image_size"),
      patch_size=_square(hf.patch_size, "patch_size"),
      num_channels=hf.num_channels,
      width=hf.hidden_size,
      depth=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads,
      mlp_dim=hf.intermediate_size,
      norm_eps=hf.layer_norm_eps,
      feature_layer=feature_layer,
      feature_select=feature_select,
      act=_act_from_hf(hf.hidden_act, f"{model_type}.hidden_act"),
  )
  if kind != "internvit":
    return VisionConfig(**common)
  if not hf.use_absolute_position_embeddings:
    raise ValueError("InternViT without absolute position embeddings is not supported")
  return VisionConfig(
      **common,
      qkv_bias=hf.attention_bias,
      qk_norm=hf.use_qk_norm,
      norm_type=hf.norm_type,
      layer_scale=True,
      post_norm=not hf.use_mean_pooling,
  )


def vision_config_to_hf(cfg: VisionConfig) -> Any:
  """The transformers vision config matching `cfg` (full HF depth; SigLIP without its head)."""
  import transformers  # lazy: a heavy import, only paid when an HF model is actually used

  common = dict(
      hidden_size=cfg.width,
      intermediate_size=cfg.mlp_dim,
      num_hidden_layers=cfg.depth,
      num_attention_heads=cfg.num_heads,
      num_channels=cfg.num_channels,
      layer_norm_eps=cfg.norm_eps,
      hidden_act=_ACT_TO_HF[cfg.activation],
  )
  if cfg.kind == "clip":
    return transformers.CLIPVisionConfig(**common, image_size=cfg.image_size, patch_size=cfg.patch_size)
  if cfg.kind == "siglip":
    return transformers.SiglipVisionConfig(
        **common, image_size=cfg.image_size, patch_size=cfg.patch_size, vision_use_head=False
    )
  return transformers.InternVLVisionConfig(
      **common,
      image_size=[cfg.image_size, cfg.image_size],
      patch_size=[cfg.patch_size, cfg.patch_size],
      attention_bias=cfg.qkv_bias,
      use_qk_norm=cfg.qk_norm,
      norm_type=cfg.norm_type,
      layer_scale_init_value=0.1 if cfg.layer_scale else 1.0,
      use_mean_pooling=not cfg.post_norm,
      use_absolute_position_embeddings=True,
      use_mask_token=False,
  )


def projector_config_from_hf(hf: Any) -> ProjectorConfig:
  """Our ProjectorConfig for a LlavaConfig ('mlp2x_gelu') or InternVLConfig ('pixel_shuffle_mlp')."""
  model_type = getattr(hf, "model_type", None)
  act = _act_from_hf(hf.projector_hidden_act, f"{model_type}.projector_hidden_act")
  if model_type == "llava":
    if not isinstance(hf.vision_feature_layer, int):
      raise ValueError(f"vision_feature_layer={hf.vision_feature_layer!r}: multi-layer features are not supported")
    return ProjectorConfig(kind="mlp2x_gelu", act=act, bias=bool(hf.multimodal_projector_bias))
  if model_type == "internvl":
    return ProjectorConfig(kind="pixel_shuffle_mlp", downsample_ratio=float(hf.downsample_ratio), act=act, bias=True)
  raise ValueError(f"no projector for model_type {model_type!r}; supported: llava, internvl")


__all__ = [
    "projector_config_from_hf",
    "projector_table",
    "vision_config_from_hf",
    "vision_config_to_hf",
    "vision_table",
]
