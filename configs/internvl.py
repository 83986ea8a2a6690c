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

from configs import paper
from llvm_jax import config_utils
from llvm_jax.models.config import LLVMConfig, ProjectorConfig, VisionConfig


def internvl2_1b() -> LLVMConfig:
  """InternVL2-1B: InternViT-300M-448px, pixel shuffle 0.5 and Qwen2-0.5B (the paper configs' shapes)."""
  return paper.internvl2_like("0.5b")


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
