"""InternVL2-style LLVM: InternViT + pixel shuffle (0.5) + LayerNorm/MLP projector + Qwen2 LLM.

This is the backbone family of Phantom and TroL. Run (model summary + demo generation):
  python -m llvm_jax.main --config=configs/internvl.py:size=tiny --workdir=/tmp/internvl_tiny
  python -m llvm_jax.main --config=configs/internvl.py:size=1b --workdir=/tmp/internvl1b \
      --config.init_hf=/path/to/InternVL2-1B-hf
Arg: size=tiny|1b (1b: InternViT-300M-448px + Qwen2-0.5B, the InternVL2-1B shapes),
     stage=pretrain|sft|sft_full|po1|po2|trol1 (freeze rules and loss, see train/optim.py),
     technique=baseline|trol|phantom|deepstack|pmod|all_four (or names joined by '+', e.g. trol+pmod;
     data.deepstack_grid follows the model). Or per block: --config.model.decoder.trol.enabled=True.
"""

from llvm_jax import config_utils
from llvm_jax.models.config import DecoderConfig, LLVMConfig, ProjectorConfig, RopeConfig, VisionConfig


def internvl2_1b() -> LLVMConfig:
  decoder = DecoderConfig(
      family="qwen2",
      vocab_size=151655,
      embed_dim=896,
      num_layers=24,
      num_heads=14,
      num_kv_heads=2,
      head_dim=64,
      mlp_dim=4864,
      norm_eps=1e-6,
      qkv_bias=True,
      tie_embeddings=True,
      max_position_embeddings=32768,
      rope=RopeConfig(theta=1000000.0),
  )
  vision = VisionConfig(
      kind="internvit",
      image_size=448,
      patch_size=14,
      width=1024,
      depth=24,
      num_heads=16,
      mlp_dim=4096,
      norm_eps=1e-6,
      feature_layer=-1,
      feature_select="default",
      qkv_bias=True,
      layer_scale=True,
  )
  projector = ProjectorConfig("pixel_shuffle_mlp", downsample_ratio=0.5, norm_eps=1e-5)
  return LLVMConfig(decoder=decoder, vision=vision, projector=projector, image_token_id=151648)


def tiny() -> LLVMConfig:
  base = config_utils.tiny_llvm(family="qwen2")
  vision = VisionConfig(
      kind="internvit",
      image_size=32,
      patch_size=4,
      width=48,
      depth=2,
      num_heads=4,
      mlp_dim=96,
      norm_eps=1e-6,
      feature_layer=-1,
      feature_select="default",
      layer_scale=True,
  )
  return LLVMConfig(
      decoder=base.decoder,
      vision=vision,
      projector=ProjectorConfig("pixel_shuffle_mlp"),
      image_token_id=base.image_token_id,
  )


def get_config(arg=None):
  args = config_utils.parse_arg(arg, size="tiny", stage="sft", technique="baseline")
  sizes = {"tiny": tiny, "1b": internvl2_1b}
  if args.size not in sizes:
    raise ValueError(f"size must be one of {sorted(sizes)}, got {args.size!r}")
  model = config_utils.with_techniques(sizes[args.size](), args.technique)
  config = config_utils.experiment(model, task="demo", lock=False)
  config.data.update(
      vision="internvl", image_size=config.model.vision.image_size, image_start="<img>", image_end="</img>"
  )
  config_utils.set_stage(config, args.stage)
  config.lock()
  return config_utils.finalize(config)
