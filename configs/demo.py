"""The embedded default: a tiny random LLVM (CLIP-style ViT + mlp2x_gelu + Llama-style LLM).

Run:
  python -m llvm_jax.main --config=configs/demo.py --workdir=workdirs/demo
"""

from llvm_jax import config_utils


def get_config(arg=None):
  args = config_utils.parse_arg(arg, llm="llama", vision="clip")
  return config_utils.experiment(config_utils.tiny_llvm(family=args.llm, vision_kind=args.vision))
