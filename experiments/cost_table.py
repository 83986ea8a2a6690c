"""Cost of each technique at paper scale, analytic, from configs/paper.py (no weights allocated).

  python experiments/cost_table.py            # writes experiments/results/cost_7b.md

One sample: one image (LLaVA: 576 tokens at 336 px; InternVL2: one 448 px tile, 256 tokens) and 64
text tokens; bf16 KV cache; FLOPs per llvm_jax/flops.py (2 per multiply-add, causal attention at
one half, training = 3 x forward).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import paper  # noqa: E402
from llvm_jax import cost, flops  # noqa: E402

TEXT_TOKENS = 64
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cost_7b.md")
PAPER_PMOD = {"tflops": 0.556, "kv": 0.538}


def bf16(cfg):
  return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, dtype="bfloat16", param_dtype="bfloat16"))


def main() -> str:
  reports = {name: cost.report(bf16(fn()), TEXT_TOKENS) for name, fn in paper.MODELS.items()}
  lines = [
      "# Technique costs at paper scale (analytic)",
      "",
      f"Produced by `python experiments/cost_table.py` on {datetime.date.today()}; one sample = one image "
      f"+ {TEXT_TOKENS} text tokens, bf16 KV cache.",
      "",
      "## All paper-scale configs",
      "",
      "| model | params | context tokens | prefill TFLOPs | train TFLOPs / sample | KV cache (MiB) |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for name, r in reports.items():
    lines.append(
        f"| {name} | {r['params'] / 1e9:.3f} B | {r['context_tokens']} | {r['prefill_flops'] / 1e12:.3f} | "
        f"{r['train_flops_per_sample'] / 1e12:.3f} | {r['kv_cache_bytes'] / 2**20:.1f} |"
    )

  base, pm = reports["llava15_7b"], reports["pmod_llava15_7b"]
  seq = base["context_tokens"]
  pc = flops.pmod_cost(bf16(paper.MODELS["pmod_llava15_7b"]()), seq, 576)
  lines += [
      "",
      "## p-MoD vs LLaVA-1.5-7B",
      "",
      f"Default schedule (shiftedcos, r̄ = 0.5, bounds 0.85 / 0.15): {pc['mod_layers']} MoD layers.",
      "",
      "| quantity | llvm_jax | paper |",
      "|---|---:|---:|",
      f"| decoder FLOPs (prefill) | {pc['decoder_flops_ratio']:.1%} | {PAPER_PMOD['tflops']:.1%} TFLOPs |",
      f"| whole-model prefill FLOPs (ViT included) | {pm['prefill_flops'] / base['prefill_flops']:.1%} | |",
      f"| KV cache, whole sample | {pm['kv_cache_bytes'] / base['kv_cache_bytes']:.1%} | |",
      f"| KV cache, vision tokens | {pc['vision_kv_ratio']:.1%} | {PAPER_PMOD['kv']:.1%} |",
  ]

  dcfg = bf16(paper.MODELS["deepstack_l_7b"]())
  dc = flops.deepstack_cost(dcfg, TEXT_TOKENS)
  ds = reports["deepstack_l_7b"]
  plain = dataclasses.replace(bf16(paper.MODELS["llava15_7b"]()))
  plain_kv = cost.kv_cache_bytes(plain, TEXT_TOKENS + 576 * dc["groups"])
  lines += [
      "",
      "## DeepStack-L-7B vs LLaVA-1.5 with 5x the visual tokens",
      "",
      f"{dc['groups']} high-resolution crops (672 px as 2 x 2 views of 336 px) added before LLM layers "
      f"{list(dc['llm_layers'])}, against putting all 5 x 576 tokens in the context.",
      "",
      "| quantity | DeepStack-L | LLaVA-1.5, 5x tokens | LLaVA-1.5 |",
      "|---|---:|---:|---:|",
      f"| context tokens | {dc['context_tokens']} | {dc['context_tokens_plain_hires']} | {base['context_tokens']} |",
      f"| prefill TFLOPs | {dc['total_flops'] / 1e12:.3f} | {dc['total_flops_plain_hires'] / 1e12:.3f} | "
      f"{base['prefill_flops'] / 1e12:.3f} |",
      f"| KV cache (MiB) | {ds['kv_cache_bytes'] / 2**20:.1f} | {plain_kv / 2**20:.1f} | {base['kv_cache_bytes'] / 2**20:.1f} |",
      "",
      f"DeepStack-L prefill = {dc['total_flops_ratio_vs_plain_hires']:.1%} of the 5x-token model's, "
      f"{ds['prefill_flops'] / base['prefill_flops']:.2f}x the base model's.",
  ]

  lines += [
      "",
      "## TroL and Phantom overheads on their InternVL2-style backbones",
      "",
      "| model | added params | prefill FLOPs vs backbone | train FLOPs vs backbone | KV cache vs backbone |",
      "|---|---:|---:|---:|---:|",
  ]
  for name, r in reports.items():
    if not name.startswith(("trol_", "phantom_")):
      continue
    ref = reports[f"internvl2_{name.split('_')[1]}"]
    lines.append(
        f"| {name} | {r['params'] - ref['params']:,} | {r['prefill_flops'] / ref['prefill_flops']:.3f}x | "
        f"{r['train_flops_per_sample'] / ref['train_flops_per_sample']:.3f}x | "
        f"{r['kv_cache_bytes'] / ref['kv_cache_bytes']:.3f}x |"
    )
  lines += [
      "",
      "TroL's KV cache doubles with 'full' decoding (each traversed layer's second pass caches its own "
      "K/V); with decode_traversal='official' it stays at 1x and decoding costs no extra FLOPs. Phantom's "
      "default cache='expanded' keeps the 2d-wide K' and V' (2x); cache='recompute' keeps d-wide K/V (1x, "
      "plus the sos entries) and recomputes K*, V* every step, as the official code does.",
      "",
  ]
  text = "\n".join(lines)
  os.makedirs(os.path.dirname(OUT), exist_ok=True)
  with open(OUT, "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  print(main())
