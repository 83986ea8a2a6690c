"""The decoder's matmuls at a config's training shape, XLA against PyTorch, in one run: what bounds the
train step on CPU once attention is fused.

    python -m llvm_jax.bench.matmul_bench --config=configs/demo.py [--steps=100]

Each projection of a decoder layer (q, k, v, o, gate, up, down) and the LM head, over the step's
batch x seq_len tokens, as the three matmuls of its forward and backward pass: y = x W, the input's
gradient dy W^T and the weight's gradient x^T dy. Each matmul is called `--steps` times in a row (its
operands stay in cache, as in a step that has just made them) and timed by its median wall time per
call: the jax side jitted, as the train step runs it (under the config's dense_impl 'cpu', the weight
gradient by the C++ kernel of models/cpu_kernels.cc), then PyTorch eager (its OpenMP threads spin after
each op and would slow what runs between). A jitted call also pays one dispatch, which a step pays once
for all its ops: the 'dispatch floor' (a jitted no-op) is printed, and taken off the jax side's per-step
total, which multiplies each matmul by its count in a train step.

The bench's `--breakdown` cannot show this: its profiler trace charges some of XLA:CPU's dots less time
than they take (the weight gradients at more FLOP/s than this 2-core machine's peak), so it undercounts
them; this bench times them by the wall clock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from llvm_jax import config_utils, host
from llvm_jax.bench.common import time_interleaved
from llvm_jax.models import cpu_kernels
from llvm_jax.models.config import DecoderConfig

# A dense layer's matmuls: forward, input gradient, weight gradient.
PASSES = ("x W", "dy W^T", "x^T dy")


def projections(decoder: DecoderConfig) -> dict[str, tuple[int, int, int]]:
  """Name -> (fan in, fan out, times per step) of the decoder's dense layers."""
  layers = decoder.num_layers
  q_width, kv_width = decoder.num_heads * decoder.head_dim, decoder.num_kv_heads * decoder.head_dim
  return {
      "q": (decoder.embed_dim, q_width, layers),
      "k, v": (decoder.embed_dim, kv_width, 2 * layers),
      "o": (q_width, decoder.embed_dim, layers),
      "gate, up": (decoder.embed_dim, decoder.mlp_dim, 2 * layers),
      "down": (decoder.mlp_dim, decoder.embed_dim, layers),
      "lm_head": (decoder.embed_dim, decoder.vocab_size, 1),
  }


def matmul_dims(tokens: int, fan_in: int, fan_out: int, which: str) -> tuple[int, int, int]:
  """(M, K, N) of one pass of a (fan_in -> fan_out) dense layer over `tokens` rows."""
  return {"x W": (tokens, fan_in, fan_out), "dy W^T": (tokens, fan_out, fan_in), "x^T dy": (fan_in, tokens, fan_out)}[
      which
  ]


def operands(m: int, k: int, n: int, which: str, rng: np.random.RandomState) -> tuple[Any, Any]:
  """Random float32 operands of an (M, K) x (K, N) pass, laid out as the pass reads them."""
  a, b = {"x W": ((m, k), (k, n)), "dy W^T": ((m, k), (n, k)), "x^T dy": ((k, m), (k, n))}[which]
  return rng.randn(*a).astype(np.float32), rng.randn(*b).astype(np.float32)


def product(which: str, a, b):
  """The pass's matmul; the transposes are of views, as in a backward pass (no copy asked for)."""
  if which == "x W":
    return a @ b
  return a @ b.T if which == "dy W^T" else a.T @ b


def jax_thunk(which: str, a: np.ndarray, b: np.ndarray, dense_impl: str = "xla") -> Callable[[], Any]:
  """The pass as the train step runs it: with dense_impl 'cpu', the weight gradient by the C++ kernel."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  if which == "x^T dy" and dense_impl == "cpu":
    fn = cpu_kernels.dense_weight_gradient  # a is x (tokens, fan in), b is dy (tokens, fan out)
  else:
    fn = lambda a, b: product(which, a, b)
  compiled = jax.jit(fn).lower(a, b).compile()
  return lambda: jax.block_until_ready(compiled(a, b))


def torch_thunk(which: str, a: np.ndarray, b: np.ndarray) -> Callable[[], Any]:
  import torch  # only when the bench runs

  a, b = torch.from_numpy(a), torch.from_numpy(b)
  return lambda: product(which, a, b)


def dispatch_floor() -> Callable[[], Any]:
  """A jitted program that does almost nothing: its time is the per-call cost in the jax timings."""
  x = jnp.zeros((), jnp.float32)
  noop = jax.jit(lambda x: x + 1).lower(x).compile()
  return lambda: jax.block_until_ready(noop(x))


def time_each(thunks: dict[Any, Callable[[], Any]], steps: int) -> dict[Any, float]:
  """Median ms per call of each thunk, called `steps` times in a row after one warm-up."""
  return {key: time_interleaved({key: thunk}, steps)[key] for key, thunk in thunks.items()}


def main(argv) -> None:
  del argv
  host.tune_host_process()
  config, steps = flags.FLAGS.config, flags.FLAGS.steps
  decoder = config_utils.model_config(config).decoder
  tokens = config.data.global_batch_size * config.data.seq_len
  rng = np.random.RandomState(0)
  cases = {
      (name, which): (count, matmul_dims(tokens, fan_in, fan_out, which))
      for name, (fan_in, fan_out, count) in projections(decoder).items()
      for which in PASSES
  }
  inputs = {key: operands(*mkn, key[1], rng) for key, (_, mkn) in cases.items()}
  jax_times = time_each({key: jax_thunk(key[1], *ab, decoder.dense_impl) for key, ab in inputs.items()}, steps)
  floor = time_each({"noop": dispatch_floor()}, steps)["noop"]
  torch_times = time_each({key: torch_thunk(key[1], *ab) for key, ab in inputs.items()}, steps)
  print(
      f"decoder matmuls over {tokens} tokens, float32, on {jax.devices()[0].device_kind}, dense_impl "
      f"{decoder.dense_impl!r} (ms per call):"
  )
  print(
      f"  {'projection':10s} {'M x K x N':>16s} {'pass':8s} {'per step':>8s} {'jax':>8s} {'torch':>8s} {'torch/jax':>9s}"
  )
  for (name, which), (count, mkn) in cases.items():
    ratio = torch_times[name, which] / jax_times[name, which]
    times = f"{jax_times[name, which]:8.3f} {torch_times[name, which]:8.3f} {ratio:9.2f}"
    print(f"  {name:10s} {'x'.join(map(str, mkn)):>16s} {which:8s} {count:8d} {times}")
  print(f"  jax dispatch floor (a jitted no-op): {floor:.3f} ms per call")
  jax_step = sum(count * (jax_times[key] - floor) for key, (count, _) in cases.items())
  torch_step = sum(count * torch_times[key] for key, (count, _) in cases.items())
  print(
      f"per train step ({decoder.num_layers} layers, count x time): jax {jax_step:.2f} ms (less the dispatch "
      f"floor), torch {torch_step:.2f} ms, torch / jax = {torch_step / jax_step:.2f}"
  )


if __name__ == "__main__":
  # Defined here, not on import: the tests import this module next to the CLIs that define --config.
  config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.", lock_config=True)
  flags.DEFINE_integer("steps", 100, "Timed calls per matmul and side (after one warm-up).")
  app.run(main)
