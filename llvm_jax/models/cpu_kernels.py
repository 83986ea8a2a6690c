"""C++ kernels for XLA:CPU (`cpu_kernels.cc`), via jax.ffi: attention implementation 'cpu_flash', the
weight gradient of dense layers (dense_impl 'cpu'), and a copy that XLA cannot fuse away.

XLA:CPU has no fused attention: the einsum path materialises the (B, H, T, S) logits, probabilities
and their gradients, and spends about half of the demo's train step there. The FlashAttention kernel keeps one
(batch row, KV head) in cache per task, walks its queries with the factored `MaskInfo` (segments,
slots, sliding window: every mask the model builds), skips key blocks no query of a row can see,
and recomputes the probabilities in the backward pass from the saved log-sum-exp. Its tasks run on
XLA's intra-op thread pool.

A dense layer's weight gradient x^T dy contracts over the tokens; XLA:CPU runs that product on one thread
(a trivial stand-in for it shortened the demo's train step by a sixth). `dense_matmul` computes it with a kernel that splits the
tokens between the threads.

The library is compiled from the shipped source with the system C++ compiler (`$CXX`, else `c++`)
on first use, for the build machine's SIMD unit (-march=native), and cached under
`$LLVM_JAX_CACHE` (default `~/.cache/llvm_jax`), keyed by source, flags, compiler, jaxlib and CPU.
A leaf module: imports jax, numpy and `masks` only.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax.models import masks as masks_lib

Array = jax.Array

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
CXX_FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-w")
FORWARD_TARGET, BACKWARD_TARGET = "llvm_jax_cpu_flash_forward", "llvm_jax_cpu_flash_backward"
MATERIALIZE_TARGET = "llvm_jax_cpu_materialize"
DENSE_WEIGHT_GRAD_TARGET = "llvm_jax_cpu_dense_weight_grad"
MAX_HEAD_DIM = 256  # the widest feature vector the kernel is instantiated for (cpu_kernels.cc)


def cache_dir() -> Path:
  return Path(os.environ.get("LLVM_JAX_CACHE", Path.home() / ".cache" / "llvm_jax"))


def _cpu_signature() -> str:
  """What -march=native compiles for: the CPU's model and feature flags (a library built on one host
  must not be loaded on a host with fewer instructions, e.g. from a shared home directory)."""
  try:
    info = Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.machine() + platform.processor()
  lines = [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
  return platform.machine() + "".join(sorted(set(lines)))


def build() -> Path:
  """The compiled library (built now if the cache has no build of this source for this machine)."""
  compiler = os.environ.get("CXX", "c++")
  if shutil.which(compiler) is None:
    raise RuntimeError(
        f"the C++ kernels for XLA:CPU (attention_impl 'cpu_flash', dense_impl 'cpu') compile {SOURCE.name} on "
        f"first use, but the C++ compiler {compiler!r} is not on PATH: install one (e.g. g++) or set $CXX, or use "
        "attention_impl 'xla' (or 'blocked') and dense_impl 'xla'"
    )
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
  key = hashlib.sha256(
      b"\0".join(
          x.encode() if isinstance(x, str) else x
          for x in (SOURCE.read_bytes(), " ".join(CXX_FLAGS), version, jax.__version__, _cpu_signature())
      )
  ).hexdigest()[:16]
  library = cache_dir() / f"cpu_kernels-{key}.so"
  if library.exists():
    return library
  library.parent.mkdir(parents=True, exist_ok=True)
  partial = library.with_suffix(f".{os.getpid()}.tmp")  # concurrent builders each write their own, then rename
  command = [compiler, *CXX_FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", str(partial)]
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    partial.unlink(missing_ok=True)
    raise RuntimeError(
        f"the C++ kernels for XLA:CPU: building {SOURCE.name} failed ({' '.join(command)}):\n{result.stderr[-3000:]}"
    )
  os.replace(partial, library)
  return library


@functools.cache
def register() -> None:
  """Builds (or finds) the library and registers its FFI targets with XLA:CPU, once per process."""
  library = ctypes.cdll.LoadLibrary(str(build()))
  for target, symbol in (
      (FORWARD_TARGET, "LlvmJaxCpuAttentionForward"),
      (BACKWARD_TARGET, "LlvmJaxCpuAttentionBackward"),
      (MATERIALIZE_TARGET, "LlvmJaxCpuMaterialize"),
      (DENSE_WEIGHT_GRAD_TARGET, "LlvmJaxCpuDenseWeightGrad"),
  ):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")


@jax.custom_jvp
def materialized(x: Array) -> Array:
  """x, computed once into a buffer its consumers read. XLA:CPU fuses an elementwise producer into each
  consumer and recomputes it there (an optimization barrier is gone before fusion): RoPE's cos and sin
  were evaluated again in every layer's rotation of q and k, per head, forward and backward, 10% of the
  demo's train step. An FFI call (a copy) is never fused."""
  register()
  return jax.ffi.ffi_call(MATERIALIZE_TARGET, jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="broadcast_all")(x)


