"""Train-step speed of the ~1B LLVM (configs/bench_1b.py) with each technique, on one accelerator.

  python experiments/gpu_bench.py                         # on a GPU/TPU: writes experiments/results/gpu.md
  python experiments/gpu_bench.py --size=tiny --batch=4 --seq_len=128 --out=/tmp/gpu.md   # CPU check

Runs llvm_jax.bench's timing (the trainer's own jitted train step, bf16 compute, fp32 master
weights, full remat, scanned layers, the backend's fused attention kernel, synthetic batches) for the
baseline and each technique in one process, one after the other on the same device, and writes a
Markdown table: step time, tokens/s, TFLOP/s and MFU (analytic FLOPs including each technique's extra
work, llvm_jax/flops.py), init and compile time, the step's memory, the step-time ratio to the
baseline, and the first and last step's loss. A variant that fails (out of memory, say) is recorded
with its error and the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402

from configs import bench_1b  # noqa: E402
from llvm_jax.bench.train_step import time_jax  # noqa: E402
from llvm_jax.models.config import ATTENTION_IMPLEMENTATIONS  # noqa: E402

TECHNIQUES = ("baseline", "trol", "phantom", "deepstack", "pmod", "all_four")
DEFAULT_ATTENTION = {"gpu": "cudnn", "tpu": "splash"}


def run(args, command: str) -> list[dict]:
  """Times each technique; rewrites the table after each, so an interrupted run keeps what it measured."""
  results = []
  for technique in args.techniques.split(","):
    config = bench_1b.get_config(
        f"technique={technique},batch={args.batch},seq_len={args.seq_len},remat={args.remat},size={args.size},"
        f"attention={args.attention},scan={args.scan}"
    )
    try:
      result = time_jax(config, args.steps)
    except Exception as e:  # noqa: BLE001 - recorded in the table; the other variants still run
      traceback.print_exc()
      result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    result["technique"] = technique
    results.append(result)
    print(json.dumps(result), flush=True)
    write(results, args, command)
    gc.collect()
  return results


def write(results: list[dict], args, command: str) -> None:
  with open(args.out, "w") as f:
    f.write(markdown(results, args, command))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


def markdown(results: list[dict], args, command: str) -> str:
  base = next((r for r in results if r["technique"] == "baseline" and "error" not in r), None)
  ok = next((r for r in results if "error" not in r), {})
  image_size = bench_1b.get_config(f"size={args.size}").model.vision.image_size
  lines = [
      f"# Train-step speed per technique, {args.size} model, one {ok.get('device', jax.devices()[0].device_kind)}",
      "",
      f"Measured {datetime.date.today().isoformat()} with jax {jax.__version__} ({jax.default_backend()}), "
      f"{jax.device_count()} device(s); batch {args.batch} x {args.seq_len} tokens, one {image_size} px image per row "
      f"(plus 4 crops with DeepStack), bf16 compute, fp32 master weights and AdamW, remat={args.remat}, "
      f"attention_impl={args.attention}, scan_layers={args.scan}, threefry_kernel={args.threefry_kernel}; "
      f"median of {args.steps} steps after 3 warm-up steps.",
      "",
      "Produced by:",
      "",
      f"    {command}",
      "",
      "| technique | params | step time (ms) | tokens/s | TFLOP/s | MFU | init (s) | step compile (s) | step memory (GiB) "
      "| step time / baseline | loss, first -> last step |",
      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for r in results:
    if "error" in r:
      lines.append(f"| {r['technique']} | failed: {r['error']} |||||||||| ")
      continue
    ratio = f"{r['step_time_s'] / base['step_time_s']:.2f}" if base else "-"
    mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
    memory = f"{r['step_memory_gib']:.1f}" if "step_memory_gib" in r else "-"
    lines.append(
        f"| {r['technique']} | {r['params'] / 1e6:.1f}M | {r['step_time_s'] * 1e3:.1f} | {r['tokens_per_second']:.0f} | "
        f"{r['tflops_per_device']:.1f} | {mfu} | {r['init_s']:.0f} | {r['compile_s']:.0f} | {memory} | {ratio} | "
        f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
    )
  lines += [
      "",
      "TFLOP/s and MFU count the model's analytic training FLOPs (6 x matmul params x tokens plus "
      "attention), with TroL's second pass, Phantom's extra attention, DeepStack's four crops through "
      "the ViT and p-MoD's skipped vision tokens, against the chip's dense bf16 peak. Tokens/s counts "
      "every row position (text and image) per second. Every step trains on the same synthetic batch, so "
      "the loss must fall from the first to the last step.",
      "",
  ]
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--techniques", default=",".join(TECHNIQUES))
  parser.add_argument("--size", default="1b", choices=("1b", "tiny"))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=1024)
  parser.add_argument("--remat", default="full")
  parser.add_argument(
      "--attention",
      default=DEFAULT_ATTENTION.get(jax.default_backend(), "blocked"),
      choices=ATTENTION_IMPLEMENTATIONS,
      help="attention_impl; default: the backend's fused kernel (cudnn on GPU, splash on TPU), else blocked.",
  )
  parser.add_argument("--scan", default="true", choices=("true", "false"), help="scan_layers")
  parser.add_argument(
      "--threefry_kernel",
      default="true",
      choices=("true", "false"),
      help="jax_threefry_gpu_kernel_lowering (GPU only): the random init's threefry as one CUDA kernel per call "
      "instead of XLA's unrolled rounds (the same bits). The 1B param init compiled for >200 s on an H200 "
      "without it (19 s on a 2-core CPU; its 64K HLO instructions hold ~110 threefry bodies); "
      "false: A/B against XLA's lowering.",
  )
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results", "gpu.md"))
  parser.add_argument("--json", default="", help="Also write the raw results here.")
  args = parser.parse_args()
  jax.config.update("jax_threefry_gpu_kernel_lowering", args.threefry_kernel == "true")
  command = ("python experiments/gpu_bench.py " + " ".join(sys.argv[1:])).strip()
  results = run(args, command)
  print(markdown(results, args, command))


if __name__ == "__main__":
  main()
