"""Building blocks shared by the decoder and the vision towers.

Every parameter carries logical axis names (see `llvm_jax.sharding` for the mapping to the mesh).
Activations are computed in `dtype`; norms and softmax run in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llvm_jax.models import cpu_kernels

Array = jax.Array
Initializer = Callable[..., Array]

# Large negative instead of -inf: a fully masked row (a padding query) stays finite.
NEG_INF = -1e30

default_kernel_init = nn.initializers.normal(stddev=0.02)


def logical_init(init: Initializer, names: Sequence[str | None]) -> Initializer:
  return nn.with_logical_partitioning(init, tuple(names))


class DenseGeneral(nn.Module):
  """`x @ kernel (+ bias)` contracting the last `len(in_shape)` axes, with logical axis names.

  `in_names`/`out_names` name the contracted and produced axes; the kernel has shape
  in_shape + out_shape and names in_names + out_names. `impl` (config.DENSE_IMPLEMENTATIONS): 'cpu' takes
  the weight gradient from the C++ kernel of `cpu_kernels.dense_matmul`.
  """

  out_shape: tuple[int, ...]
  in_names: tuple[str | None, ...]
  out_names: tuple[str | None, ...]
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = default_kernel_init
  impl: str = "xla"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in = len(self.in_names)
    in_shape = x.shape[-n_in:]
    kernel = self.param(
        "kernel",
        logical_init(self.kernel_init, self.in_names + self.out_names),
        in_shape + self.out_shape,
        self.param_dtype,
    )
    x = x.astype(self.dtype)
    kernel = kernel.astype(self.dtype)
    # One 2-D matmul over flattened axes (free reshapes of row-major arrays): its gradients are plain
    # matmuls too, where a multi-axis dot_general makes XLA's CPU backend transpose operands.
    fan_in, fan_out = math.prod(in_shape), math.prod(self.out_shape)
    matmul = cpu_kernels.dense_matmul if self.impl == "cpu" else jnp.dot
    y = matmul(x.reshape(-1, fan_in), kernel.reshape(fan_in, fan_out))
    y = y.reshape(x.shape[: x.ndim - n_in] + self.out_shape)
    if self.use_bias:
      bias = self.param("bias", logical_init(nn.initializers.zeros, self.out_names), self.out_shape, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """RMSNorm as in Llama: normalise in float32, scale after casting back."""

  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", logical_init(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with scale and bias, statistics in float32."""

  eps: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dim = x.shape[-1]
    scale = self.param("scale", logical_init(nn.initializers.ones, (self.axis_name,)), (dim,), self.param_dtype)
    bias = self.param("bias", logical_init(nn.initializers.zeros, (self.axis_name,)), (dim,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


def maybe_remat(module_cls: type[nn.Module], policy: str | None, static_argnums: tuple[int, ...] = ()):
  """Wraps a module class in `nn.remat` with the named checkpoint policy (None: no remat)."""
  if policy is None:
    return module_cls
  if policy not in REMAT_POLICIES:
    raise ValueError(f"unknown remat_policy {policy!r}; expected one of {sorted(REMAT_POLICIES)}")
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=True, static_argnums=static_argnums)
