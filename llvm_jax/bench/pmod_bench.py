"""p-MoD savings: measured on a tiny vision-heavy decoder, and counted at the LLaVA-1.5-7B shape.

    python -m llvm_jax.bench.pmod_bench [--num_vision=256 --num_text=64 --batch=4 --steps=10 \
        --embed_dim=256 --num_layers=4]
    python -m llvm_jax.bench.pmod_bench --report [--report_seq_len=640]

Default: the median wall time of a jitted train step (forward+backward) and of a jitted prefill (a
forward writing a fresh KV cache), with and without p-MoD (default PRD schedule) on the same config
and inputs, timed interleaved in one run; their ratios; XLA `cost_analysis` FLOPs of both steps; the
KV-cache bytes; and the analytic ratios of `flops.pmod_cost` (KV bytes: `cost.pmod_kv_bytes`).
--report: `flops.pmod_cost` of LLaVA-1.5-7B (configs/llava.py: llava_7b, bf16) with the default
schedule on a sample of 576 vision tokens, next to the paper's 55.6% TFLOPs and 53.8% KV cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from configs.llava import llava_7b
from llvm_jax import config_utils, flops, host
from llvm_jax import cost as cost_lib
from llvm_jax.bench.common import time_interleaved, xla_flops
from llvm_jax.models import pmod
from llvm_jax.models.config import DecoderConfig, LLVMConfig, PmodConfig
from llvm_jax.models.decoder import Decoder, init_cache
from llvm_jax.tree_utils import tree_bytes

_REPORT = flags.DEFINE_bool("report", False, "Print the analytic LLaVA-1.5-7B cost report only.")
_REPORT_SEQ_LEN = flags.DEFINE_integer("report_seq_len", 640, "Tokens of the --report sample (576 are vision).")
_NUM_VISION = flags.DEFINE_integer("num_vision", 256, "Vision tokens per row (one image).")
_NUM_TEXT = flags.DEFINE_integer("num_text", 64, "Text tokens per row (half before the image, half after).")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant (after one warm-up).")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", 256, "Decoder width of the tiny config.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Decoder depth of the tiny config.")

# p-MoD-LLaVA-1.5-7B against LLaVA-1.5-7B at inference (paper).
PAPER_FLOPS_RATIO = 0.556
PAPER_KV_RATIO = 0.538
LLAVA_VISION_TOKENS = 576


class _LM(nn.Module):
  """The decoder on token ids; `image_token` ids are the vision tokens p-MoD routes."""

  config: DecoderConfig
  image_token: int
  num_vision: int

  def setup(self):
    self.decoder = Decoder(self.config)

  def __call__(self, tokens, cache=None):
    return self.decoder(
        self.decoder.embed(tokens),
        jnp.ones(tokens.shape, jnp.int32),
        None,
        cache,
        vision_mask=tokens == self.image_token,
        num_vision=self.num_vision,
    )


def compile_variant(
    config: DecoderConfig, tokens: jax.Array, image_token: int, num_vision: int
) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
  """Thunks running the jitted train step and prefill; their XLA FLOPs and the prefilled cache bytes."""
  model = _LM(config, image_token, num_vision)
  params = model.init(jax.random.key(0), tokens)["params"]

  def loss(p):
    logits = model.apply({"params": p}, tokens)[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), tokens[:, 1:, None], axis=-1))

  train_step = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
  cache = init_cache(config, tokens.shape[0], tokens.shape[1], num_vision=num_vision)
  prefill = jax.jit(lambda p, c: model.apply({"params": p}, tokens, c)).lower(params, cache).compile()
  thunks = {
      "train": lambda: jax.block_until_ready(train_step(params)),
      "prefill": lambda: jax.block_until_ready(prefill(params, cache)),
  }
  return thunks, {
      "train_flops": xla_flops(train_step),
      "prefill_flops": xla_flops(prefill),
      "kv_bytes": tree_bytes(cache),
  }


def report(seq_len: int) -> None:
  base = llava_7b("llama")
  cfg = dataclasses.replace(base, decoder=dataclasses.replace(base.decoder, pmod=PmodConfig(), dtype="bfloat16"))
  n = LLAVA_VISION_TOKENS
  cost = {**flops.pmod_cost(cfg, seq_len, n), **cost_lib.pmod_kv_bytes(cfg, seq_len, n)}
  kept = cost["kept_tokens_per_layer"]
  print(
      f"LLaVA-1.5-7B, default p-MoD (shiftedcos_decay_0.85_0.15, r̄=0.5, tanh_0.2_1): one sample of {seq_len} "
      f"tokens, {LLAVA_VISION_TOKENS} of them vision; {cost['mod_layers']} MoD layers ({min(pmod.layer_ratios(cfg.decoder))}.."
      f"{max(pmod.layer_ratios(cfg.decoder))}); tokens per layer: {kept}"
  )
  print(f"{'':32s} {'dense':>12s} {'p-MoD':>12s} {'ratio':>7s} {'paper':>7s}")
  rows = [
      (
          "decoder TFLOPs (prefill)",
          cost["decoder_flops_dense"] / 1e12,
          cost["decoder_flops_pmod"] / 1e12,
          cost["decoder_flops_ratio"],
          PAPER_FLOPS_RATIO,
      ),
      (
          "model TFLOPs (+ ViT, projector)",
          cost["flops_dense"] / 1e12,
          cost["flops_pmod"] / 1e12,
          cost["flops_ratio"],
          PAPER_FLOPS_RATIO,
      ),
      (
          "KV cache MiB (bf16)",
          cost["kv_bytes_dense"] / 2**20,
          cost["kv_bytes_pmod"] / 2**20,
          cost["kv_ratio"],
          PAPER_KV_RATIO,
      ),
      ("KV cache of the vision tokens", 1.0, cost["vision_kv_ratio"], cost["vision_kv_ratio"], PAPER_KV_RATIO),
  ]
  for name, dense, sparse, ratio, paper in rows:
    print(f"{name:32s} {dense:12.3f} {sparse:12.3f} {ratio:7.1%} {paper:7.1%}")


def main(argv):
  del argv
  host.tune_host_process()
  if _REPORT.value:
    report(_REPORT_SEQ_LEN.value)
    return
  num_vision, num_text = _NUM_VISION.value, _NUM_TEXT.value
  seq_len = num_vision + num_text
  base = dataclasses.replace(
      config_utils.tiny_llvm(embed_dim=_EMBED_DIM.value, num_layers=_NUM_LAYERS.value).decoder,
      max_position_embeddings=max(512, seq_len),
  )
  sparse = dataclasses.replace(base, pmod=PmodConfig())
  image_token = base.vocab_size - 1
  text = jax.random.randint(jax.random.key(1), (_BATCH.value, num_text), 0, image_token)
  before = num_text // 2
  tokens = jnp.concatenate(
      [text[:, :before], jnp.full((_BATCH.value, num_vision), image_token, text.dtype), text[:, before:]], axis=1
  )
  print(
      f"device: {jax.devices()[0].device_kind}; decoder D={base.embed_dim} L={base.num_layers} "
      f"V={base.vocab_size}; batch {_BATCH.value} x seq {seq_len} ({num_vision} vision tokens per row); "
      f"MoD layers and ratios {pmod.layer_ratios(sparse)}"
  )
  compiled = {
      name: compile_variant(cfg, tokens, image_token, num_vision) for name, cfg in (("dense", base), ("p-MoD", sparse))
  }
  thunks = {f"{variant} {step}": run for variant, (runs, _) in compiled.items() for step, run in runs.items()}
  ms = time_interleaved(thunks, _STEPS.value)
  llvm = LLVMConfig(decoder=sparse, vision=None)
  cost = {**flops.pmod_cost(llvm, seq_len, num_vision), **cost_lib.pmod_kv_bytes(llvm, seq_len, num_vision)}
  dense, mod = compiled["dense"][1], compiled["p-MoD"][1]
  print(f"{'':22s} {'dense':>10s} {'p-MoD':>10s} {'ratio':>7s} {'analytic':>8s}")
  rows = [
      ("train step ms", ms["dense train"], ms["p-MoD train"], cost["decoder_flops_ratio"]),
      ("prefill ms", ms["dense prefill"], ms["p-MoD prefill"], cost["decoder_flops_ratio"]),
      ("train step GFLOP (XLA)", dense["train_flops"] / 1e9, mod["train_flops"] / 1e9, cost["decoder_flops_ratio"]),
      ("prefill GFLOP (XLA)", dense["prefill_flops"] / 1e9, mod["prefill_flops"] / 1e9, cost["decoder_flops_ratio"]),
      ("KV cache KiB", dense["kv_bytes"] / 2**10, mod["kv_bytes"] / 2**10, cost["kv_ratio"]),
  ]
  for name, a, b, analytic in rows:
    print(f"{name:22s} {a:10.3f} {b:10.3f} {b / a:7.3f} {analytic:8.3f}")


if __name__ == "__main__":
  app.run(main)
