"""Helpers for `configs/*.py`: big_vision-style arg strings and model blocks.

A config file defines `get_config(arg=None)` returning a locked `ml_collections.ConfigDict`;
`--config=configs/llava.py:llm=qwen2,res=336` passes `"llm=qwen2,res=336"` as `arg`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from llvm_jax.models.config import DecoderConfig, LLVMConfig, ProjectorConfig, RopeConfig, VisionConfig


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
