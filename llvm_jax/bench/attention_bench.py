"""One decoder attention call, forward + backward, at a config's training shape: llvm_jax's CPU-capable
implementations against PyTorch's scaled_dot_product_attention, in one run.

    python -m llvm_jax.bench.attention_bench --config=configs/demo.py [--steps=50] [--torch=false]

The shape is the config's (global batch, seq_len, heads, KV heads, head_dim), causal over one segment
per row, float32. Each variant is timed as the gradient of sum(out * w) with respect to q, k and v, the
jax variants interleaved (`common.time_interleaved`), then PyTorch alone (its OpenMP threads spin after
each op and would slow what runs between); the last column multiplies by the decoder's depth.
PyTorch's CPU SDPA is a fused flash kernel; XLA:CPU runs the einsum path as separate matmul, mask,
softmax and transpose kernels over the (B, H, T, S) logits; 'cpu_flash' is llvm_jax's own fused C++
kernel (models/cpu_kernels.cc).
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
from llvm_jax.models import attention, masks

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 50, "Timed calls per variant (after one warm-up).")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch's scaled_dot_product_attention.")
CPU_IMPLEMENTATIONS = ("xla", "blocked", "cpu_flash")


def attention_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int) -> dict[str, np.ndarray]:
  rng = np.random.RandomState(0)
  return {
      "q": rng.randn(batch, seq, heads, head_dim).astype(np.float32),
      "k": rng.randn(batch, seq, kv_heads, head_dim).astype(np.float32),
      "v": rng.randn(batch, seq, kv_heads, head_dim).astype(np.float32),
      "w": rng.randn(batch, seq, heads, head_dim).astype(np.float32),
  }


def jax_thunk(impl: str, inputs: dict[str, np.ndarray], block: int) -> Callable[[], Any]:
  q, k, v, w = (jnp.asarray(inputs[n]) for n in ("q", "k", "v", "w"))
  b, t = q.shape[:2]
  ones, positions = jnp.ones((b, t), jnp.int32), jnp.tile(jnp.arange(t, dtype=jnp.int32), (b, 1))
  mask = masks.MaskInfo(ones, positions, positions, ones, positions, positions)
  scale = q.shape[-1] ** -0.5

  def loss(q, k, v):
    out = attention.dot_product_attention(q, k, v, mask, scale, impl, block_q=block, block_kv=block)
    return jnp.sum(out * w)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
  return lambda: jax.block_until_ready(grad(q, k, v))


def torch_thunk(inputs: dict[str, np.ndarray]) -> Callable[[], Any]:
  import torch  # only when the comparison runs

  q, k, v = (torch.tensor(inputs[n]).transpose(1, 2).contiguous().requires_grad_() for n in ("q", "k", "v"))
  w = torch.tensor(inputs["w"]).transpose(1, 2).contiguous()

  def step():
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.autograd.grad((out * w).sum(), (q, k, v))

  return step


def main(argv) -> None:
  del argv
  host.tune_host_process()
  config = _CONFIG.value
  decoder = config_utils.model_config(config).decoder
  batch, seq = config.data.global_batch_size, config.data.seq_len
  inputs = attention_inputs(batch, seq, decoder.num_heads, decoder.num_kv_heads, decoder.head_dim)
  thunks = {f"llvm_jax {impl}": jax_thunk(impl, inputs, decoder.attention_block_size) for impl in CPU_IMPLEMENTATIONS}
  times = time_interleaved(thunks, _STEPS.value)
  if _TORCH.value:
    times.update(time_interleaved({"torch sdpa": torch_thunk(inputs)}, _STEPS.value))
  print(
      f"attention forward + backward, batch {batch} x {seq} tokens, {decoder.num_heads} heads "
      f"({decoder.num_kv_heads} KV), head_dim {decoder.head_dim}, causal, float32, on {jax.devices()[0].device_kind}:"
  )
  for name, ms in times.items():
    print(f"  {name:18s} {ms:7.2f} ms per call   x {decoder.num_layers} layers = {ms * decoder.num_layers:7.2f} ms")


if __name__ == "__main__":
  app.run(main)
