"""Import and export of `transformers` checkpoints.

    model, params = llvm_jax.convert.from_hf("path/to/save_pretrained_dir")   # or an HF model object
    llvm_jax.convert.to_hf(model.config, params, "out_dir")                    # transformers loads it

Supported: LlamaForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM (text only), LlavaForConditionalGeneration
(CLIP or SigLIP tower, Llama/Qwen2/Phi-3 LLM) and InternVLForConditionalGeneration (InternViT +
pixel-shuffle projector + Qwen2/Llama LLM).

A model using a technique (TroL, Phantom, p-MoD, DeepStack) has no transformers equivalent: `to_hf`
refuses it unless `allow_custom=True`, which writes the technique's parameters as extra `llvm_jax/...`
tensors (transformers ignores them) and `llvm_jax_config.json`, which `from_hf` reads back, so the
round trip is exact. The command line: `python -m llvm_jax.convert to_hf|from_hf ...` (see __main__.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax import tree_utils
from llvm_jax.convert import core
from llvm_jax.convert.core import WeightMismatchError
from llvm_jax.convert.decoder_table import decoder_table
from llvm_jax.convert.hf_config import decoder_config_from_hf, decoder_config_to_hf
from llvm_jax.convert.vision_table import (
    projector_config_from_hf,
    projector_table,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_table,
)
from llvm_jax.models.config import LLVMConfig, resolve_dtype
from llvm_jax.models.llvm import LLVM
from llvm_jax.models.techniques import switched_on

# Safetensors key prefix of the parameters only llvm_jax has (techniques), written with allow_custom.
CUSTOM_PREFIX = "llvm_jax/"
CUSTOM_CONFIG = "llvm_jax_config.json"
# Fields that say how the model runs, not what it computes: never a contradiction with a checkpoint.
_RUNTIME_FIELDS = (
    "dtype",
    "param_dtype",
    "scan_layers",
    "remat_policy",
    "attention_impl",
    "attention_block_size",
    "trol",
    "phantom",
    "pmod",
    "deepstack",
)


class CustomModelError(ValueError):
  """The model uses a technique that no transformers class implements."""


__all__ = [
    "from_hf",
    "to_hf",
    "llvm_config_from_hf",
    "WeightMismatchError",
    "stack_layers",
    "unstack_layers",
    "CustomModelError",
    "unused_hf_state",
    "config_differences",
    "check_exportable",
    "checkpoint_differences",
]

_TEXT_ONLY = ("llama", "qwen2", "phi3")
_MULTIMODAL = ("llava", "internvl")

# Checkpoint key spellings -> the in-memory `state_dict()` spelling of transformers 5 that our
# tables use. Hub checkpoints and save_pretrained nest the parts differently; applied in order.
_KEY_REWRITES = (
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^model\.vision_tower\.vision_model\."), "model.vision_tower."),
)


def canonical_key(key: str) -> str:
  for pattern, repl in _KEY_REWRITES:
    key = pattern.sub(repl, key)
  return key


def llvm_config_from_hf(
    hf: Any, dtype: str = "float32", param_dtype: str = "float32", **decoder_overrides
) -> LLVMConfig:
  """Our LLVMConfig for a transformers config (text-only LLMs get `vision=None`)."""
  precision = dict(dtype=dtype, param_dtype=param_dtype)
  if hf.model_type in _TEXT_ONLY:
    return LLVMConfig(decoder=decoder_config_from_hf(hf, **precision, **decoder_overrides), vision=None)
  if hf.model_type not in _MULTIMODAL:
    raise ValueError(f"unsupported model_type {hf.model_type!r}; supported: {_TEXT_ONLY + _MULTIMODAL}")
  # The composite config's tie flag decides whether lm_head is saved (InternVL ties by default).
  tie = getattr(hf, "tie_word_embeddings", hf.text_config.tie_word_embeddings)
  decoder = decoder_config_from_hf(hf.text_config, **precision, **{"tie_embeddings": tie, **decoder_overrides})
  vision = vision_config_from_hf(
      hf.vision_config, feature_layer=hf.vision_feature_layer, feature_select=hf.vision_feature_select_strategy
  )
  projector = projector_config_from_hf(hf)
  return LLVMConfig(
      decoder=decoder,
      vision=dataclasses.replace(vision, **precision),
      projector=dataclasses.replace(projector, **precision),
      image_token_id=hf.image_token_id,
  )


def full_table(cfg: LLVMConfig) -> core.Table:
  """The complete mapping of an LLVM, in canonical (in-memory transformers 5) key spelling."""
  if cfg.vision is None:
    return decoder_table(cfg.decoder, body="model.", head="").with_prefixes("", "decoder")
  table = decoder_table(cfg.decoder, body="model.language_model.", head="").with_prefixes("", "decoder")
  table += vision_table(cfg.vision).with_prefixes("model.vision_tower.", "vision")
  table += projector_table(cfg.projector).with_prefixes("model.multi_modal_projector.", "projector")
  return table


def _hf_state(source: Any) -> tuple[Any, dict[str, np.ndarray]]:
  if isinstance(source, (str, os.PathLike)):
    import transformers  # lazy: a heavy import, only paid when an HF model is actually used

    path = os.fspath(source)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path} is not a directory written by save_pretrained")
    return transformers.AutoConfig.from_pretrained(path), core.read_safetensors_dir(path)
  state = {}
  for key, tensor in source.state_dict().items():
    tensor = tensor.detach().cpu()
    state[key] = tensor.float().numpy() if str(tensor.dtype) == "torch.bfloat16" else tensor.numpy()
  return source.config, state


def expected_shapes(model: LLVM) -> dict[str, tuple[int, ...]]:
  """Flat '/'-joined parameter paths -> shapes, without allocating (jax.eval_shape)."""
  shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0), unscanned=True))
  return {k: tuple(v.shape) for k, v in tree_utils.flatten(shapes).items()}


def init_params(model: LLVM, rng: jax.Array, unscanned: bool = False) -> dict[str, Any]:
  """Random parameters (unboxed) for `model`, built with a one-image dummy batch."""
  cfg = model.config
  if unscanned and cfg.decoder.scan_layers:
    model = LLVM(dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, scan_layers=False)))
  # Jitted, so the values equal those of the trainer's sharded (jitted) init bit for bit.
  return jax.jit(lambda key: nn.unbox(model.init(key, *dummy_inputs(cfg))["params"]))(rng)


def dummy_inputs(cfg: LLVMConfig) -> tuple[jax.Array, ...]:
  """Smallest (tokens, images, image_mask) that exercise every parameter of the model."""
  if cfg.vision is None:
    return (jnp.zeros((1, 1), jnp.int32),)
  n = cfg.tokens_per_image
  tokens = jnp.full((1, n), cfg.image_token_id, jnp.int32)
  images = jnp.zeros((1, 1, cfg.vision.image_size, cfg.vision.image_size, cfg.vision.num_channels), jnp.float32)
  return tokens, images, jnp.ones((1, 1), bool)


def stack_layers(decoder_params: dict[str, Any], num_layers: int) -> dict[str, Any]:
  """Unscanned decoder params (`layers_{i}`) -> the scanned layout (`layers/layer`, axis 0)."""
  out = {k: v for k, v in decoder_params.items() if not k.startswith("layers_")}
  per_layer = [decoder_params[f"layers_{i}"] for i in range(num_layers)]
  out["layers"] = {"layer": jax.tree.map(lambda *xs: np.stack(xs), *per_layer)}
  return out


def unstack_layers(decoder_params: dict[str, Any], num_layers: int) -> dict[str, Any]:
  """Inverse of `stack_layers`."""
  out = {k: v for k, v in decoder_params.items() if k != "layers"}
  stacked = decoder_params["layers"]["layer"]
  for i in range(num_layers):
    out[f"layers_{i}"] = jax.tree.map(lambda x: np.asarray(x)[i], stacked)
  return out


def from_hf(
    source: Any, *, dtype: str = "float32", param_dtype: str = "float32", **decoder_overrides: Any
) -> tuple[LLVM, dict[str, Any]]:
  """Loads a `save_pretrained` directory (safetensors, sharded or not; no torch) or an in-memory
  `transformers` model. Returns (model, params) with params as numpy arrays in `param_dtype`.

  `decoder_overrides` set DecoderConfig fields such as `scan_layers=True` or `remat_policy='full'`.
  Any missing, unexpected or mis-shaped weight raises one WeightMismatchError naming them all.
  """
  hf_config, state = _hf_state(source)
  cfg = llvm_config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, **decoder_overrides)
  custom = _custom_config(source, cfg)
  if custom is not None:  # an allow_custom export: the techniques' config and tensors come back
    cfg = custom
  model = LLVM(cfg)
  extra = {k[len(CUSTOM_PREFIX) :]: v for k, v in state.items() if k.startswith(CUSTOM_PREFIX)}
  state = {canonical_key(k): v for k, v in state.items() if not k.startswith(CUSTOM_PREFIX)}
  expected = {k: v for k, v in expected_shapes(model).items() if k not in extra}
  params = core.hf_to_ours(state, full_table(cfg), expected, context=str(getattr(hf_config, "model_type", "")))
  if extra:
    params = tree_utils.unflatten({**tree_utils.flatten(params), **extra})
  target = resolve_dtype(param_dtype)
  params = jax.tree.map(lambda x: np.asarray(x).astype(target), params)
  if cfg.decoder.scan_layers:
    params["decoder"] = stack_layers(params["decoder"], cfg.decoder.num_layers)
  return model, params


def hf_config_of(cfg: LLVMConfig, **text_extra: Any) -> Any:
  """The transformers config that `to_hf` writes for `cfg` (`text_extra`: e.g. eos_token_id)."""
  import transformers  # lazy: a heavy import, only paid when an HF model is actually used

  text = decoder_config_to_hf(cfg.decoder, **text_extra)
  if cfg.vision is None:
    return text
  vision = vision_config_to_hf(cfg.vision)
  if cfg.projector.kind == "pixel_shuffle_mlp":
    return transformers.InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=cfg.image_token_id,
        downsample_ratio=cfg.projector.downsample_ratio,
        vision_feature_layer=cfg.vision.feature_layer,
        vision_feature_select_strategy=cfg.vision.feature_select,
        projector_hidden_act=cfg.projector.act,
        tie_word_embeddings=cfg.decoder.tie_embeddings,
    )
  if cfg.projector.kind != "mlp2x_gelu":
    raise ValueError(f"projector {cfg.projector.kind!r} has no transformers equivalent to export to")
  return transformers.LlavaConfig(
      vision_config=vision,
      text_config=text,
      image_token_id=cfg.image_token_id,
      vision_feature_layer=cfg.vision.feature_layer,
      vision_feature_select_strategy=cfg.vision.feature_select,
      projector_hidden_act=cfg.projector.act,
      multimodal_projector_bias=cfg.projector.bias,
      image_seq_length=cfg.tokens_per_image,
      tie_word_embeddings=cfg.decoder.tie_embeddings,
  )


def to_hf(
    cfg: LLVMConfig,
    params: dict[str, Any],
    out_dir: str,
    dtype: str = "float32",
    *,
    allow_custom: bool = False,
    extra_state: dict[str, np.ndarray] | None = None,
    max_shard_bytes: int = 5 << 30,
    **text_extra: Any,
) -> str:
  """Writes `out_dir` (config.json + safetensors) that transformers' from_pretrained loads.

  `text_extra` goes into the language model's transformers config (e.g. bos/eos/pad token ids).
  A model with techniques raises CustomModelError unless `allow_custom` (see the module docstring).
  `extra_state`: HF-keyed tensors the model does not hold (the tower layers past the feature layer,
  `unused_hf_state`), written too so that HF -> llvm_jax -> HF keeps every weight.
  """
  check_exportable(cfg, allow_custom)
  params = dict(params)
  if cfg.decoder.scan_layers:
    params["decoder"] = unstack_layers(params["decoder"], cfg.decoder.num_layers)
  target = resolve_dtype(dtype)
  flat = {k: np.asarray(jnp.asarray(v, target)) for k, v in tree_utils.flatten(params).items()}
  table = full_table(cfg)
  mapped = {o for r in table.rules for o in r.ours}
  custom = {CUSTOM_PREFIX + k: np.ascontiguousarray(v) for k, v in flat.items() if k not in mapped}
  state = core.ours_to_hf(tree_utils.unflatten({k: v for k, v in flat.items() if k in mapped}), table)
  for key, value in (extra_state or {}).items():
    state.setdefault(key, np.ascontiguousarray(np.asarray(value).astype(target)))
  state.update(custom)
  hf_config = hf_config_of(cfg, **text_extra)
  hf_config.dtype = dtype  # transformers 5's name (torch_dtype is deprecated)
  os.makedirs(out_dir, exist_ok=True)
  hf_config.save_pretrained(out_dir)
  core.write_safetensors_dir(state, out_dir, max_shard_bytes)
  with open(os.path.join(out_dir, CUSTOM_CONFIG), "w") as f:
    json.dump(cfg.to_dict(), f, indent=2)
  return out_dir


def check_exportable(cfg: LLVMConfig, allow_custom: bool = False) -> None:
  """Raises CustomModelError for a model with techniques unless `allow_custom`."""
  techniques = switched_on(cfg)
  if techniques and not allow_custom:
    raise CustomModelError(
        f"the model uses {', '.join(techniques)}, which no transformers class implements: the export would load "
        "as a plain model computing a different function. Pass allow_custom (--allow_custom) to export anyway "
        f"(the {CUSTOM_CONFIG} written beside it lets llvm_jax read it back exactly)."
    )


def _custom_config(source: Any, base: LLVMConfig) -> LLVMConfig | None:
  """The llvm_jax config saved by an allow_custom export, if `source` is one (techniques switched on)."""
  if not isinstance(source, (str, os.PathLike)):
    return None
  path = os.path.join(os.fspath(source), CUSTOM_CONFIG)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    saved = LLVMConfig.from_dict(json.load(f))
  if not switched_on(saved):
    return None  # a plain model: config.json alone describes it
  # Precision and runtime settings are the caller's, as for any checkpoint.
  decoder = dataclasses.replace(
      saved.decoder, **{k: getattr(base.decoder, k) for k in ("dtype", "param_dtype", "scan_layers", "remat_policy")}
  )
  precision = dict(dtype=base.decoder.dtype, param_dtype=base.decoder.param_dtype)
  return dataclasses.replace(
      saved,
      decoder=decoder,
      vision=saved.vision and dataclasses.replace(saved.vision, **precision),
      projector=dataclasses.replace(saved.projector, **precision),
  )


def unused_hf_state(cfg: LLVMConfig, hf_dir: str) -> dict[str, np.ndarray]:
  """The tensors of `hf_dir` that `cfg`'s model never reads (tower layers past the feature layer,
  post-layernorm, SigLIP's head: the tables' `ignore` list), keyed as `to_hf` writes them."""
  ignore = [re.compile(p) for p in full_table(cfg).ignore]
  state = {canonical_key(k): v for k, v in core.read_safetensors_dir(hf_dir).items()}
  return {k: v for k, v in state.items() if any(p.match(k) for p in ignore)}


def config_differences(ours: LLVMConfig, theirs: LLVMConfig) -> list[str]:
  """'field: ours vs checkpoint' for every model field that differs (runtime settings and technique
  blocks, which a checkpoint does not have, are not compared)."""
  a, b = tree_utils.flatten(ours.to_dict()), tree_utils.flatten(theirs.to_dict())
  skip = lambda k: any(part in _RUNTIME_FIELDS for part in k.split("/"))
  return [
      f"model.{k.replace('/', '.')}: config {a.get(k)!r}, checkpoint {b.get(k)!r}"
      for k in sorted(set(a) | set(b))
      if not skip(k) and a.get(k) != b.get(k)
  ]


def checkpoint_differences(cfg: LLVMConfig, hf_dir: str) -> list[str]:
  """`config_differences` between `cfg` and the model of the save_pretrained directory `hf_dir`."""
  import transformers  # lazy: a heavy import, only paid when an HF model is actually used

  return config_differences(cfg, llvm_config_from_hf(transformers.AutoConfig.from_pretrained(hf_dir)))
