"""Loop trip counts and FLOPs read from compiled HLO text (llvm_jax/hlo_cost.py), and the AOT costs that
weight each loop body by its trip count. Against a real TPU compile: tests/test_aot.py."""

from llvm_jax import aot, hlo_cost, hlo_text

# A counter loop of 3 iterations (its start a copied constant, as TPU programs write it) around a fused
# (8, 16) x (16, 16) matmul.
_LOOP_HLO = """
%cond (p: (s32[], f32[8,16])) -> pred[] {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%fused_dot (param_0: f32[8,16], param_1: f32[16,16]) -> f32[8,16] {
  %param_0 = f32[8,16]{1,0} parameter(0)
  %param_1 = f32[16,16]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,16]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} parameter(1)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  %y = f32[8,16]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%next, %y)
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %start = s32[] copy(%zero)
  %init = (s32[], f32[8,16]{1,0}) tuple(%start, %x)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_loop_weights_multiply_each_computation_by_its_loops_trip_count():
  computations = hlo_text.computations(_LOOP_HLO)
  weights, trips = hlo_cost.loop_weights(computations)
  assert trips == {"loop": 3}
  assert weights == {"main": 1, "body": 3, "cond": 4, "fused_dot": 3}
  assert hlo_cost.flops(computations["fused_dot"]) == (2 * 8 * 16 * 16, 0)
  # XLA counts each computation once; the repeats add the matmul and the counter's add twice more and
  # the condition's compare three times more.
  assert hlo_cost.repeated_flops(computations, weights) == 2 * (4096 + 1) + 3 * 1


def test_an_unreadable_trip_count_weighs_one_and_is_reported():
  computations = hlo_text.computations(_LOOP_HLO.replace("%start = s32[] copy(%zero)", "%start = s32[] add(%x, %x)"))
  weights, trips = hlo_cost.loop_weights(computations)
  assert trips == {"loop": None} and weights["body"] == 1 and weights["fused_dot"] == 1
  assert hlo_cost.repeated_flops(computations, weights) == 0.0
  loops = aot._loops(computations, trips)
  assert loops["cost_program_loops"] == 1 and loops["loop_trip_counts"] == {"(inserted by XLA)": [None]}


def test_hbm_traffic_counts_a_loop_body_once_per_iteration():
  computations = hlo_text.computations(_LOOP_HLO)
  weights, _ = hlo_cost.loop_weights(computations)
  once = sum(moved for _, moved, _ in aot._top_level_traffic(computations))
  every = sum(moved for _, moved, _ in aot._top_level_traffic(computations, weights))
  # Per iteration the body's add moves 12 bytes and the matmul reads x and w, writes y: 2,560 bytes; the
  # condition's compare reads 8 bytes and writes 1; the entry copies the 4-byte counter.
  body, condition, entry = 12 + 4 * (8 * 16 + 16 * 16 + 8 * 16), 9, 8
  assert once == entry + body + condition
  assert every == entry + 3 * body + 4 * condition


def test_convolution_flops_leave_out_the_padding():
  # A 1-D convolution of 5 positions, window 3, padded by 1 on each side: the edge outputs see 2 of the
  # 3 window positions (2 + 3 + 3 + 3 + 2 = 13 multiply-adds per batch row and feature pair).
  text = """
ENTRY %main (x: f32[2,5,4], k: f32[3,4,6]) -> f32[2,5,6] {
  %x = f32[2,5,4]{2,1,0} parameter(0)
  %k = f32[3,4,6]{2,1,0} parameter(1)
  ROOT %c = f32[2,5,6]{2,1,0} convolution(%x, %k), window={size=3 pad=1_1}, dim_labels=b0f_0io->b0f
}
"""
  (body,) = hlo_text.computations(text).values()
  assert hlo_cost.flops(body) == (2 * 2 * 4 * 6 * 13, 0)


def test_a_conditionals_branches_in_a_loop_run_with_it():
  text = (
      _LOOP_HLO.replace(
          "%y = f32[8,16]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot",
          "%y = f32[8,16]{1,0} conditional(%i, %x, %x), branch_computations={%on, %off}",
      )
      + """
%on (a: f32[8,16]) -> f32[8,16] {
  %a = f32[8,16]{1,0} parameter(0)
  ROOT %twice = f32[8,16]{1,0} add(%a, %a)
}

%off (b: f32[8,16]) -> f32[8,16] {
  ROOT %b = f32[8,16]{1,0} parameter(0)
}
"""
  )
  weights, _ = hlo_cost.loop_weights(hlo_text.computations(text))
  assert weights["on"] == weights["off"] == 3


def test_a_counter_stepping_by_two_halves_the_trips():
  # XLA's windowed-einsum loops (FSDP's collective matmuls) step their counter by 2.
  text = _LOOP_HLO.replace("%one = s32[] constant(1)", "%one = s32[] constant(2)")
  _, trips = hlo_cost.loop_weights(hlo_text.computations(text))
  assert trips == {"loop": 2}  # 0, 2 < 3
