"""Input-pipeline throughput on the synthetic set: examples/s with 0, 1, 2 grain workers.

    python -m llvm_jax.bench.data_bench [--data_dir DIR] [--num_train 2048] [--image_size 64]
        [--vision clip] [--seq_len 128] [--batch 32] [--batches 40] [--workers 0,1,2] [--packing]

Builds a synthetic_vqa config and the tiny tokenizer into DIR (a temporary directory by
default), then for each worker count times `--batches` batches after one warm-up batch (the
warm-up, which includes starting the worker processes, is reported separately as startup).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from llvm_jax.data import builders, config, pipeline, tokenizer


def run(args) -> list[dict]:
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="llvm_data_bench_")
  name = f"bench_{args.num_train}_{args.image_size}"
  cfg_b = builders.SyntheticVqaConfig(
      name=name, num_train=args.num_train, num_validation=16, num_test=16, image_size=args.image_size
  )
  t0 = time.perf_counter()
  builders.build_dataset("synthetic_vqa", data_dir, cfg_b)
  build_s = time.perf_counter() - t0
  tok_dir = tokenizer.build_tiny_tokenizer(os.path.join(data_dir, "tiny_tokenizer"))
  tok = tokenizer.load_tokenizer(tok_dir)

  results = []
  for workers in args.workers:
    cfg = config.default_data_config()
    cfg.name = f"synthetic_vqa/{name}"
    cfg.data_dir = data_dir
    cfg.vision = args.vision
    cfg.image_size = args.image_size
    cfg.max_images = 4 if args.vision == "internvl" else (4 if args.packing else 1)
    cfg.max_tiles = 2
    cfg.seq_len = args.seq_len
    cfg.global_batch_size = args.batch
    cfg.num_workers = workers
    cfg.packing = args.packing
    it = pipeline.make_iterator(cfg, tok, num_image_tokens=args.num_image_tokens, image_token="<image>")
    t0 = time.perf_counter()
    next(it)
    startup = time.perf_counter() - t0
    before = it.stats["examples"]
    t0 = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    dt = time.perf_counter() - t0
    n = it.stats["examples"] - before
    it.close()
    res = {
        "workers": workers,
        "examples_per_s": round(n / dt, 1),
        "batches_per_s": round(args.batches / dt, 2),
        "startup_s": round(startup, 2),
        "examples": n,
    }
    results.append(res)
    print(json.dumps(res), flush=True)
  print(f"(dataset build: {build_s:.2f}s for {args.num_train + 32} examples; cpus={os.cpu_count()})")
  return results


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default="")
  p.add_argument("--num_train", type=int, default=2048)
  p.add_argument("--image_size", type=int, default=64)
  p.add_argument("--vision", default="clip", choices=["clip", "siglip", "internvl"])
  p.add_argument("--num_image_tokens", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=40)
  p.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
  p.add_argument("--packing", action="store_true")
  run(p.parse_args(argv))


if __name__ == "__main__":
  main()
