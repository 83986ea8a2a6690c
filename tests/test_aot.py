"""`python -m llvm_jax.aot`: a tiny model's train and decode steps compiled for a v5e:2x2 topology.

Each compile runs in a subprocess (the CLI, as a user runs it): the deviceless TPU topology comes
from libtpu, which starts with the process, and stays out of the test workers (their 8 fake CPU
devices, their memory). The three subprocesses start together, so the tests take as long as the
slower one (~30 s on 2 cores: the scanned programs and their unrolled twins).
"""

import importlib.util
import json
import subprocess
import sys

import pytest
from multiprocess_helpers import REPO

from llvm_jax import aot, hlo_text

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (pip install -e '.[aot]')"
)

# Scanned layers, costed by the loop-free twin (--unrolled_costs) and by the program itself, each loop body
# weighted by its trip count: the einsum attention in both, so the two counts must agree.
TINY = [
    "--config=configs/bench_1b.py:size=tiny,batch=8,seq_len=128,scan=true,attention=xla",
    "--config.model.decoder.num_layers=2",
    "--unrolled_costs",
]
# The same tiny model with a batch whose activations need ~400 GiB per chip.
HUGE = [
    "--config=configs/bench_1b.py:size=tiny,batch=4096,seq_len=4096,scan=false,attention=xla",
    "--config.model.decoder.num_layers=2",
]


def _start(args: list[str]) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "llvm_jax.aot", "--topology=v5e:2x2", *args],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
  )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("aot") / "tiny.json")
  procs = {
      "tiny": _start([*TINY, "--what=train,decode", f"--json={out}"]),
      "huge": _start([*HUGE, "--what=train"]),
      "cpu_kernel": _start(["--config=configs/demo.py"]),  # the demo's default attention is cpu_flash
  }
  results = {name: (proc.wait(timeout=600), proc.stdout.read()) for name, proc in procs.items()}
  with open(out) as f:
    return results, json.load(f)


@needs_libtpu
@pytest.mark.tpu
@pytest.mark.slow
def test_tiny_train_and_decode_fit(runs):
  (code, output), report = runs[0]["tiny"], runs[1]
  assert code == 0, output
  assert report["topology"] == "v5e:2x2" and report["chips"] == 4 and report["device_kind"] == "TPU v5 lite"
  assert report["fits"] and set(report["programs"]) == {"train", "decode"}
  assert report["scan_layers"] and report["costs_from"].startswith("loop-free twin")
  for name, program in report["programs"].items():
    assert program["memory"]["argument_bytes"] > 0, name
    assert program["fits"] and 0 < program["memory"]["total_bytes"] < program["hbm_bytes"] == 16 * 2**30, name
    assert program["xla_flops_per_chip"] > 0 and program["analytic_flops_per_chip"] > 0, name
    # HBM traffic is part of what XLA counts, which adds every VMEM prefetch and VMEM read.
    assert 0 < program["hbm_bytes_accessed_per_chip"] < program["xla_bytes_accessed_per_chip"], name
    assert program["estimated_step_s"] > 0
    assert program["estimate_source"].startswith(("XLA optimal_seconds", "roofline")), name
    assert program["compile_s"] > 0
    assert program["cost_program_loops"] == 0 and program["cost_program_loop_ops"] == {}, name  # none counted once
    # The scanned program's own FLOPs, every layer counted through its loop's trip count, are the twin's.
    assert abs(program["program_flops_per_chip"] / program["xla_flops_per_chip"] - 1) < 0.005, name
  train = report["programs"]["train"]
  # XLA counts more: the remat='full' recompute of the forward and the masked causal attention in full.
  assert train["xla_flops_per_chip"] > train["analytic_flops_per_chip"]
  # Which JAX operations move the HBM bytes, named as the model calls them (the tiny model's matmuls
  # read their operands from VMEM, where XLA's prefetches put them).
  names = [name for name, _, _ in train["top_instructions"]]
  assert train["top_instructions"] and all(moved > 0 for _, moved, _ in train["top_instructions"])
  assert any("vision" in name or "decoder" in name for name in names), names
  assert "prefetch into VMEM: (inserted by XLA)" in names, names
  assert "ESTIMATED step time" in output and "fits" in output
  # The config's default mesh (-1, 1, 1) puts every chip on the data axis: fsdp shards nothing, said so.
  assert report["mesh"]["fsdp"] == 1 and any("replicated on every chip" in note for note in report["notes"])


@needs_libtpu
@pytest.mark.tpu
@pytest.mark.slow
def test_huge_batch_does_not_fit(runs):
  code, output = runs[0]["huge"]
  assert code == 1, output
  assert "DOES NOT FIT" in output and "RESOURCE_EXHAUSTED" in output


