"""The attention implementations of `llvm_jax.models.attention` against an independent numpy reference.

Forward and gradients (the VJP of a random linear functional of the output) in float32, for every
mask feature the model uses. Rows without any valid key are compared by their documented behaviour
only; the functional gives them zero weight, as real losses do.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multiprocess_helpers import REPO

from llvm_jax.models import attention, masks

ATOL = 1e-5


def reference(q, k, v, dense, scale, d_out):
  """Output and (dq, dk, dv) in float64 numpy: softmax attention and its hand-written VJP, KV heads repeated.

  Fully masked rows get -1e30 logits everywhere, hence the mean of v (as the einsum path).
  """
  q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
  groups = q.shape[2] // k.shape[2]
  kr, vr = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  logits = np.einsum("bthd,bshd->bhts", q, kr) * scale
  if dense is not None:
    logits = np.where(np.asarray(dense)[:, None], logits, -1e30)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = np.einsum("bhts,bshd->bthd", p, vr)
  dp = np.einsum("bthd,bshd->bhts", d_out, vr)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * scale
  dq = np.einsum("bhts,bshd->bthd", ds, kr)
  ungroup = lambda x: x.reshape(*x.shape[:2], k.shape[2], groups, x.shape[-1]).sum(3)
  dk = ungroup(np.einsum("bhts,bthd->bshd", ds, q))
  dv = ungroup(np.einsum("bhts,bthd->bshd", p, d_out))
  return out, (dq, dk, dv)


def _impl_fn(impl, mask, scale, block_q, block_kv):
  if impl == "cudnn_xla":  # the cudnn argument mapping, run by jax.nn's XLA path
    return lambda q, k, v: attention.cudnn_attention(q, k, v, mask, scale, implementation="xla")
  if impl == "splash_interpret":
    return lambda q, k, v: attention.splash_attention(
        q, k, v, mask, scale, block_q=block_q, block_kv=block_kv, interpret=True
    )
  return lambda q, k, v: attention.dot_product_attention(q, k, v, mask, scale, impl, block_q=block_q, block_kv=block_kv)


@functools.partial(jax.jit, static_argnames=("impl", "scale", "block_q", "block_kv"))
def out_and_grads(q, k, v, mask, cotangent, *, impl, scale, block_q=512, block_kv=512):
  out, vjp = jax.vjp(_impl_fn(impl, mask, scale, block_q, block_kv), q, k, v)
  return out, vjp(cotangent)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (lru_cache)
class Case:
  name: str
  q: jax.Array
  k: jax.Array
  v: jax.Array
  mask: masks.MaskInfo | None
  scale: float

  @functools.cached_property
  def valid_rows(self) -> np.ndarray:
    """(B, T) bool: queries with at least one key to attend to."""
    if self.mask is None:
      return np.ones(self.q.shape[:2], bool)
    return dense_mask(self.mask).any(axis=-1)

  def cotangent(self, seed: int = 1, masked_rows: bool = False) -> jax.Array:
    b, t, h, _ = self.q.shape
    w = np.random.RandomState(seed).randn(b, t, h, self.v.shape[-1])
    if not masked_rows:
      w *= self.valid_rows[:, :, None, None]
    return jnp.asarray(w, jnp.float32)


def _qkv(seed, b, t, s, h, hkv, dq, dv=None):
  r = np.random.RandomState(seed)
  f = lambda *shape: jnp.asarray(r.randn(*shape), jnp.float32)
  return f(b, t, h, dq), f(b, s, hkv, dq), f(b, s, hkv, dv or dq)


def dense_mask(mask: masks.MaskInfo) -> np.ndarray:
  """(B, T, S) in numpy, straight from the rule in the `masks` docstring."""
  m = {f.name: np.asarray(getattr(mask, f.name)) for f in dataclasses.fields(mask) if f.name != "sliding_window"}
  q = lambda name: m[name][:, :, None]
  kv = lambda name: m[name][:, None, :]
  allowed = (q("q_segment_ids") == kv("kv_segment_ids")) & (q("q_segment_ids") != 0)
  allowed &= kv("kv_slots") <= q("q_slots")
  if mask.sliding_window is not None:
    allowed &= q("q_positions") - kv("kv_positions") < mask.sliding_window
  return allowed


def _positions(seg: np.ndarray) -> np.ndarray:
  """Positions restarting at 0 in each segment, 0 on padding (numpy; as masks.default_positions)."""
  pos = np.zeros_like(seg)
  for r, row in enumerate(seg):
    for i in range(1, len(row)):
      pos[r, i] = pos[r, i - 1] + 1 if row[i] == row[i - 1] and row[i] else 0
  return pos


def _self_mask(rows, window=None):
  seg = np.array(rows, np.int32)
  slots = np.broadcast_to(np.arange(seg.shape[1], dtype=np.int32), seg.shape)
  j = lambda a: jnp.asarray(a, jnp.int32)
  return masks.MaskInfo(j(seg), j(slots), j(_positions(seg)), j(seg), j(slots), j(_positions(seg)), window)


def _case_causal_packed_gqa():
  # Row 0 packs three segments; row 1 is left-padded.
  mask = _self_mask([[1] * 12 + [2] * 15 + [3] * 10, [0] * 7 + [1] * 30])
  return Case("causal_packed_leftpad_gqa2", *_qkv(0, 2, 37, 37, 4, 2, 8), mask, 8**-0.5)


def _case_sliding_window_mqa():
  # Row 0: two packed segments then right padding; row 1 left-padded. H=4 over one KV head.
  mask = _self_mask([[1] * 18 + [2] * 8 + [0] * 4, [0] * 5 + [1] * 25], window=6)
  return Case("sliding_window_rightpad_mqa", *_qkv(2, 2, 30, 30, 4, 1, 8), mask, 8**-0.5)


def _case_phantom():
  # Phantom: q/k/v 2d wide (d = 4 here), scale 1/sqrt(d) of the original head dim.
  mask = _self_mask([[1] * 20, [0] * 3 + [1] * 17])
  return Case("phantom_2d", *_qkv(3, 2, 20, 20, 2, 1, 8), mask, 4**-0.5)


def _case_kv_cache():
  """T=5 new tokens at slots [end, end + 5) over a 32-slot cache, built as the decoder does."""
  t, s = 5, 32
  ends, lefts = [20, 12], [0, 4]  # row 1's prompt was left-padded by 4 (empty cache slots)
  kv_seg = np.zeros((2, s), np.int32)
  q_seg = np.ones((2, t), np.int32)
  q_seg[1, -1] = 0  # a padding query in this call: no valid key
  for r, (end, left) in enumerate(zip(ends, lefts)):
    kv_seg[r, left:end] = 1
    kv_seg[r, end : end + t] = q_seg[r]  # this call's tokens, already written into the cache
  q_slots = np.arange(t)[None] + np.array(ends)[:, None]
  kv_slots = np.broadcast_to(np.arange(s), (2, s))
  q_pos = q_slots - np.array(lefts)[:, None]
  kv_pos = np.where(kv_seg > 0, kv_slots - np.array(lefts)[:, None], 0)
  j = lambda a: jnp.asarray(a, jnp.int32)
  mask = masks.MaskInfo(j(q_seg), j(q_slots), j(q_pos), j(kv_seg), j(kv_slots), j(kv_pos))
  return Case("kv_cache", *_qkv(4, 2, t, s, 4, 2, 8), mask, 8**-0.5)


def _case_pmod_keys():
  """p-MoD-like: 24 queries over 10 kept keys at non-arange slots/positions; row 1 keeps only 6."""
  t, s = 24, 10
  r = np.random.RandomState(5)
  q_seg = np.array([[1] * t, [0] * 4 + [1] * 20], np.int32)
  q_pos = _positions(q_seg)
  kept = np.stack(
      [np.sort(r.choice(t, s, replace=False)), np.r_[np.sort(r.choice(np.arange(4, t), 6, replace=False)), [0] * 4]]
  )
  kv_seg = np.array([[1] * s, [1] * 6 + [0] * 4], np.int32)
  kv_slots = np.where(kv_seg > 0, kept, 0)
  kv_pos = np.take_along_axis(q_pos, kv_slots, axis=1) * (kv_seg > 0)
  q_slots = np.broadcast_to(np.arange(t), (2, t))
  j = lambda a: jnp.asarray(a, jnp.int32)
  mask = masks.MaskInfo(j(q_seg), j(q_slots), j(q_pos), j(kv_seg), j(kv_slots), j(kv_pos))
  return Case("pmod_keys", *_qkv(6, 2, t, s, 4, 2, 8, dv=6), mask, 8**-0.5)


def _case_bidirectional():
  return Case("bidirectional_none", *_qkv(7, 2, 17, 23, 2, 2, 8, dv=6), None, 8**-0.5)


CASES = [
    _case_causal_packed_gqa(),
    _case_sliding_window_mqa(),
    _case_phantom(),
    _case_kv_cache(),
    _case_pmod_keys(),
    _case_bidirectional(),
]

IMPLS = {
    "xla": ("xla", {}),
    "blocked_8x5": ("blocked", dict(block_q=8, block_kv=5)),  # blocks dividing neither T nor S: padding path
    "blocked_64x64": ("blocked", dict(block_q=64, block_kv=64)),  # blocks larger than T and S
    "cudnn_mapping_xla": ("cudnn_xla", {}),
    "cpu_flash": ("cpu_flash", {}),
}
ZERO_ROW_IMPLS = ("blocked", "cpu_flash")  # rows without keys give 0 and pass no gradient
# Blocks larger than T and S only on some cases (one compile each; the mask logic is the same).
_LARGE_BLOCK_CASES = ("causal_packed_leftpad_gqa2", "kv_cache", "bidirectional_none")
MATRIX = [
    pytest.param(i, *impl, id=f"{case.name}-{impl_id}")
    for i, case in enumerate(CASES)
    for impl_id, impl in IMPLS.items()
    if impl_id != "blocked_64x64" or case.name in _LARGE_BLOCK_CASES
]


@functools.cache
def _reference(case: Case):
  return reference(
      case.q, case.k, case.v, None if case.mask is None else dense_mask(case.mask), case.scale, case.cotangent()
  )


def _assert_matches(case: Case, got, want, fully_masked_out):
  (out, grads), (ref_out, ref_grads) = got, want
  valid = case.valid_rows[:, :, None, None]
  out = np.asarray(out)
  assert np.isfinite(out).all() and all(np.isfinite(np.asarray(g)).all() for g in grads)
  np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, ref_out, 0), atol=ATOL, rtol=0)
  if fully_masked_out == "zero":
    np.testing.assert_array_equal(np.where(valid, 0, out), 0)
  elif fully_masked_out == "mean_v":
    np.testing.assert_allclose(np.where(valid, 0, out), np.where(valid, 0, ref_out), atol=ATOL, rtol=0)
  for name, g, ref_g in zip("qkv", grads, ref_grads):
    np.testing.assert_allclose(g, ref_g, atol=ATOL, rtol=0, err_msg=f"d{name}")


@pytest.mark.parametrize("case_index,impl,blocks", MATRIX)
def test_matches_reference(case_index, impl, blocks):
  case = CASES[case_index]
  got = out_and_grads(case.q, case.k, case.v, case.mask, case.cotangent(), impl=impl, scale=case.scale, **blocks)
  _assert_matches(case, got, _reference(case), "zero" if impl in ZERO_ROW_IMPLS else "mean_v")
  if impl in ZERO_ROW_IMPLS and not case.valid_rows.all():
    # Rows without keys pass no gradient: weighting them too leaves the gradients as they were.
    _, grads = out_and_grads(
        case.q, case.k, case.v, case.mask, case.cotangent(masked_rows=True), impl=impl, scale=case.scale, **blocks
    )
    for g, ref_g in zip(grads, _reference(case)[1]):
      np.testing.assert_allclose(g, ref_g, atol=ATOL, rtol=0)


def _check_bfloat16(case: Case, impl: str, fully_masked_out: str | None, **blocks) -> None:
  """bf16 in, bf16 out, against the float64 reference of the bf16-rounded inputs."""
  bf16 = lambda x: x.astype(jnp.bfloat16)
  want_out, want_grads = reference(
      bf16(case.q),
      bf16(case.k),
      bf16(case.v),
      None if case.mask is None else dense_mask(case.mask),
      case.scale,
      bf16(case.cotangent()),
  )
  out, grads = out_and_grads(
      bf16(case.q), bf16(case.k), bf16(case.v), case.mask, bf16(case.cotangent()), impl=impl, scale=case.scale, **blocks
  )
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
  out, grads = np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]
  # Padding rows included: a NaN there would reach the real gradients through 0 * NaN.
  assert np.isfinite(out).all() and all(np.isfinite(g).all() for g in grads)
  valid = case.valid_rows[:, :, None, None]
  np.testing.assert_allclose(np.where(valid, out, 0), np.where(valid, want_out, 0), atol=2e-2)
  if fully_masked_out == "zero":
    np.testing.assert_array_equal(np.where(valid, 0, out), 0)
  elif fully_masked_out == "mean_v":
    np.testing.assert_allclose(np.where(valid, 0, out), np.where(valid, 0, want_out), atol=2e-2)
  for name, g, want in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(g, want, atol=6e-2, err_msg=f"d{name}")


def test_blocked_bfloat16():
  # Keeps the input dtype; float32 accumulation makes it at least as close as the einsum path (measured:
  # out 5.5e-3, grads 2.7e-2 vs einsum's 7.8e-3, 2.7e-2).
  _check_bfloat16(CASES[0], "blocked", "zero", block_q=8, block_kv=5)


def test_cpu_flash_bfloat16():
  # float32 inside the kernel, v's dtype out: as close as the einsum path.
  _check_bfloat16(CASES[0], "cpu_flash", "zero")


@pytest.mark.parametrize("dq, dv", [(3, 5), (40, 24), (136, 136)])
def test_cpu_flash_head_widths(dq, dv):
  # The kernel pads features to 1, 2, 4, 8, 16 or 32 vectors of 8: odd widths, q/k wider than v, and
  # Phantom-style wide heads run the padded instantiations.
  mask = _self_mask([[1] * 20 + [0] * 5, [0] * 3 + [1] * 22])
  case = Case(f"widths_{dq}_{dv}", *_qkv(7, 2, 25, 25, 2, 1, dq, dv=dv), mask, dq**-0.5)
  got = out_and_grads(case.q, case.k, case.v, case.mask, case.cotangent(), impl="cpu_flash", scale=case.scale)
  _assert_matches(case, got, _reference(case), "zero")


def test_cpu_flash_rejects_heads_wider_than_its_kernels():
  q, k, v = _qkv(0, 1, 4, 4, 1, 1, 264)
  with pytest.raises(ValueError, match="head dims up to 256"):
    attention.dot_product_attention(q, k, v, None, 1.0, "cpu_flash")


def test_cpu_flash_runs_per_shard_under_a_mesh():
  # Batch over 'data' x 'fsdp', heads over 'tensor': each device runs the kernel on its shard (a
  # shard_map), no all-gather of q/k/v; same numbers as one device.
  case = CASES[0]  # causal, packed, left padding, GQA: 2 KV heads
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
  want = out_and_grads(case.q, case.k, case.v, case.mask, case.cotangent(), impl="cpu_flash", scale=case.scale)
  shard = lambda x, *spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec)))
  q, k, v = (shard(x, "fsdp", None, "tensor") for x in (case.q, case.k, case.v))
  with jax.set_mesh(mesh):
    mask = jax.tree.map(lambda a: shard(a, "fsdp"), case.mask)
    fn = jax.jit(lambda q, k, v, mask: attention.dot_product_attention(q, k, v, mask, case.scale, "cpu_flash"))
    hlo = fn.lower(q, k, v, mask).compile().as_text()
    got = out_and_grads(q, k, v, mask, case.cotangent(), impl="cpu_flash", scale=case.scale)
  assert "llvm_jax_cpu_flash_forward" in hlo and "all-gather" not in hlo
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6, rtol=0)


def test_cpu_flash_build_errors_name_the_cause(tmp_path, monkeypatch):
  from llvm_jax.models import cpu_kernels

  monkeypatch.setenv("LLVM_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler")
  with pytest.raises(RuntimeError, match="'no-such-compiler' is not on PATH"):
    cpu_kernels.build()
  monkeypatch.delenv("CXX")
  broken = tmp_path / "cpu_kernels.cc"
  broken.write_text("this is not C++\n")
  monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
  with pytest.raises(RuntimeError, match="building cpu_kernels.cc failed"):
    cpu_kernels.build()
  assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))  # nothing half-built is kept


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused kernel needs an NVIDIA GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_cudnn_kernel_on_gpu(case):
  _check_bfloat16(case, "cudnn", "mean_v")


SPLASH_CASES = [
    # Sliding window, causal, packed segments, left and right padding, GQA, dv != dq.
    Case(
        "splash_window_packed_gqa",
        *_qkv(8, 2, 128, 128, 4, 2, 8, dv=6),
        _self_mask([[1] * 50 + [2] * 60 + [0] * 18, [0] * 30 + [1] * 98], window=9),
        8**-0.5,
    ),
    # Causal at 37 tokens (p-MoD's kept tokens are no multiple of 128): padded to one tile in segment 0.
    _case_causal_packed_gqa(),
    # Full attention (a ViT's) at 17 queries over 23 keys: padded to one 128-tile, the padding keys masked.
    _case_bidirectional(),
]


@pytest.mark.tpu
@pytest.mark.parametrize("case", SPLASH_CASES, ids=lambda c: c.name)
def test_splash_interpret_matches_reference(case):
  # Splash's Pallas kernel in the interpreter (no TPU here): checks masks, GQA, scale and layout.
  want = _reference(case)
  got = out_and_grads(
      case.q,
      case.k,
      case.v,
      case.mask,
      case.cotangent(),
      impl="splash_interpret",
      scale=case.scale,
      block_q=128,
      block_kv=128,
  )
  _assert_matches(case, got, want, fully_masked_out=None)


def test_unknown_impl_names_the_valid_ones():
  case = CASES[0]
  with pytest.raises(ValueError, match="blocked"):
    attention.dot_product_attention(case.q, case.k, case.v, case.mask, case.scale, "flash")


@pytest.mark.parametrize(
    "impl, cached, initializing, expected",
    [
        ("splash", False, False, "splash"),  # the decoder's cache-free call, a ViT at any token count
        ("splash", True, False, "blocked"),  # prefill into / decode from a KV cache
        ("cudnn", False, False, "cudnn"),
        ("cpu_flash", True, False, "cpu_flash"),  # any mask, KV caches included
        ("splash", False, True, "xla"),  # init creates parameters only
    ],
)
def test_kernel_for_each_kind_of_call(impl, cached, initializing, expected):
  assert attention.for_call(impl, cached, initializing) == expected


def test_mask_shape_mismatch_raises():
  case, other = CASES[0], CASES[1]
  with pytest.raises(ValueError, match="does not fit"):
    attention.dot_product_attention(case.q, case.k, case.v, other.mask, case.scale, "blocked")


@pytest.mark.tpu
def test_splash_rejects_what_it_cannot_express():
  kv = next(c for c in CASES if c.name == "kv_cache")  # T != S
  with pytest.raises(ValueError, match="use 'xla' or 'blocked'"):
    attention.dot_product_attention(kv.q, kv.k, kv.v, kv.mask, kv.scale, "splash")
  c = SPLASH_CASES[0]
  shifted = c.mask.replace(q_slots=c.mask.q_slots + 3)  # cache offsets with T == S
  with pytest.raises(ValueError, match="slots"):
    attention.dot_product_attention(c.q, c.k, c.v, shifted, c.scale, "splash")
  with pytest.raises(ValueError, match="multiples of 128"):
    attention.dot_product_attention(c.q, c.k, c.v, c.mask, c.scale, "splash", block_q=100, block_kv=100)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off GPU")
def test_cudnn_needs_a_gpu():
  case = CASES[0]
  with pytest.raises(ValueError, match="NVIDIA GPU"):
    attention.dot_product_attention(case.q, case.k, case.v, case.mask, case.scale, "cudnn")


def test_blocked_memory_far_below_einsum():
  b, t, h, d = 1, 2048, 4, 16
  x = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
  seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

  def temp_bytes(impl):
    def loss(q, k, v, seg):
      mask = masks.self_attention(seg, masks.default_positions(seg))
      out = attention.dot_product_attention(q, k, v, mask, d**-0.5, impl, block_q=128, block_kv=128)
      return jnp.sum(out * out)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x, seg).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  einsum, blocked = temp_bytes("xla"), temp_bytes("blocked")
  # Measured on CPU: 256.6 MiB vs 2.6 MiB (the einsum holds (H, T, T) float32 logits and probabilities).
  assert blocked < einsum / 4, (blocked, einsum)


_TPU_COMPILE_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import topologies
    from jax.sharding import NamedSharding, PartitionSpec as P
    from llvm_jax import aot, hlo_text
    from llvm_jax.models import attention, masks

    topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default",
                                        chips_per_host_bounds=(2, 2, 1), num_slices=1)
    b, t, h, hkv = 4, 256, 4, 2

    def compile_fwd_bwd(mesh, spec, d, window, with_mask, impl="splash", t=t):
      def attn(q, k, v, seg):
        mask = masks.self_attention(seg, masks.default_positions(seg), window) if with_mask else None
        return attention.dot_product_attention(q, k, v, mask, d**-0.5, impl, block_q=128, block_kv=128)
      loss = lambda *a: jnp.square(attn(*a).astype(jnp.float32)).sum()  # dO = 2 o: no matmul simplified away
      sds = lambda shape, dtype, s: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P(*s)))
      args = (sds((b, t, h, d), jnp.bfloat16, spec), sds((b, t, hkv, d), jnp.bfloat16, spec),
              sds((b, t, hkv, d), jnp.bfloat16, spec), sds((b, t), jnp.int32, spec[:1]))
      with jax.set_mesh(mesh):
        for fn in (jax.jit(attn), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))):
          compiled = fn.lower(*args).compile()
      return compiled  # the gradient's program

    def report_kernels(label, compiled, causal, window=None):
      kernels = aot.splash_kernels(hlo_text.computations(compiled.as_text()), causal, window)
      assert sorted(name for name, _, _ in kernels) == ["splash_mha_dkv", "splash_mha_dq", "splash_mha_fwd"]
      print("KERNELS", label, sum(flop for _, flop, _ in kernels))

    data = jax.sharding.Mesh(np.array(topo.devices).reshape(4), ("data",))
    data_tensor = jax.sharding.Mesh(np.array(topo.devices).reshape(2, 2), ("data", "tensor"))
    report_kernels("causal", compile_fwd_bwd(data, ("data",), 128, None, True), True)  # + segment ids, GQA
    compile_fwd_bwd(data, ("data",), 256, None, True)  # Phantom-style 2d-wide heads
    window = compile_fwd_bwd(data_tensor, ("data", None, "tensor"), 64, 32, True)  # heads sharded, window
    report_kernels("window", window, True, 32)
    report_kernels("full", compile_fwd_bwd(data, ("data",), 128, None, False), False)  # bidirectional
    report_kernels("padded", compile_fwd_bwd(data, ("data",), 128, None, False, t=200), False)  # a ViT's 200
    einsum = compile_fwd_bwd(data, ("data",), 128, None, False, impl="xla")
    print("EINSUM_FLOPS", einsum.cost_analysis()["flops"])
    print("SPLASH_TPU_COMPILE_OK")
""")


