"""TroL cost on the tiny decoder: step time and FLOPs of TroL against the base model, in one run.

    python -m llvm_jax.bench.trol_bench [--seq_len=128 --batch=4 --steps=20 --embed_dim=64 --num_layers=2]

Per variant: the median wall time of a jitted forward+backward step (synthetic tokens), FLOPs of
that step and of one decode step at context seq_len from XLA's `compile().cost_analysis()`, the
measured TroL/base ratios, and the analytic ratio of `flops.trol_overhead` (counting all keys, as
XLA's dense masked attention does; the MFU-style causal-½ ratio is printed beside it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

from llvm_jax import config_utils, flops, host
from llvm_jax.bench.common import time_interleaved, xla_flops
from llvm_jax.models.config import DecoderConfig, TrolConfig
from llvm_jax.models.decoder import Decoder, init_cache

_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per row.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per step.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant (after one warm-up).")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", 64, "Decoder width of the tiny config.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 2, "Decoder depth of the tiny config.")


class _LM(nn.Module):
  config: DecoderConfig

  def setup(self):
    self.decoder = Decoder(self.config)

  def __call__(self, tokens, cache=None, decode=False):
    return self.decoder(self.decoder.embed(tokens), jnp.ones(tokens.shape, jnp.int32), None, cache, decode)


def compile_variant(config: DecoderConfig, tokens: jax.Array) -> tuple[Callable[[], Any], dict[str, float]]:
  """A thunk running one jitted forward+backward step, and the XLA FLOPs of that step and of one
  decode step at context seq_len."""
  model = _LM(config)
  params = model.init(jax.random.key(0), tokens[:, :8])["params"]

  def loss(p, t):
    logits = model.apply({"params": p}, t[:, :-1])[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], axis=-1))

  train_step = jax.jit(jax.value_and_grad(loss)).lower(params, tokens).compile()
  seq = tokens.shape[1] - 1
  cache = init_cache(config, tokens.shape[0], seq + 1)
  cache["end"] = jnp.asarray(seq, jnp.int32)
  decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, c, decode=True)).lower(params, tokens[:, :1], cache)
  counted = {"train_flops": xla_flops(train_step), "decode_flops": xla_flops(decode.compile())}
  return lambda: jax.block_until_ready(train_step(params, tokens)), counted


def main(argv):
  del argv
  host.tune_host_process()
  base = dataclasses.replace(
      config_utils.tiny_llvm(embed_dim=_EMBED_DIM.value, num_layers=_NUM_LAYERS.value).decoder,
      max_position_embeddings=max(512, _SEQ_LEN.value + 1),
  )
  lowest_half = tuple(range(max(1, base.num_layers // 2)))
  variants = {
      "base": base,
      "trol (all layers, full decode)": dataclasses.replace(base, trol=TrolConfig()),
      "trol (all layers, official decode)": dataclasses.replace(base, trol=TrolConfig(decode_traversal="official")),
      f"trol (layers {lowest_half}, full decode)": dataclasses.replace(base, trol=TrolConfig(layers=lowest_half)),
  }
  tokens = jax.random.randint(jax.random.key(1), (_BATCH.value, _SEQ_LEN.value + 1), 0, base.vocab_size)
  print(
      f"device: {jax.devices()[0].device_kind}; decoder D={base.embed_dim} L={base.num_layers} "
      f"V={base.vocab_size}; batch {_BATCH.value} x seq {_SEQ_LEN.value}"
  )
  compiled = {name: compile_variant(cfg, tokens) for name, cfg in variants.items()}
  step_ms = time_interleaved({name: thunk for name, (thunk, _) in compiled.items()}, _STEPS.value)
  results = {name: dict(counted, step_ms=step_ms[name]) for name, (_, counted) in compiled.items()}
  ref = results["base"]
  header = (
      f"{'variant':40s} {'step ms':>8s} {'time x':>7s} {'train GFLOP':>11s} {'FLOP x':>7s} "
      f"{'analytic x':>10s} {'causal x':>8s} {'decode x':>8s} {'analytic':>8s} {'+params':>7s}"
  )
  print(header)
  for name, cfg in variants.items():
    r = results[name]
    row = f"{name:40s} {r['step_ms']:8.2f} {r['step_ms'] / ref['step_ms']:7.3f} {r['train_flops'] / 1e9:11.4f} "
    row += f"{r['train_flops'] / ref['train_flops']:7.3f} "
    if cfg.trol is None:
      row += f"{1:10.3f} {1:8.3f} {r['decode_flops'] / ref['decode_flops']:8.3f} {1:8.3f} {0:7d}"
    else:
      dense = flops.trol_overhead(cfg, _SEQ_LEN.value, causal=False)
      causal = flops.trol_overhead(cfg, _SEQ_LEN.value)
      decode_ratio = 1 + dense["decode_added_flops_per_token"] / dense["decode_base_flops_per_token"]
      row += f"{dense['flops_ratio']:10.3f} {causal['flops_ratio']:8.3f} "
      row += f"{r['decode_flops'] / ref['decode_flops']:8.3f} {decode_ratio:8.3f} {dense['added_params']:7d}"
    print(row)


if __name__ == "__main__":
  app.run(main)
