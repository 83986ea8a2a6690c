"""What a configuration costs, every technique included: parameters, FLOPs, KV cache, decode speed.

FLOPs come from `llvm_jax.flops` (the one module that counts them: 2 FLOPs per multiply-add, causal
attention at one half, a training step = 3 x forward, each technique's extra work included).
KV-cache bytes are exact: the leaves of `init_cache` for the prompt (technique entries included).

  python -m llvm_jax.cost --config=configs/paper.py:model=pmod_llava15_7b [--text_tokens=64]
  python -m llvm_jax.cost --config=configs/demo.py --measure_decode   # also times decoding here
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llvm_jax import config_utils, convert, flops, sampler
from llvm_jax.models.config import LLVMConfig
from llvm_jax.models.decoder import init_cache
from llvm_jax.models.llvm import LLVM
from llvm_jax.train.trainer import abstract_boxed_params
from llvm_jax.tree_utils import tree_bytes


def param_count(cfg: LLVMConfig) -> int:
  """Parameters of the model (abstract init: nothing is allocated). Counted on the scanned twin, which
  has the same parameters and traces one layer per stage instead of every layer (7x faster at 7B)."""
  scanned = dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, scan_layers=True))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract_boxed_params(LLVM(scanned)))))


def kv_cache_bytes(cfg: LLVMConfig, text_tokens: int, images: int = 1, new_tokens: int = 0) -> int:
  """Bytes of the KV cache of one sample after its prefill (+ `new_tokens` decode slots)."""
  n_vision = images * cfg.tokens_per_image if cfg.vision is not None else 0
  shapes = jax.eval_shape(lambda: init_cache(cfg.decoder, 1, text_tokens + n_vision + new_tokens, num_vision=n_vision))
  return tree_bytes(shapes)


def pmod_kv_bytes(cfg: LLVMConfig, seq_len: int, n_vision: int) -> dict[str, float]:
  """KV-cache bytes of one sample of `seq_len` tokens, `n_vision` of them vision tokens, after its
  prefill, with and without p-MoD (the whole `init_cache` pytree in the compute dtype)."""

  def cache_bytes(decoder, num_vision: int) -> int:
    return tree_bytes(jax.eval_shape(lambda: init_cache(decoder, 1, seq_len, num_vision=num_vision)))

  dense = cache_bytes(dataclasses.replace(cfg.decoder, pmod=None), 0)
  sparse = cache_bytes(cfg.decoder, n_vision)
  return {"kv_bytes_dense": dense, "kv_bytes_pmod": sparse, "kv_ratio": sparse / dense}


def report(cfg: LLVMConfig, text_tokens: int = 64, images: int = 1, train_tokens: int | None = None) -> dict[str, Any]:
  """Parameters, training FLOPs per sample, prefill FLOPs and KV-cache bytes of one sample."""
  prefill = flops.prefill_flops(cfg, text_tokens, images)
  n_vision = flops.vision_tokens(cfg, images)
  train_seq = (train_tokens if train_tokens is not None else text_tokens) + n_vision
  return {
      "params": param_count(cfg),
      "context_tokens": text_tokens + n_vision,
      "prefill_flops": prefill["total"],
      "prefill_flops_parts": prefill,
      "train_flops_per_sample": flops.train_flops_per_sample(cfg, train_seq, images),
      "kv_cache_bytes": kv_cache_bytes(cfg, text_tokens, images),
  }


def measure_decode(
    cfg: LLVMConfig, batch: int = 8, text_tokens: int = 32, new_tokens: int = 32, seed: int = 0
) -> dict[str, float]:
  """Decode tokens/s of the sampler on this backend (random weights; greedy; EOS never hit)."""
  model = LLVM(cfg)
  params = convert.init_params(model, jax.random.key(seed))
  rng = np.random.RandomState(seed)
  n = cfg.tokens_per_image if cfg.vision is not None else 0
  prompts = [
      [1] + [cfg.image_token_id] * n + rng.randint(5, cfg.decoder.vocab_size, text_tokens - 1).tolist()
      for _ in range(batch)
  ]
  inputs = sampler.pad_prompts(prompts)
  if n:
    size = cfg.vision.image_size
    inputs["images"] = rng.uniform(-1, 1, (batch, 1, size, size, 3)).astype(np.float32)
    inputs["image_mask"] = np.ones((batch, 1), bool)
    if cfg.deepstack is not None:
      inputs["hires_images"] = rng.uniform(-1, 1, (batch, 1, cfg.deepstack.num_groups, size, size, 3)).astype(
          np.float32
      )

  def timed(tokens: int) -> float:
    out = sampler.sample(model, params, inputs, sampler.SamplingConfig(max_new_tokens=tokens))
    jax.block_until_ready(out.tokens)  # compile
    start = time.perf_counter()
    jax.block_until_ready(sampler.sample(model, params, inputs, sampler.SamplingConfig(max_new_tokens=tokens)).tokens)
    return time.perf_counter() - start

  # Prefill + N steps minus prefill + 1 step: the decode loop alone.
  loop = timed(new_tokens) - timed(1)
  return {
      "decode_tokens_per_second": batch * (new_tokens - 1) / max(loop, 1e-9),
      "batch": batch,
      "backend": jax.default_backend(),
  }


def _scaled(value: float, base: int, prefixes: tuple[str, ...]) -> str:
  """`value` with the largest prefix that keeps it >= 1: _scaled(2.5e9, 1000, ...) -> '2.50 G'."""
  i = 0
  while i + 1 < len(prefixes) and abs(value) >= base ** (i + 1):
    i += 1
  return f"{value / base**i:.3g} {prefixes[i]}" if i else f"{value:,.0f} "


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  cfg = config_utils.model_config(f.config)
  result = report(cfg, f.text_tokens, f.images)
  print(
      f"{cfg.decoder.family} LLM, {cfg.vision.kind if cfg.vision else 'no'} vision; techniques: "
      + ", ".join(name for name in ("trol", "phantom", "pmod") if getattr(cfg.decoder, name) is not None)
      + (", deepstack" if cfg.deepstack is not None else "")
  )
  print(f"  parameters             {result['params']:,}")
  print(f"  context tokens         {result['context_tokens']}")
  print(f"  prefill FLOPs/sample   {_scaled(result['prefill_flops'], 1000, ('', 'k', 'M', 'G', 'T', 'P'))}FLOPs")
  print(
      f"  train FLOPs/sample     {_scaled(result['train_flops_per_sample'], 1000, ('', 'k', 'M', 'G', 'T', 'P'))}FLOPs"
  )
  # The cache holds K/V in the decoder's compute dtype.
  print(
      f"  KV cache/sample        {_scaled(result['kv_cache_bytes'], 1024, ('', 'Ki', 'Mi', 'Gi', 'Ti'))}B "
      f"({cfg.decoder.dtype} K/V, {result['context_tokens']} tokens)"
  )
  if f.measure_decode:
    decode = measure_decode(cfg)
    print(
        f"  decode                 {decode['decode_tokens_per_second']:.1f} tokens/s (batch {decode['batch']}, {decode['backend']})"
    )


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:arg]).")
  flags.DEFINE_integer("text_tokens", 64, "Text tokens of the sample (besides the image tokens).")
  flags.DEFINE_integer("images", 1, "Images (tiles) per sample.")
  flags.DEFINE_bool("measure_decode", False, "Also time decoding with random weights on this backend.")
  app.run(main)
