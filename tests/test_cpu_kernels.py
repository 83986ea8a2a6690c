"""dense_impl='cpu': the C++ weight-gradient kernel (models/cpu_kernels.cc) against XLA's product."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llvm_jax import config_utils
from llvm_jax.models import cpu_kernels, layers
from llvm_jax.models.config import DecoderConfig
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import trainer

WEIGHT_GRAD = cpu_kernels.DENSE_WEIGHT_GRAD_TARGET


def grads(matmul, x, w, dy):
  return jax.jit(jax.grad(lambda x, w: jnp.sum(matmul(x, w) * dy), argnums=(0, 1)))(x, w)


@pytest.mark.parametrize(
    "m, k, n",
    [
        (300, 64, 32),  # whole register tiles, two threads' shares of the rows
        (37, 5, 7),  # fewer rows than a chunk, K and N padded
        (1000, 33, 148),  # K odd, N past a tile: the padded copies, chunks of unequal length
    ],
)
def test_weight_gradient_matches_xla(m, k, n):
  rng = np.random.RandomState(m)
  x, w, dy = (jnp.asarray(rng.randn(*shape).astype(np.float32)) for shape in ((m, k), (k, n), (m, n)))
  np.testing.assert_array_equal(cpu_kernels.dense_matmul(x, w), x @ w)  # the forward stays XLA's
  got, want = grads(cpu_kernels.dense_matmul, x, w, dy), grads(jnp.dot, x, w, dy)
  np.testing.assert_array_equal(got[0], want[0])  # so does the input gradient
  scale = float(np.abs(want[1]).max())
  np.testing.assert_allclose(got[1], want[1], atol=2e-6 * scale, rtol=0)  # another summation order
  hlo = jax.jit(jax.grad(lambda w: jnp.sum(cpu_kernels.dense_matmul(x, w) * dy))).lower(w).compile().as_text()
  assert WEIGHT_GRAD in hlo


def test_weight_gradient_keeps_the_dtypes():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(64, 16), jnp.bfloat16)
  w = jnp.asarray(rng.randn(16, 24), jnp.bfloat16)
  dx, dw = grads(cpu_kernels.dense_matmul, x, w, jnp.ones((64, 24), jnp.bfloat16))
  assert dx.dtype == dw.dtype == jnp.bfloat16
  want = x.astype(jnp.float32).T @ jnp.ones((64, 24))
  np.testing.assert_allclose(np.asarray(dw, np.float32), want, rtol=1e-2)


def test_weight_gradient_under_vmap():
  # Per-example gradients (vmap over a batch of independent problems): one kernel call per example.
  rng = np.random.RandomState(5)
  xs, dys = jnp.asarray(rng.randn(3, 40, 6).astype(np.float32)), jnp.asarray(rng.randn(3, 40, 16).astype(np.float32))
  w = jnp.asarray(rng.randn(6, 16).astype(np.float32))
  per_example = lambda matmul: jax.vmap(lambda x, dy: grads(matmul, x, w, dy)[1])(xs, dys)
  np.testing.assert_allclose(per_example(cpu_kernels.dense_matmul), per_example(jnp.dot), atol=1e-5, rtol=0)


def test_weight_gradient_is_xlas_on_a_mesh():
  # An FFI call cannot sum per-shard gradients: on a mesh of several devices the product stays XLA's.
  rng = np.random.RandomState(1)
  x, w, dy = (jnp.asarray(rng.randn(*shape).astype(np.float32)) for shape in ((64, 8), (8, 16), (64, 16)))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.grad(lambda x, w: jnp.sum(cpu_kernels.dense_matmul(x, w) * dy), argnums=1))
    hlo = fn.lower(jax.device_put(x, shard), w).compile().as_text()
    got = fn(jax.device_put(x, shard), w)
  assert WEIGHT_GRAD not in hlo
  np.testing.assert_allclose(got, x.T @ dy, rtol=1e-5, atol=1e-5)


def test_dense_general_over_several_axes():
  # DenseGeneral flattens its axes into one 2-D product: the kernel sees (B*T, H*d) x (H*d, D).
  rng = np.random.RandomState(2)
  x = jnp.asarray(rng.randn(3, 5, 4, 6).astype(np.float32))
  module = lambda impl: layers.DenseGeneral((7,), ("heads", "head_dim"), ("embed",), impl=impl)
  params = nn.unbox(module("xla").init(jax.random.key(0), x))
  loss = lambda impl: jax.grad(lambda p: jnp.sum(jnp.sin(module(impl).apply(p, x))))(params)
  got, want = loss("cpu"), loss("xla")
  np.testing.assert_allclose(got["params"]["kernel"], want["params"]["kernel"], atol=1e-5, rtol=0)


def test_model_gradients_match_xla():
  # A tiny LLVM (ViT, projector, decoder): every parameter's gradient, cpu against xla.
  model_cfg = config_utils.tiny_llvm(num_layers=2)
  rng = np.random.RandomState(3)
  tokens = rng.randint(5, 100, (2, 24)).astype(np.int32)
  tokens[:, 2:18] = model_cfg.image_token_id  # one image: 16 patch tokens
  batch = {
      "tokens": jnp.asarray(tokens),
      "images": jnp.asarray(rng.uniform(-1, 1, (2, 1, 32, 32, 3)), jnp.float32),
      "image_mask": jnp.ones((2, 1), bool),
      "targets": jnp.asarray(np.roll(tokens, -1, axis=1)),
      "target_mask": jnp.ones((2, 24), jnp.float32),
  }
  params = nn.unbox(LLVM(model_cfg).init(jax.random.key(0), batch["tokens"], batch["images"], batch["image_mask"]))[
      "params"
  ]

  def gradients(impl):
    model = LLVM(config_utils.with_dense(model_cfg, impl))
    return jax.jit(jax.grad(lambda p: trainer.sft_loss_sums(model, p, batch)["loss_sum"]))(params)

  got, want = gradients("cpu"), dict(jax.tree_util.tree_leaves_with_path(gradients("xla")))
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = want[path]
    np.testing.assert_allclose(g, w, atol=1e-5 * float(np.abs(w).max()) + 1e-8, rtol=0, err_msg=str(path))


def test_config_typo_names_the_field():
  with pytest.raises(ValueError, match=r"decoder.dense_impl must be one of \('xla', 'cpu'\), got 'fast'"):
    dataclasses.replace(DecoderConfig(), dense_impl="fast")
