"""LLaVA-1.5: CLIP ViT-L/14 (or SigLIP) + mlp2x_gelu projector + a Llama / Qwen2 / Phi-3 LLM.

Run (model summary + one forward pass on random weights, or on an HF checkpoint with init_hf):
  python -m llvm_jax.main --config=configs/llava.py:size=tiny --workdir=/tmp/llava_tiny
  python -m llvm_jax.main --config=configs/llava.py:size=7b,llm=llama --workdir=/tmp/llava7b \
      --config.init_hf=/path/to/llava-1.5-7b-hf
Arg: size=tiny|7b, llm=llama|qwen2|phi3, vision=clip|siglip, res=<pixels> (tiny only),
     stage=pretrain|sft|sft_full|po1|po2|trol1 (freeze rules and loss, see train/optim.py),
     technique=baseline|trol|phantom|deepstack|pmod|all_four (or names joined by '+', e.g. trol+pmod;
     data.deepstack_grid follows the model). Or per block: --config.model.decoder.pmod.enabled=True.
Training instead of the demo: --config.task=train (with --config.data.* pointing at the data).
"""

from llvm_jax import config_utils
from llvm_jax.models.config import DecoderConfig, LLVMConfig, ProjectorConfig, RopeConfig, VisionConfig


def llava_7b(llm: str) -> LLVMConfig:
  if llm != "llama":
    raise ValueError("size=7b is LLaVA-1.5-7B (Vicuna, a Llama); use size=tiny for other families")
  decoder = DecoderConfig(
      family="llama",
      vocab_size=32064,
      embed_dim=4096,
      num_layers=32,
      num_heads=32,
      num_kv_heads=32,
      head_dim=128,
      mlp_dim=11008,
      norm_eps=1e-5,
      max_position_embeddings=4096,
      rope=RopeConfig(theta=10000.0),
  )
  vision = VisionConfig(
      kind="clip",
      image_size=336,
      patch_size=14,
      width=1024,
      depth=24,
      num_heads=16,
      mlp_dim=4096,
      norm_eps=1e-5,
      feature_layer=-2,
      feature_select="default",
  )
  return LLVMConfig(decoder=decoder, vision=vision, projector=ProjectorConfig("mlp2x_gelu"), image_token_id=32000)


def get_config(arg=None):
  args = config_utils.parse_arg(arg, size="tiny", llm="llama", vision="clip", res=32, stage="sft", technique="baseline")
  if args.size == "7b":
    model = llava_7b(args.llm)
  elif args.size == "tiny":
    model = config_utils.tiny_llvm(family=args.llm, vision_kind=args.vision, image_size=args.res)
  else:
    raise ValueError(f"size must be tiny or 7b, got {args.size!r}")
  model = config_utils.with_techniques(model, args.technique)
  config = config_utils.experiment(model, task="demo", lock=False)
  config_utils.set_stage(config, args.stage)
  # The images are preprocessed for the model's tower (normalisation and size).
  config.data.update(vision=model.vision.kind, image_size=model.vision.image_size)
  config.lock()
  return config_utils.finalize(config)