@pytest.mark.tpu
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu not installed (pip install libtpu)")
def test_splash_compiles_for_tpu():
  # A subprocess: the deviceless TPU topology must not meet the test process's fake-CPU backend.
  python_path = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=python_path)
  env.pop("XLA_FLAGS", None)
  result = subprocess.run(
      [sys.executable, "-c", _TPU_COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=600
  )
  assert "SPLASH_TPU_COMPILE_OK" in result.stdout, result.stderr[-3000:]
  modelled = {}
  for line in result.stdout.splitlines():
    if line.startswith("KERNELS "):
      _, label, flops = line.split()
      modelled[label] = float(flops)
  # The gradient's forward, dK/dV and dQ kernels per chip: (rows x heads) x visited 128 x 128 tiles x
  # 128^2 x 18 d FLOPs (forward 2 (dq + dv), dK/dV 4 (dq + dv), dQ 2 (2 dq + dv), dq = dv = d). 256
  # tokens: the causal mask visits 3 of 4 tiles, the 32-token window too, the full mask all 4.
  assert modelled["causal"] == 1 * 4 * 3 * 128**2 * 18 * 128
  assert modelled["window"] == 2 * 2 * 3 * 128**2 * 18 * 64  # 2 rows and 2 of 4 heads per chip
  assert modelled["full"] == 1 * 4 * 4 * 128**2 * 18 * 128
  assert modelled["padded"] == modelled["full"]  # 200 tokens padded to 256: the same 4 tiles
  # Less the backward kernels' two recomputed QK' products (18 -> 12 d), that is the einsum's six matmuls,
  # which XLA counts with the softmax's elementwise ops on top.
  einsum = float(next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("EINSUM_FLOPS")))
  assert 1.0 <= einsum / (modelled["full"] * 12 / 18) < 1.05, (einsum, modelled)


