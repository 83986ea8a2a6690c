"""The train-step bench: its CLI against PyTorch on a tiny demo model, and the op-time breakdown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llvm_jax.bench import breakdown, common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "op_name, scope, backward",
    [
        (
            "jit(step_fn)/jvp(LLVM)/decoder/decoder._layers/DecoderLayer/attn/div",
            "decoder/decoder._layers/DecoderLayer/attn",
            False,
        ),
        (
            "jit(step_fn)/transpose(jvp(LLVM))/decoder/decoder._layers/DecoderLayer/attn/bkgts,bskd->btkgd/dot_general",
            "decoder/decoder._layers/DecoderLayer/attn",
            True,
        ),
        (
            "jit(step_fn)/jvp(LLVM)/LLVM.encode_images/vision/layers_1/mlp/jit(gelu)/erf",
            "LLVM.encode_images/vision/layers_*/mlp",
            False,
        ),
        ("jit(step_fn)/mul", breakdown.OUTSIDE_MODEL, False),
    ],
)
def test_scope_of_strips_transformations_primitives_and_layer_indices(op_name, scope, backward):
  assert breakdown.scope_of(op_name) == (scope, backward)


class _TwoLayers(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(64, name="wide")(x)
    return nn.Dense(8, name="narrow")(jax.nn.relu(x))


def test_step_breakdown_charges_forward_and_backward_ops_to_modules():
  model = _TwoLayers()
  x = jnp.ones((256, 32))
  params = model.init(jax.random.key(0), x)

  def loss(p):
    return jnp.sum(jax.lax.fori_loop(0, 2, lambda i, y: y * 0.5, model.apply(p, x)) ** 2)

  step = jax.jit(jax.grad(loss)).lower(params).compile()
  scopes = {s.path: s for s in breakdown.step_breakdown(step.as_text(), lambda: jax.block_until_ready(step(params)))}
  assert {"wide", "narrow"} <= set(scopes)  # the root module is the jvp(...) wrapper
  for name in ("wide", "narrow"):
    assert scopes[name].forward_s > 0 and scopes[name].backward_s > 0
  # The loop is control flow: its body's ops are charged, the while itself is not.
  hlo = step.as_text()
  loops = re.findall(r"%([\w.]+) = \([^\n]*?\) while\(", hlo)
  assert loops and not set(loops) & set(breakdown.instruction_scopes(hlo))
  table = breakdown.format_breakdown(list(scopes.values()), wall_s=1e-3)
  assert "wide" in table and "share" in table


def test_interleaved_timing_runs_an_untimed_call_of_the_same_variant_before_each_timed_one():
  calls = []
  thunks = {name: (lambda name=name: calls.append(name)) for name in ("jax", "torch")}
  medians = common.time_interleaved(thunks, steps=3, untimed_before_each=1)
  assert set(medians) == {"jax", "torch"} and all(ms >= 0 for ms in medians.values())
  # One warm-up call each, then per round each variant twice in a row (the second timed).
  assert calls == ["jax", "torch"] + ["jax", "jax", "torch", "torch"] * 3
  calls.clear()
  common.time_interleaved(thunks, steps=2)
  assert calls == ["jax", "torch"] * 3


def test_bench_cli_times_llvm_jax_against_pytorch_and_breaks_the_step_down(tmp_path):
  out = tmp_path / "bench.json"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "llvm_jax.bench",
          "--config=configs/demo.py:width=32,layers=1,batch=2,seq=32",
          "--steps=2",
          "--breakdown",
          f"--out={out}",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Where the step's op time goes" in proc.stdout
  assert "decoder/decoder._layers/DecoderLayer/attn" in proc.stdout
  result = json.loads(out.read_text())
  assert result["batch"] == 2 and result["seq_len"] == 32
  assert result["step_time_s"] > 0 and result["torch_step_time_s"] > 0
  assert result["torch_over_jax"] == pytest.approx(result["torch_step_time_s"] / result["step_time_s"])
  assert result["last_loss"] < result["first_loss"]


def test_matmul_bench_times_each_dense_layers_three_matmuls_on_both_sides():
  from configs import demo
  from llvm_jax import config_utils
  from llvm_jax.bench import matmul_bench

  decoder = config_utils.model_config(demo.get_config()).decoder
  layers = matmul_bench.projections(decoder)
  assert layers["q"] == (64, 64, 4) and layers["k, v"] == (64, 32, 8) and layers["gate, up"] == (64, 128, 8)
  assert layers["lm_head"] == (64, decoder.vocab_size, 1)
  rng = np.random.RandomState(0)
  x, w, dy = rng.randn(12, 5), rng.randn(5, 3), rng.randn(12, 3)
  x32, dy32 = x.astype(np.float32), dy.astype(np.float32)
  expected = {"x W": x @ w, "dy W^T": dy @ w.T, "x^T dy": x.T @ dy}
  for which in matmul_bench.PASSES:
    a, b = matmul_bench.operands(*matmul_bench.matmul_dims(12, 5, 3, which), which, rng)
    assert matmul_bench.product(which, a, b).shape == expected[which].shape
    a, b = {"x W": (x, w), "dy W^T": (dy, w), "x^T dy": (x, dy)}[which]
    a, b = a.astype(np.float32), b.astype(np.float32)
    np.testing.assert_allclose(matmul_bench.jax_thunk(which, a, b)(), expected[which], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(matmul_bench.torch_thunk(which, a, b)().numpy(), expected[which], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      matmul_bench.jax_thunk("x^T dy", x32, dy32, "cpu")(), expected["x^T dy"], rtol=1e-5, atol=1e-5
  )
