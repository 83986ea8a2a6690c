"""A ~1B-parameter LLVM with any of the four techniques, for train-step benchmarks on one accelerator.

InternVL2-1B-like: InternViT-300M-448px, pixel shuffle 0.5 (256 tokens per image), an MLP projector
and a Qwen2-0.5B decoder (0.94B parameters), bf16 compute with fp32 master weights; each technique
uses its paper's settings (TroL, Phantom, DeepStack-L with 2x2 crops at layers 1-4, p-MoD's
progressive shifted-cosine ratio decay).

  python -m llvm_jax.bench --config=configs/bench_1b.py:technique=trol --steps=10
  python experiments/gpu_bench.py        # every technique, writes experiments/results/gpu.md

Arg: technique=baseline|trol|phantom|deepstack|pmod|all_four (or names joined by '+'), batch,
     seq_len, remat=none|full|dots|dots_no_batch, size=1b|tiny (tiny: the same structure at toy
     widths, for CPU checks of the benchmark itself), attention=blocked|xla|cudnn|splash (the kernel of
     the decoder and the ViT: cudnn on GPUs, splash on TPUs), block (its tile; 128 keeps the CPU check's memory small), scan=true|false (scanned layers: one
     compiled layer body per stage instead of one per layer).
"""

import dataclasses

from configs.paper import internvl2_like
from llvm_jax import config_utils
from llvm_jax.models.config import PmodConfig


def tiny_internvl_like():
  base = internvl2_like("0.5b")
  return dataclasses.replace(
      base,
      vision=dataclasses.replace(base.vision, image_size=56, width=32, depth=2, num_heads=2, mlp_dim=64),
      decoder=dataclasses.replace(
          base.decoder,
          vocab_size=512,
          embed_dim=64,
          num_layers=6,
          num_heads=4,
          num_kv_heads=2,
          head_dim=16,
          mlp_dim=128,
      ),
      image_token_id=500,
  )


def get_config(arg=None):
  args = config_utils.parse_arg(
      arg,
      technique="baseline",
      batch=16,
      seq_len=1024,
      remat="full",
      size="1b",
      attention="blocked",
      block=128,
      scan=True,
  )
  if args.size not in ("1b", "tiny"):
    raise ValueError(f"size must be 1b or tiny, got {args.size!r}")
  base = internvl2_like("0.5b") if args.size == "1b" else tiny_internvl_like()
  # Tiny: 6 layers, so p-MoD's schedule is explicit (the progressive decay needs depth to spread).
  pmod = PmodConfig() if args.size == "1b" else PmodConfig(schedule="explicit", layers=(2, 3, 4, 5), ratios=(0.5,) * 4)
  model = config_utils.with_techniques(base, args.technique, pmod=pmod)
  model = config_utils.with_precision(model, "bfloat16", "float32", None if args.remat == "none" else args.remat)
  model = config_utils.with_attention(model, args.attention, block_size=args.block)
  model = dataclasses.replace(model, decoder=dataclasses.replace(model.decoder, scan_layers=args.scan))
  config = config_utils.experiment(model, task="train", lock=False)
  config.data.update(
      seq_len=args.seq_len,
      global_batch_size=args.batch,
      vision="internvl",
      image_size=model.vision.image_size,
      image_start="<img>",
      image_end="</img>",
  )
  if model.deepstack is not None:
    config.data.deepstack_grid = model.deepstack.num_crops
  config.optim.update(lr=1e-5, warmup_steps=10, weight_decay=0.0, grad_clip=1.0)
  config.lock()
  return config