@pytest.mark.parametrize(
    "t, block, causal, window, tiles",
    [(1024, 128, True, None, 36), (1024, 512, True, None, 3), (256, 128, False, None, 4), (1024, 128, True, 256, 21)],
)
def test_splash_visited_tiles_are_the_kernels_nonempty_blocks(t, block, causal, window, tiles):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask_info as mask_info

  head = sm.FullMask((t, t)) if not causal else sm.CausalMask((t, t))
  if window:
    head = sm.LocalMask((t, t), window_size=(window - 1, 0), offset=0)
  info, _ = mask_info.process_mask(sm.MultiHeadMask([head]), (block, block))
  assert attention.splash_visited_tiles(t, t, block, block, causal, window) == tiles
  assert np.count_nonzero(np.asarray(info.block_mask)) == tiles


def _decoder_rope_trig(hlo: str) -> int:
  return sum(1 for line in hlo.splitlines() if (" cosine(" in line or " sine(" in line) and "decoder/" in line)


def test_cpu_flash_decoder_computes_rope_tables_once():
  # XLA:CPU fuses RoPE's cos and sin into every layer's rotation of q and k (and their backward) and
  # recomputes them there; under cpu_flash the decoder materialises them once. Same numbers as 'xla'.
  from model_helpers import LM, TINY_DECODER

  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 61, (2, 12)))

  def loss_and_grads(impl):
    model = LM(dataclasses.replace(TINY_DECODER, attention_impl=impl))
    params = model.init(jax.random.key(0), tokens)["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, tokens)[0] ** 2)
    fn = jax.jit(jax.value_and_grad(loss))
    return fn(params), fn.lower(params).compile().as_text()

  (want, want_grads), xla_hlo = loss_and_grads("xla")
  (got, got_grads), flash_hlo = loss_and_grads("cpu_flash")
  assert _decoder_rope_trig(flash_hlo) == 2 and flash_hlo.count("llvm_jax_cpu_materialize") == 2
  assert _decoder_rope_trig(xla_hlo) > 2 * TINY_DECODER.num_layers  # one cos and sin per consumer
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


def test_layer_shared_arrays_materialise_per_shard_under_a_mesh():
  from llvm_jax.models.config import RopeConfig
  from llvm_jax.models.rope import rope_cos_sin

  rope = RopeConfig()
  positions = jnp.tile(jnp.arange(6, dtype=jnp.int32), (4, 1))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
  want = rope_cos_sin(positions, rope, 8, 64)
  with jax.set_mesh(mesh):
    sharded = jax.device_put(positions, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp")))
    fn = jax.jit(lambda p: attention.layer_shared("cpu_flash", *rope_cos_sin(p, rope, 8, 64)))
    hlo = fn.lower(sharded).compile().as_text()
    got = fn(sharded)
  assert "llvm_jax_cpu_materialize" in hlo and "all-gather" not in hlo
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  assert all(a is b for a, b in zip(attention.layer_shared("xla", *want), want))  # the others take them as they are
