"""Helpers for `configs/*.py`: big_vision-style arg strings and model blocks.

A config file defines `get_config(arg=None)` returning a locked `ml_collections.ConfigDict`;
`--config=configs/llava.py:llm=qwen2,res=336` passes `"llm=qwen2,res=336"` as `arg`.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from typing import Any

import ml_collections
from ml_collections import config_dict

from llvm_jax.data.config import default_data_config
from llvm_jax.data.config import resolve as resolve_data
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
from llvm_jax.train import lora
from llvm_jax.train.optim import STAGE_LOSS, STAGE_RULES, default_optim_config

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


# The technique blocks: where each lives in the model config and its dataclass.
_TECHNIQUE_BLOCKS = {
    "trol": ("decoder", TrolConfig),
    "phantom": ("decoder", PhantomConfig),
    "pmod": ("decoder", PmodConfig),
    "deepstack": (None, DeepStackConfig),
}


def model_block(cfg: LLVMConfig) -> ml_collections.ConfigDict:
  """A ConfigDict mirroring `cfg` field for field (so overrides and typos are checked).

  Every technique block is present: a technique that is off is its defaults (fitted to this model,
  see `default_technique`) with `enabled=False`, so `--config.model.decoder.trol.enabled=True`
  switches it on. Optional scalar fields are typed placeholders, so `--config.model.decoder.trol.layers
  ='(0,1)'` can override a None.
  """
  values = cfg.to_dict()
  for name, (parent, _) in _TECHNIQUE_BLOCKS.items():
    holder = values[parent] if parent else values
    if holder[name] is None:
      holder[name] = {**dataclasses.asdict(default_technique(cfg, name)), "enabled": False}
  return ml_collections.ConfigDict(_with_placeholders(LLVMConfig, values))


def _with_placeholders(cls: type, values: dict[str, Any]) -> dict[str, Any]:
  """`values` (a dataclass's asdict) with each None of an Optional scalar field as a typed placeholder."""
  hints = typing.get_type_hints(cls)
  out = {}
  for name, value in values.items():
    kinds = [t for t in typing.get_args(hints[name]) if t is not type(None)] or [hints[name]]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    if dataclasses.is_dataclass(kind):
      out[name] = None if value is None else _with_placeholders(kind, value)
    elif value is None and kind in (int, float, str, bool, tuple):
      out[name] = config_dict.placeholder(kind)
    else:
      out[name] = value
  return out


def default_technique(cfg: LLVMConfig, name: str) -> Any:
  """Technique `name`'s default block (the paper's settings), clamped where `cfg` is too small for them.

  DeepStack-L adds its 2x2 crop groups before decoder layers 1..4; a model with fewer than 5 layers
  starts earlier, and one with fewer than 4 uses 1x2 (or 1x1) crops. p-MoD's PRD schedule works at
  any depth.
  """
  block = _TECHNIQUE_BLOCKS[name][1]()
  if name == "deepstack":
    layers = cfg.decoder.num_layers
    if block.llm and block.llm_layers[-1] >= layers:
      crops = block.num_crops if layers >= block.num_groups else (1, 2) if layers >= 2 else (1, 1)
      groups = crops[0] * crops[1]
      block = dataclasses.replace(block, num_crops=crops, start=min(block.start, layers - groups), interval=1)
  return block


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

  Each technique uses its block's defaults (the papers' settings, clamped to fit a small model: see
  `default_technique`) unless a block is passed.
  """
  names = technique_names(names)
  given = {"trol": trol, "phantom": phantom, "deepstack": deepstack, "pmod": pmod}
  blocks = {n: given[n] or default_technique(cfg, n) for n in TECHNIQUES}
  decoder = dataclasses.replace(cfg.decoder, **{n: blocks[n] for n in names if n != "deepstack"})
  return dataclasses.replace(
      cfg, decoder=decoder, deepstack=blocks["deepstack"] if "deepstack" in names else cfg.deepstack
  )


def technique_names(names: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
  """'trol+pmod' -> ('trol', 'pmod'); 'all_four' -> all; 'baseline' or '' -> (); unknown names raise."""
  if isinstance(names, str):
    names = TECHNIQUES if names == "all_four" else tuple(n for n in names.split("+") if n and n != "baseline")
  unknown = sorted(set(names) - set(TECHNIQUES))
  if unknown:
    raise ValueError(
        f"unknown technique(s) {unknown}; expected names from {TECHNIQUES} joined by '+', " "'all_four' or 'baseline'"
    )
  return tuple(names)


def with_precision(
    cfg: LLVMConfig, dtype: str = "bfloat16", param_dtype: str = "float32", remat_policy: str | None = None
) -> LLVMConfig:
  """`cfg` computing in `dtype` with `param_dtype` (master) weights in the decoder, ViT and projector,
  and `remat_policy` in the decoder and ViT."""
  precision = dict(dtype=dtype, param_dtype=param_dtype)
  return dataclasses.replace(
      cfg,
      decoder=dataclasses.replace(cfg.decoder, remat_policy=remat_policy, **precision),
      vision=cfg.vision and dataclasses.replace(cfg.vision, remat_policy=remat_policy, **precision),
      projector=dataclasses.replace(cfg.projector, **precision),
  )


def with_attention(cfg: LLVMConfig, impl: str, block_size: int | None = None) -> LLVMConfig:
  """`cfg` with attention implementation `impl` (models/attention.py) in the decoder and the ViT, and
  their tile size ('blocked', 'splash') when `block_size` is given."""
  tiles = {} if block_size is None else dict(attention_block_size=int(block_size))
  return dataclasses.replace(
      cfg,
      decoder=dataclasses.replace(cfg.decoder, attention_impl=impl, **tiles),
      vision=cfg.vision and dataclasses.replace(cfg.vision, attention_impl=impl, **tiles),
  )


def with_dense(cfg: LLVMConfig, impl: str) -> LLVMConfig:
  """`cfg` with dense-layer implementation `impl` (config.DENSE_IMPLEMENTATIONS: 'xla' | 'cpu') in the
  decoder, the ViT and the projector."""
  return dataclasses.replace(
      cfg,
      decoder=dataclasses.replace(cfg.decoder, dense_impl=impl),
      vision=cfg.vision and dataclasses.replace(cfg.vision, dense_impl=impl),
      projector=dataclasses.replace(cfg.projector, dense_impl=impl),
  )


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
      family=family,
      vocab_size=vocab_size,
      embed_dim=embed_dim,
      num_layers=num_layers,
      num_heads=4,
      num_kv_heads=2,
      head_dim=embed_dim // 4,
      mlp_dim=2 * embed_dim,
      norm_eps=1e-6,
      qkv_bias=family == "qwen2",
      tie_embeddings=False,
      max_position_embeddings=512,
      rope=RopeConfig(),
  )
  vision = VisionConfig(
      kind=vision_kind,
      image_size=image_size,
      patch_size=patch_size,
      width=vision_width,
      depth=vision_depth,
      num_heads=4,
      mlp_dim=2 * vision_width,
      feature_layer=-1,
      feature_select="default" if vision_kind != "siglip" else "full",
  )
  return LLVMConfig(decoder=decoder, vision=vision, projector=ProjectorConfig(), image_token_id=image_token_id)


def experiment(model: LLVMConfig, task: str = "demo", lock: bool = True) -> ml_collections.ConfigDict:
  """An experiment config around `model`; once locked, overrides of unknown keys fail by name.

  Blocks: model, data (llvm_jax.data.config), optim (train.optim), train, sharding, evals.
  """
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
  # Evals added or changed from the command line (a locked ConfigDict takes no new keys):
  # 'NAME[:TYPE][,key=value...][;...]'; a new NAME needs its TYPE, an existing one is updated, '-NAME'
  # drops one, e.g. --config.eval_specs='val:vqa,split=test,max_examples=50;test,max_examples=100'.
  config.eval_specs = ""
  # task='eval': the checkpoint to evaluate (a workdir, its checkpoints/ or a step folder; '' = the
  # workdir's latest).
  config.eval_checkpoint = ""
  if lock:
    config.lock()
  return config


def parse_eval_specs(specs: str) -> dict[str, dict[str, Any] | None]:
  """'val:vqa,split=test,max_examples=50;test,max_examples=9;-old' -> {'val': dict(type='vqa', split=..., ...),
  'test': dict(max_examples=9), 'old': None}.

  Values are Python literals where they parse as one (50, 0.5, True, (1, 2)), else strings.
  """
  out: dict[str, Any] = {}
  for spec in filter(None, (s.strip() for s in specs.split(";"))):
    if spec.startswith("-"):
      out[spec[1:]] = None  # drop
      continue
    head, *items = spec.split(",")
    name, *kind = head.split(":")
    if not name or len(kind) > 1 or (kind and not kind[0]):
      raise ValueError(f"config.eval_specs entry {spec!r}: expected NAME[:TYPE][,key=value...]")
    entry: dict[str, Any] = {"type": kind[0]} if kind else {}
    for item in items:
      if "=" not in item:
        raise ValueError(f"config.eval_specs entry {spec!r}: {item!r} is not key=value")
      key, value = item.split("=", 1)
      try:
        entry[key] = ast.literal_eval(value)
      except (ValueError, SyntaxError):
        entry[key] = value
    out[name] = entry
  return out


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Settings that follow from others, applied after command-line overrides (main calls it; idempotent).

  - `config.eval_specs` entries are added to `config.evals` (with a TYPE: replacing an entry of that name;
    without: updating the existing entry; '-NAME': dropping it).
  - `data.deepstack_grid` follows `model.deepstack.num_crops` when DeepStack is on (a different
    explicit value raises, naming both fields); `data.deepstack_grid_mode` other than 'fixed'
    needs DeepStack on.
  """
  if config.get("eval_specs"):
    with config.unlocked():
      for name, entry in parse_eval_specs(config.eval_specs).items():
        if entry is None:
          if name not in config.evals:
            raise ValueError(f"config.eval_specs: -{name}: no such eval; existing evals: {sorted(config.evals)}")
          config.evals = {k: v for k, v in config.evals.items() if k != name}
        elif "type" in entry:
          config.evals[name] = entry
        elif name in config.evals:
          config.evals[name].update(entry)
        else:
          raise ValueError(
              f"config.eval_specs: eval {name!r} is new, so it needs a type ({name}:vqa,...); "
              f"existing evals: {sorted(config.evals)}"
          )
  model = model_config(config)
  settings = resolve_data(config.data)  # validates every data field, defaults from one place
  grid = settings.deepstack_grid
  if model.deepstack is not None:
    crops = tuple(model.deepstack.num_crops)
    if grid is None:
      config.data.deepstack_grid = crops
    elif tuple(grid) != crops:
      raise ValueError(
          f"data.deepstack_grid={tuple(grid)} differs from model.deepstack.num_crops={crops}; "
          "leave data.deepstack_grid unset (it follows the model) or make them equal"
      )
  elif grid is not None:
    raise ValueError(
        f"data.deepstack_grid={tuple(grid)} is set but DeepStack is off; enable it with "
        "--config.model.deepstack.enabled=True or unset data.deepstack_grid"
    )
  elif settings.deepstack_grid_mode != "fixed":
    raise ValueError(
        f"data.deepstack_grid_mode={settings.deepstack_grid_mode!r} needs DeepStack; enable it with "
        "--config.model.deepstack.enabled=True or leave data.deepstack_grid_mode='fixed'"
    )
  if model.decoder.pmod is not None and settings.packing:
    # A MoD layer's kept length is static (S - n + trunc(r*n) for the n vision slots); a packed row
    # with fewer images and more text would not fit it, and inside jit its extra tokens would skip the
    # layer without an error.
    raise ValueError(
        "p-MoD (model.decoder.pmod) needs data.packing=False: a packed row with fewer images and more "
        "text than its slots allow does not fit a MoD layer's static kept length; set --config.data.packing=False"
    )
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
  # Resume only params (and the data position) with a fresh optimiser state, e.g. after changing
  # the optimiser's parameter groups, whose saved state then no longer matches.
  t.resume_params_only = False
  # Phantom Optimization (train.loss='po'): L_SFT + lam * L_pref with SimPO's beta and margin gamma.
  t.po = ml_collections.ConfigDict({"beta": 2.0, "gamma": 1.0, "lam": 1.0})
  return t


def set_stage(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """Applies a training-stage preset (train.optim.STAGE_RULES): freeze rules and loss."""
  if stage not in STAGE_RULES:
    raise ValueError(f"unknown stage {stage!r}; expected one of {sorted(STAGE_RULES)}")
  config.optim.trainable = STAGE_RULES[stage]
  config.train.loss = STAGE_LOSS.get(stage, "sft")
  return config
