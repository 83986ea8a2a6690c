"""Paper-scale models: the baselines and backbones of the four papers, each with its technique on.

  python -m llvm_jax.cost --config=configs/paper.py:model=pmod_llava15_7b      # params, FLOPs, KV cache
  python -m llvm_jax.main --config=configs/paper.py:model=trol_3.8b --workdir=/tmp/trol38 \
      --config.init_hf=/path/to/InternVL2-4B-hf --config.task=train ...     # on real hardware and data

Arg: model=<one of MODELS>, stage=pretrain|sft|sft_full|po1|po2|trol1, technique=<names joined by '+'>
(switched on in addition to the model's own, e.g. model=llava15_7b,technique=trol+pmod; or per block:
--config.model.decoder.phantom.enabled=True).

LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B) is the baseline of DeepStack and p-MoD. TroL and Phantom
are built on InternVL2-style backbones (InternViT-300M-448px, pixel shuffle 0.5, an MLP projector)
with LLMs of the papers' sizes. '-like': InternLM2 LLMs are replaced by Llama-architecture decoders
of the same shapes (InternLM2 is a Llama with fused qkv), and Phi-3-mini uses its 4k RoPE.
"""

from __future__ import annotations

from collections.abc import Callable

from configs.llava import llava_7b
from llvm_jax import config_utils
from llvm_jax.models.config import DecoderConfig, LLVMConfig, ProjectorConfig, RopeConfig, VisionConfig

INTERNVIT_300M = VisionConfig(
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

# LLMs of the InternVL2 family (HF shapes): Qwen2-0.5B (1B), InternLM2-1.8B (2B), Phi-3-mini (4B),
# InternLM2.5-7B (8B).
LLMS = {
    "0.5b": DecoderConfig(
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
    ),
    "1.8b": DecoderConfig(
        family="llama",
        vocab_size=92553,
        embed_dim=2048,
        num_layers=24,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=8192,
        norm_eps=1e-5,
        max_position_embeddings=32768,
        rope=RopeConfig(theta=1000000.0),
    ),
    "3.8b": DecoderConfig(
        family="phi3",
        vocab_size=32020,
        embed_dim=3072,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=96,
        mlp_dim=8192,
        norm_eps=1e-5,
        max_position_embeddings=4096,
        rope=RopeConfig(theta=10000.0),
    ),
    "7b": DecoderConfig(
        family="llama",
        vocab_size=92553,
        embed_dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        mlp_dim=14336,
        norm_eps=1e-5,
        max_position_embeddings=32768,
        rope=RopeConfig(theta=1000000.0),
    ),
}
IMAGE_TOKEN_IDS = {"0.5b": 151648, "1.8b": 92546, "3.8b": 32013, "7b": 92546}


def internvl2_like(size: str) -> LLVMConfig:
  return LLVMConfig(
      decoder=LLMS[size],
      vision=INTERNVIT_300M,
      projector=ProjectorConfig("pixel_shuffle_mlp", downsample_ratio=0.5, norm_eps=1e-5),
      image_token_id=IMAGE_TOKEN_IDS[size],
  )


MODELS: dict[str, Callable[[], LLVMConfig]] = {
    "llava15_7b": lambda: llava_7b("llama"),
    "deepstack_l_7b": lambda: config_utils.with_techniques(llava_7b("llama"), "deepstack"),
    "pmod_llava15_7b": lambda: config_utils.with_techniques(llava_7b("llama"), "pmod"),
    **{f"internvl2_{s}": (lambda s=s: internvl2_like(s)) for s in ("0.5b", "1.8b", "3.8b", "7b")},
    **{
        f"trol_{s}": (lambda s=s: config_utils.with_techniques(internvl2_like(s), "trol"))
        for s in ("1.8b", "3.8b", "7b")
    },
    **{
        f"phantom_{s}": (lambda s=s: config_utils.with_techniques(internvl2_like(s), "phantom"))
        for s in ("0.5b", "1.8b", "3.8b", "7b")
    },
}


def get_config(arg=None):
  args = config_utils.parse_arg(arg, model="llava15_7b", stage="sft", technique="baseline")
  if args.model not in MODELS:
    raise ValueError(f"model={args.model!r} unknown; expected one of {sorted(MODELS)}")
  model = config_utils.with_techniques(MODELS[args.model](), args.technique)
  config = config_utils.experiment(model, task="demo", lock=False)
  if model.vision.kind == "internvit":
    config.data.update(vision="internvl", image_start="<img>", image_end="</img>")
  config.data.image_size = model.vision.image_size
  config_utils.set_stage(config, args.stage)
  config.lock()
  return config_utils.finalize(config)  # data.deepstack_grid follows the model