def test_cost_twin_unrolls_every_loop_and_keeps_the_batch():
  from configs import bench_1b

  config = bench_1b.get_config("size=tiny,scan=true,attention=blocked")
  config.train.microbatches = 2
  twin = aot.cost_twin_config(config)
  assert (twin.model.decoder.scan_layers, twin.model.decoder.attention_impl, twin.train.microbatches) == (
      False,
      "xla",
      1,
  )
  assert twin.model.vision.attention_impl == "xla" and config.model.vision.attention_impl == "blocked"
  assert twin.data.global_batch_size == config.data.global_batch_size and twin.data.seq_len == config.data.seq_len
  assert config.model.decoder.scan_layers and config.train.microbatches == 2  # the real config is untouched
  splash = aot.cost_twin_config(config, "splash")
  assert (splash.model.decoder.attention_impl, splash.model.vision.attention_impl) == ("splash", "xla")
  # By default a program on splash keeps it in its twin, its work modelled (aot.splash_kernels).
  on_splash = bench_1b.get_config("size=tiny,scan=true,attention=splash")
  assert aot.cost_twin_config(on_splash).model.decoder.attention_impl == "splash"
  with pytest.raises(aot.AotInputError, match="'xla' or 'splash'"):
    aot.cost_twin_config(config, "blocked")  # its tile loops are what the twin removes
  assert aot.cost_twin_config(bench_1b.get_config("size=tiny,scan=false,attention=xla")) is None
  assert aot.cost_twin_config(bench_1b.get_config("size=tiny,scan=false,attention=splash")) is not None


def test_cpu_kernel_is_refused_before_compiling():
  from configs import demo

  with pytest.raises(aot.AotInputError, match="'cpu_flash' is a kernel for XLA:CPU"):
    aot.compile_for_topology(demo.get_config(), "v5e:2x2")  # the demo's default attention
  with pytest.raises(aot.AotInputError, match="dense_impl 'cpu' is a kernel for XLA:CPU"):
    aot.compile_for_topology(demo.get_config("attention=xla,dense=cpu"), "v5e:2x2")


@needs_libtpu
@pytest.mark.tpu
@pytest.mark.slow
def test_cli_refuses_a_cpu_kernel_in_one_line_with_status_2(runs):
  code, output = runs[0]["cpu_kernel"]
  assert code == 2, output
  assert "Traceback" not in output
  assert "llvm_jax.aot: attention impl 'cpu_flash' is a kernel for XLA:CPU" in output


def test_topology_names():
  v5e_8 = aot.parse_topology("v5e-8")
  assert v5e_8.name == "v5e:2x4" and v5e_8.chips_per_host_bounds == (2, 4, 1)  # one 8-chip host
  assert aot.parse_topology("v5p-8").name == "v5p:2x2x1"  # Cloud TPU counts v5p TensorCores: 4 chips
  assert aot.parse_topology("v5litepod-16").chips == 16
  assert aot.parse_topology("v4:2x2x2", num_slices=2).chips == 16
  assert aot.topology_for_chips("v6e", 256).name == "v6e:16x16"
  with pytest.raises(aot.AotInputError, match="2 dimensions"):
    aot.parse_topology("v5e:2x2x1")


def test_aspect_crop_grids_reach_the_lowered_train_and_prefill_programs():
  from configs import demo
  from llvm_jax import config_utils
  from llvm_jax.models.llvm import LLVM
  from llvm_jax.train import trainer

  config = demo.get_config("technique=deepstack,layers=2,batch=8,seq=48")
  config.data.deepstack_grid_mode = "aspect"
  model = LLVM(config_utils.model_config(config))
  mesh = trainer.mesh_from_config(config)
  batch = aot.abstract_batch(model.config, 8, 48, mesh, "aspect")
  assert batch["hires_grid"].shape == (8, 1, 2) and batch["hires_grid"].dtype == "int32"
  assert "hires_grid" not in aot.abstract_batch(model.config, 8, 48, mesh)
  # jax prunes unused arguments from the lowered module: the (8, 1, 2) int32 grid is there only if
  # the program reads it.
  grid = "tensor<8x1x2xi32>"
  for lowered in (aot.lower_train(config, model, mesh), aot.lower_prefill(config, model, mesh, max_len=56)):
    assert grid in lowered.as_text()
  config.data.deepstack_grid_mode = "fixed"
  assert grid not in aot.lower_prefill(config, model, mesh, max_len=56).as_text()