@materialized.defjvp
def _materialized_jvp(primals, tangents):
  return materialized(primals[0]), tangents[0]


def _check_cpu(what: str, instead: str) -> None:
  if jax.default_backend() != "cpu":
    raise ValueError(f"{what} is a kernel for XLA:CPU (backend is {jax.default_backend()!r}); {instead}")


@jax.custom_vjp
def dense_matmul(x: Array, w: Array) -> Array:
  """x (M, K) @ w (K, N) by XLA, with the weight gradient x^T dy computed by the C++ kernel (float32,
  cast back to w's dtype); the input gradient dy w^T stays XLA's.

  On a mesh of more than one device the product is left to XLA whole: its partitioner sums the per-shard
  weight gradients, which an FFI call cannot do.
  """
  return x @ w


def _dense_matmul_forward(x, w):
  return x @ w, (x, w)


def _dense_matmul_backward(residuals, dy):
  x, w = residuals
  mesh = jax.sharding.get_abstract_mesh()
  dw = x.T @ dy if not mesh.empty and mesh.size > 1 else dense_weight_gradient(x, dy)
  return (dy @ w.T).astype(x.dtype), dw.astype(w.dtype)


dense_matmul.defvjp(_dense_matmul_forward, _dense_matmul_backward)


def dense_weight_gradient(x: Array, dy: Array) -> Array:
  """x^T dy (K, N) of x (M, K) and dy (M, N) by the C++ kernel, in float32."""
  _check_cpu("dense_impl 'cpu'", "use dense_impl 'xla' there")
  register()
  shape = jax.ShapeDtypeStruct((x.shape[1], dy.shape[1]), jnp.float32)
  call = jax.ffi.ffi_call(DENSE_WEIGHT_GRAD_TARGET, shape, vmap_method="sequential")
  return call(x.astype(jnp.float32), dy.astype(jnp.float32))


def flash_attention(q: Array, k: Array, v: Array, mask: masks_lib.MaskInfo | None, scale: float) -> Array:
  """Attention of q (B, T, H, dq) over k (B, S, Hkv, dq), v (B, S, Hkv, dv) under `mask` (None: full).

  Computes in float32 and returns v's dtype. Rows with no visible key give 0 and pass no gradient.
  """
  _check_cpu("attention impl 'cpu_flash'", "use 'cudnn' or 'xla' on GPU, 'splash' or 'blocked' on TPU")
  if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
    raise ValueError(f"attention impl 'cpu_flash' handles head dims up to {MAX_HEAD_DIM}; got q {q.shape}, v {v.shape}")
  register()
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  if mask is None:  # full attention: one segment, every slot 0
    ones, zeros = (lambda n: jnp.ones((b, n), jnp.int32)), (lambda n: jnp.zeros((b, n), jnp.int32))
    mask = masks_lib.MaskInfo(ones(t), zeros(t), zeros(t), ones(s), zeros(s), zeros(s))
  vectors = tuple(
      a.astype(jnp.int32)
      for a in (
          mask.q_segment_ids,
          mask.q_slots,
          mask.q_positions,
          mask.kv_segment_ids,
          mask.kv_slots,
          mask.kv_positions,
      )
  )
  f32 = lambda x: x.astype(jnp.float32)
  out = _flash(f32(q), f32(k), f32(v), vectors, float(scale), mask.sliding_window or 0)
  return out.astype(v.dtype)


def _ffi_attrs(scale: float, window: int) -> dict:
  return dict(scale=np.float32(scale), window=np.int64(window))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q: Array, k: Array, v: Array, vectors: tuple[Array, ...], scale: float, window: int) -> Array:
  return _flash_forward(q, k, v, vectors, scale, window)[0]


def _flash_forward(q, k, v, vectors, scale, window):
  b, t, h, _ = q.shape
  out, lse = jax.ffi.ffi_call(
      FORWARD_TARGET,
      (jax.ShapeDtypeStruct((b, t, h, v.shape[-1]), jnp.float32), jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
      vmap_method="sequential",
  )(q, k, v, *vectors, **_ffi_attrs(scale, window))
  return out, (q, k, v, vectors, out, lse)


def _flash_backward(scale, window, residuals, d_out):
  q, k, v, vectors, out, lse = residuals
  dq, dk, dv = jax.ffi.ffi_call(
      BACKWARD_TARGET, tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v)), vmap_method="sequential"
  )(q, k, v, *vectors, out, lse, d_out, **_ffi_attrs(scale, window))
  no_grad = tuple(np.zeros(x.shape, jax.dtypes.float0) for x in vectors)
  return dq, dk, dv, no_grad


_flash.defvjp(_flash_forward, _flash_backward)
