"""Helpers for `configs/*.py`: big_vision-style arg strings and model blocks.

A config file defines `get_config(arg=None)` returning a locked `ml_collections.ConfigDict`;
`--config=configs/llava.py:llm=qwen2,res=336` passes `"llm=qwen2,res=336"` as `arg`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from llvm_jax.models.config import (
    DecoderConfig,
    DeepStackConfig,
    LLVMConfig,
    PhantomConfig,
    PmodConfig,
    ProjectorConfig,
    RopeConfig,
    TrolConfig,
    VisionConfig,
)

TECHNIQUES = ("trol", "phantom", "deepstack", "pmod")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2=v2' into a ConfigDict typed like `defaults`; unknown keys raise."""
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    if not item:
      continue
    if "=" not in item:
      raise ValueError(f"config arg {item!r} is not key=value (full arg: {arg!r})")
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; expected one of {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config arg {key}={value!r} is not a boolean")
      result[key] = value.lower() in ("true", "1")
    elif default is None:
      result[key] = value
    else:
      result[key] = type(default)(value)
  return result


def model_block(cfg: LLVMConfig) -> ml_collections.ConfigDict:
  """A ConfigDict mirroring `cfg` field for field (so overrides and typos are checked)."""
  return ml_collections.ConfigDict(cfg.to_dict())


def model_config(config: ml_collections.ConfigDict) -> LLVMConfig:
  """The model dataclass of an experiment config; unknown keys raise with their full name."""
  return LLVMConfig.from_dict(config.model)


def with_techniques(
    cfg: LLVMConfig,
    names: str | tuple[str, ...] | list[str],
    *,
    trol: TrolConfig | None = None,
    phantom: PhantomConfig | None = None,
    deepstack: DeepStackConfig | None = None,
    pmod: PmodConfig | None = None,
) -> LLVMConfig:
  """`cfg` with the named techniques switched on ('trol+pmod', 'all_four', 'baseline' or a list).

  Each technique uses its block's defaults (the papers' settings) unless a block is passed.
  """
  if isinstance(names, str):
    names = TECHNIQUES if names == "all_four" else tuple(n for n in names.split("+") if n and n != "baseline")
  unknown = sorted(set(names) - set(TECHNIQUES))
  if unknown:
    raise ValueError(f"unknown technique(s) {unknown}; expected names from {TECHNIQUES}, 'all_four' or 'baseline'")
  blocks = {"trol": trol or TrolConfig(), "phantom": phantom or PhantomConfig(),
            "deepstack": deepstack or DeepStackConfig(), "pmod": pmod or PmodConfig()}
  decoder = dataclasses.replace(cfg.decoder, **{n: blocks[n] for n in names if n != "deepstack"})
  return dataclasses.replace(cfg, decoder=decoder, deepstack=blocks["deepstack"] if "deepstack" in names else cfg.deepstack)


def with_precision(cfg: LLVMConfig, dtype: str = "bfloat16", param_dtype: str = "float32",
                   remat_policy: str | None = None) -> LLVMConfig:
  """`cfg` computing in `dtype` with `param_dtype` (master) weights in the decoder, ViT and projector,
  and `remat_policy` in the decoder and ViT."""
  precision = dict(dtype=dtype, param_dtype=param_dtype)
  return dataclasses.replace(
      cfg, decoder=dataclasses.replace(cfg.decoder, remat_policy=remat_policy, **precision),
      vision=cfg.vision and dataclasses.replace(cfg.vision, remat_policy=remat_policy, **precision),
      projector=dataclasses.replace(cfg.projector, **precision))


def tiny_llvm(
    vocab_size: int = 128,
    image_token_id: int = 4,
    image_size: int = 32,
    patch_size: int = 8,
    family: str = "llama",
    vision_kind: str = "clip",
    embed_dim: int = 64,
    num_layers: int = 2,
    vision_width: int = 48,
    vision_depth: int = 2,
) -> LLVMConfig:
  """A few-hundred-thousand-parameter LLVM for demos and tests."""
  decoder = DecoderConfig(
      family=family, vocab_size=vocab_size, embed_dim=embed_dim, num_layers=num_layers, num_heads=4,
      num_kv_heads=2, head_dim=embed_dim // 4, mlp_dim=2 * embed_dim, norm_eps=1e-6,
      qkv_bias=family == "qwen2", tie_embeddings=False, max_position_embeddings=512, rope=RopeConfig(),
  )
  vision = VisionConfig(
      kind=vision_kind, image_size=image_size, patch_size=patch_size, width=vision_width, depth=vision_depth,
      num_heads=4, mlp_dim=2 * vision_width, feature_layer=-1, feature_select="default" if vision_kind != "siglip" else "full",
  )
  return LLVMConfig(decoder=decoder, vision=vision, projector=ProjectorConfig(), image_token_id=image_token_id)


def experiment(model: LLVMConfig, task: str = "demo", lock: bool = True) -> ml_collections.ConfigDict:
  """An experiment config around `model`; once locked, overrides of unknown keys fail by name.

  Blocks: model, data (llvm_jax.data.config), optim (train.optim), train, sharding, evals.
  """
  from llvm_jax.data.config import default_data_config
  from llvm_jax.train import lora
  from llvm_jax.train.optim import default_optim_config

  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0
  config.model = model_block(model)
  # A transformers save_pretrained directory to initialise from ('' = random init).
  config.init_hf = ""
  # A previous stage's run to start from (workdir or step folder; params only, same model) or ''.
  config.init_checkpoint = ""
  # Greedy tokens generated after the prompt by the demo task.
  config.max_new_tokens = 8
  # A tokenizer directory, or 'tiny' for the built-in synthetic_vqa tokenizer (built in workdir).
  config.tokenizer = "tiny"
  config.image_token = "<image>"
  config.data = default_data_config()
  config.optim = default_optim_config()
  config.train = train_block()
  config.lora = lora.default_config()
  config.sharding = ml_collections.ConfigDict({"mesh_shape": (-1, 1, 1), "strategy": "fsdp"})
  # name -> dict(type=..., **kwargs), big_vision style (see llvm_jax/evaluators).
  config.evals = ml_collections.ConfigDict()
  # task='eval': the checkpoint to evaluate (a workdir, its checkpoints/ or a step folder; '' = the
  # workdir's latest).
  config.eval_checkpoint = ""
  if lock:
    config.lock()
  return config


def train_block() -> ml_collections.ConfigDict:
  t = ml_collections.ConfigDict()
  t.total_steps = 100
  t.loss = "sft"
  # Gradient accumulation: the global batch is split into this many sequential micro-batches.
  t.microbatches = 1
  t.log_every = 10
  t.eval_every = 0
  t.checkpoint_every = 50
  t.keep_checkpoints = 3
  t.async_checkpoints = True
  # Phantom Optimization (train.loss='po'): L_SFT + lam * L_pref with SimPO's beta and margin gamma.
  t.po = ml_collections.ConfigDict({"beta": 2.0, "gamma": 1.0, "lam": 1.0})
  return t


def set_stage(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """Applies a training-stage preset (train.optim.STAGE_RULES): freeze rules and loss."""
  from llvm_jax.train.optim import STAGE_LOSS, STAGE_RULES

  if stage not in STAGE_RULES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_RULES)}")
  config.optim.trainable = STAGE_RULES[stage]
  config.train.loss = STAGE_LOSS.get(stage, "sft")
  return config