# A TPU program after memory-space assignment (S(1): VMEM), in the compiled HLO's text form: a weight
# prefetched into VMEM in two async slices, a matmul reading that VMEM copy, a weight copied into VMEM,
# an embedding gather, an in-place cache update, and a result written to HBM.
_PREFETCHING_HLO = """
%fused_matmul (param_0.1: bf16[512,128], param_1.1: bf16[8,512]) -> f32[8,128] {
  %param_0.1 = bf16[512,128]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %param_1.1 = bf16[8,512]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %dot.1 = f32[8,128]{1,0:T(8,128)} dot(%param_1.1, %param_0.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_gather (param_0.2: bf16[1000,128], param_1.2: s32[8]) -> bf16[8,128] {
  %param_0.2 = bf16[1000,128]{1,0:T(8,128)(2,1)} parameter(0)
  %param_1.2 = s32[8]{0:T(128)} parameter(1)
  ROOT %gather.1 = bf16[8,128]{1,0:T(8,128)(2,1)} gather(%param_0.2, %param_1.2), offset_dims={1}
}

%fused_update (param_0.3: bf16[64,128], param_1.3: bf16[8,128], param_2.3: s32[]) -> bf16[64,128] {
  %param_0.3 = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(0)
  %param_1.3 = bf16[8,128]{1,0:T(8,128)(2,1)} parameter(1)
  %param_2.3 = s32[] parameter(2)
  %zero = s32[] constant(0)
  ROOT %dynamic-update-slice.1 = bf16[64,128]{1,0:T(8,128)(2,1)} dynamic-update-slice(%param_0.3, %param_1.3, %param_2.3, %zero)
}

ENTRY %main (w: bf16[512,128], x: bf16[8,512], v: bf16[128,128], table: bf16[1000,128], ids: s32[8], cache: bf16[64,128], pos: s32[]) -> (f32[8,128], bf16[128,128], bf16[64,128]) {
  %w = bf16[512,128]{1,0:T(8,128)(2,1)} parameter(0)
  %x = bf16[8,512]{1,0:T(8,128)(2,1)} parameter(1)
  %v = bf16[128,128]{1,0:T(8,128)(2,1)} parameter(2)
  %table = bf16[1000,128]{1,0:T(8,128)(2,1)} parameter(3)
  %ids = s32[8]{0:T(128)} parameter(4)
  %cache = bf16[64,128]{1,0:T(8,128)(2,1)} parameter(5)
  %pos = s32[] parameter(6)
  %slice-start.1 = ((bf16[512,128]{1,0:T(8,128)(2,1)}), bf16[256,128]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[0:256], [0:128]}
  %slice-start.2 = ((bf16[512,128]{1,0:T(8,128)(2,1)}), bf16[256,128]{1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%w), slice={[256:512], [0:128]}
  %slice-done.1 = bf16[256,128]{1,0:T(8,128)(2,1)S(1)} slice-done(%slice-start.1)
  %slice-done.2 = bf16[256,128]{1,0:T(8,128)(2,1)S(1)} slice-done(%slice-start.2)
  %custom-call.1 = bf16[512,128]{1,0:T(8,128)(2,1)S(1)} custom-call(%slice-done.1, %slice-done.2), custom_call_target="ConcatBitcast"
  %matmul = f32[8,128]{1,0:T(8,128)} fusion(%custom-call.1, %x), kind=kOutput, calls=%fused_matmul, metadata={op_name="jit(step)/mlp/dot_general"}
  %copy-start.1 = (bf16[128,128]{1,0:T(8,128)(2,1)S(1)}, bf16[128,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%v)
  %copy-done.1 = bf16[128,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start.1)
  %copy.1 = bf16[128,128]{1,0:T(8,128)(2,1)} copy(%copy-done.1)
  %embedded = bf16[8,128]{1,0:T(8,128)(2,1)} fusion(%table, %ids), kind=kLoop, calls=%fused_gather
  %updated = bf16[64,128]{1,0:T(8,128)(2,1)} fusion(%cache, %embedded, %pos), kind=kLoop, calls=%fused_update
  ROOT %tuple.1 = (f32[8,128]{1,0:T(8,128)}, bf16[128,128]{1,0:T(8,128)(2,1)}, bf16[64,128]{1,0:T(8,128)(2,1)}) tuple(%matmul, %copy.1, %updated)
}
"""


def test_hbm_traffic_counts_each_buffer_in_hbm_once_and_no_vmem_traffic():
  traffic = list(aot._top_level_traffic(hlo_text.computations(_PREFETCHING_HLO)))
  kib = 1024
  by_kind = dict(aot.hbm_movers(traffic))
  # The weight's two slices read its 128 KiB from HBM; their VMEM results, the concatenation and the
  # matmul's read of it move nothing in HBM.
  assert by_kind["prefetch into VMEM"] == 128 * kib + 32 * kib  # + the copied weight's 32 KiB
  assert "custom-call" not in by_kind or by_kind["custom-call"] == 0
  # The matmul reads x (8 KiB) from HBM and writes its f32 result (4 KiB); the copy out of VMEM writes 32 KiB;
  # the gather reads 8 of the table's 1000 rows (2 KiB) and the ids' tile (512 B), writes 2 KiB; the update
  # reads its 2 KiB row block and position, writes 2 KiB in place, not the whole 16 KiB cache.
  assert by_kind["matmul fusion"] == 8 * kib + 4 * kib
  assert by_kind["copy"] == 32 * kib
  assert by_kind["elementwise fusion"] == (2 * kib + 512 + 2 * kib) + (2 * kib + 4 + 2 * kib)
  assert sum(moved for _, moved, _ in traffic) == 160 * kib + 12 * kib + 32 * kib + 4.5 * kib + 4 * kib + 4
  assert aot.top_instructions(traffic)[0] == ("prefetch into VMEM: (inserted by XLA)", 160 * kib, 3)
