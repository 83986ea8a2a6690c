"""Compile the train step, prefill and decode step for a TPU topology from any machine (nothing allocated).

  python -m llvm_jax.aot --config=configs/X.py[:arg] --topology=v5e:4x4 [--num_slices=N] \
      [--what=train,prefill,decode] [--decode_batch=B] [--new_tokens=128] [--json=out.json] \
      [--config.key=value ...]

  python -m llvm_jax.aot --config=configs/bench_1b.py:technique=pmod --topology=v5e-8 \
      --config.sharding.mesh_shape='(1,-1,1)'          # FSDP over the 8 chips of one v5e host

Like MaxText's train_compile.py: libtpu (the `aot` extra: `pip install -e '.[aot]'`) describes a
deviceless TPU topology, every input is an abstract `jax.ShapeDtypeStruct` with a `NamedSharding` on
a mesh of those devices (`sharding.make_mesh(config.sharding.mesh_shape, devices=...)`, the config's
sharding strategy), and XLA's TPU compiler compiles the real programs:
  train    the trainer's own step (`trainer.build_setup`, `make_train_step`, `loss_function`,
           `lower_step`: optimiser, donation, `config.train.microbatches`) on a batch shaped like
           `bench/train_step.py: synthetic_batch` (data.global_batch_size x data.seq_len, one image
           per row), split over the data axes;
  prefill  `llvm.prefill` of that batch into a cache of seq_len + new_tokens slots (last logits out);
  decode   one `llvm.decode_step` of `decode_batch` rows against a full cache (the cache donated).
Inference programs take the weights in the compute dtype (as a server holds them); caches are split
over the data axes by their batch axis, weights as the strategy's parameter shardings.

Printed per program, per chip: HBM of arguments, outputs, temporaries and generated code from
`compiled.memory_analysis()` (total = arguments + outputs + temporaries − aliased) against the chip's
capacity (fits or not, headroom); XLA's compiled FLOPs (`cost_analysis()`) next to the analytic FLOPs
of `llvm_jax.flops` (XLA's differ: rematerialised forwards, masked causal attention counted in full,
elementwise ops); the HBM bytes the compiled program reads and writes, counted from its instructions'
memory spaces (XLA's 'bytes accessed' also counts every VMEM prefetch and VMEM read, several times the
HBM traffic of a decode step); an ESTIMATED step time and MFU, from XLA's `optimal_seconds`
where it is positive and finite, otherwise the roofline max(flops / peak, HBM bytes / HBM bandwidth) of
the compiled numbers (the source is printed); and the compile time. Exits 1 when a program does not fit,
2 when the request cannot be compiled for a TPU (`AotInputError`: printed without a traceback).
XLA's cost analysis counts a while loop's body once (scanned layers, the blocked attention's tile loops,
a microbatch scan). By default the program's own costs count every iteration: each loop's trip count is
read from its condition and every instruction's FLOPs (`hlo_cost.flops`, as XLA counts them) and HBM
bytes are weighted by the runs of the loops around it (`hlo_cost.loop_weights`); the estimate is then the
roofline (its FLOPs equal an unrolled compile's; its HBM bytes are the scanned program's own, which
differ: 80.6 against 104.9 GB per chip for the 1B train step on v5e-8). With --unrolled_costs the program is compiled a second time as its loop-free twin
(`cost_twin_config`: layers unrolled, einsum attention, one microbatch) for its FLOPs, bytes and XLA's
own estimate where valid; the twin's attention holds the whole (T, S) logits, so they are an upper
bound for the tiled kernels, and the program's loop-weighted FLOPs are printed next to them. Splash
attention is a Pallas custom call XLA's cost analysis does not see: `splash_kernels` models each call's
FLOPs and tile traffic from its shapes and mask, added to XLA's numbers (the estimate is then the
roofline); a twin of a program on splash (or --twin_attention=splash) keeps the kernel. Memory is
always the real program's.

Topologies: 'v5e:2x4' (generation:chip grid, as `get_topology_desc` takes it) or a Cloud TPU
accelerator type: 'v5e-8', 'v5litepod-8', 'v6e-8' count chips; 'v4-8', 'v5p-8' count TensorCores
(two per chip: v5p-8 is the 2x2x1 host of 4 chips). Hosts (`chips_per_host_bounds`): v5e / v6e
slices of 8 chips are one 2x4 host, others 2x2 hosts; v4 / v5p hosts are 2x2x1; v4 runs 'megacore'
(one device per chip, as on Cloud TPU). `--num_slices` > 1 describes a multi-slice (DCN) system.
"""

from __future__ import annotations

import os

# Compile-only: no local accelerator is started (set before jax reads its configuration), so libtpu's
# one-process-per-host lock (/tmp/libtpu_lockfile), which guards real chips, is not needed either.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import contextlib  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from llvm_jax import config_utils, flops, hlo_cost, sharding  # noqa: E402
from llvm_jax import hlo_text as hlo  # noqa: E402
from llvm_jax.bench.train_step import synthetic_batch  # noqa: E402
from llvm_jax.models import llvm  # noqa: E402
from llvm_jax.models.decoder import init_cache  # noqa: E402
from llvm_jax.models.llvm import LLVM  # noqa: E402
from llvm_jax.train import lora, trainer  # noqa: E402

GiB = 2**30
PROGRAMS = ("train", "prefill", "decode")


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: per-chip HBM and bandwidth, and how `get_topology_desc` describes it.

  Numbers from the Cloud TPU system-architecture pages: v4 32 GiB HBM2 at 1,200 GB/s; v5e 16 GiB
  HBM2 at 819 GB/s; v5p 95 GiB HBM2e at 2,765 GB/s; v6e (Trillium) 32 GiB at 1,640 GB/s. Peak bf16
  FLOP/s (v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s) live in `flops.PEAK_FLOPS`, by device kind.
  """

  name: str
  device_kind: str  # as compile-only devices report it
  hbm_bytes: int
  hbm_bandwidth: float  # bytes/s
  grid_dims: int  # 2: v5e / v6e chip grids 'AxB'; 3: v4 / v5p 'AxBxC'
  chip_config: str
  cores_per_chip_in_name: int  # Cloud TPU accelerator types count TensorCores for v4 / v5p

  @property
  def peak_flops(self) -> float:
    return flops.peak_flops(self.device_kind)


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GiB, 1.2e12, 3, "megacore", 2),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GiB, 8.19e11, 2, "default", 1),
    "v5p": Chip("v5p", "TPU v5", 95 * GiB, 2.765e12, 3, "default", 2),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GiB, 1.64e12, 2, "default", 1),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "trillium": "v6e"}
# Chip grids of the slice shapes Cloud TPU offers, by chip count.
_GRIDS = {
    2: {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    3: {
        4: "2x2x1",
        8: "2x2x2",
        16: "2x2x4",
        32: "2x4x4",
        64: "4x4x4",
        128: "4x4x8",
        256: "4x8x8",
        512: "8x8x8",
        1024: "8x8x16",
        2048: "8x16x16",
        4096: "16x16x16",
    },
}


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: Chip
  grid: str  # 'AxB' or 'AxBxC'
  num_slices: int = 1

  @property
  def name(self) -> str:
    return f"{self.chip.name}:{self.grid}"

  @property
  def chips_per_slice(self) -> int:
    return math.prod(int(x) for x in self.grid.split("x"))

  @property
  def chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int] | None:
    """v5e / v6e: an 8-chip slice is one 2x4 host (v5litepod-8, v6e-8); elsewhere libtpu's 2x2(x1) default."""
    if self.chip.grid_dims == 2 and self.chips_per_slice == 8:
      return (2, 4, 1)
    return None


class AotInputError(ValueError):
  """A request that cannot be compiled for a TPU (a topology, a program name, a CPU-only kernel in the
  config): the CLI prints it, without a traceback, and exits with status 2."""


def parse_topology(spec: str, num_slices: int = 1) -> Topology:
  """'v5e:2x4' (generation:grid) or a Cloud TPU accelerator type ('v5e-8', 'v5litepod-16', 'v5p-8')."""
  spec = spec.strip().lower()
  if ":" in spec:
    gen, grid = spec.split(":", 1)
  elif "-" in spec:
    gen, count = spec.rsplit("-", 1)
    gen = _ALIASES.get(gen, gen)
    if gen not in CHIPS:
      raise AotInputError(f"unknown TPU generation in {spec!r}; expected one of {sorted(CHIPS)}")
    chip = CHIPS[gen]
    chips = int(count) // chip.cores_per_chip_in_name
    if chips not in _GRIDS[chip.grid_dims]:
      raise AotInputError(f"{spec!r}: no standard {gen} slice of {chips} chips; give the grid, e.g. {gen}:2x2")
    grid = _GRIDS[chip.grid_dims][chips]
  else:
    raise AotInputError(f"topology {spec!r}: expected 'v5e:2x4' or an accelerator type such as 'v5e-8'")
  gen = _ALIASES.get(gen, gen)
  if gen not in CHIPS:
    raise AotInputError(f"unknown TPU generation {gen!r}; expected one of {sorted(CHIPS)}")
  chip = CHIPS[gen]
  if len(grid.split("x")) != chip.grid_dims or not all(x.isdigit() for x in grid.split("x")):
    raise AotInputError(f"{spec!r}: a {gen} grid has {chip.grid_dims} dimensions, e.g. {_GRIDS[chip.grid_dims][8]}")
  return Topology(chip, grid, num_slices)


def topology_for_chips(generation: str, chips: int, num_slices: int = 1) -> Topology:
  """The standard slice of `chips` chips (per slice) of a generation."""
  chip = CHIPS[_ALIASES.get(generation, generation)]
  return Topology(chip, _GRIDS[chip.grid_dims][chips], num_slices)


@contextlib.contextmanager
def _quiet_stderr():
  """Mutes file descriptor 2 (libtpu's C++ start-up warnings about the absent TPU); replays it on error."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      capture.seek(0)
      sys.stderr.write(capture.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def topology_devices(topology: Topology) -> list[jax.Device]:
  """The compile-only devices of the topology (needs libtpu)."""

  kwargs = {}
  if topology.chips_per_host_bounds is not None:
    kwargs["chips_per_host_bounds"] = topology.chips_per_host_bounds
  with _quiet_stderr():
    desc = topologies.get_topology_desc(
        topology_name=topology.name,
        platform="tpu",
        chip_config_name=topology.chip.chip_config,
        num_slices=topology.num_slices,
        **kwargs,
    )
  devices = list(desc.devices)
  if len(devices) != topology.chips:
    raise RuntimeError(
        f"{topology.name} x {topology.num_slices} slices gave {len(devices)} devices, " f"expected {topology.chips}"
    )
  return devices


# --- Abstract inputs -----------------------------------------------------------------------------


def _batch_spec(mesh: Mesh, rows: int, axis: int = 0, ndim: int = 1) -> PartitionSpec:
  """Rows split over the data axes ('data', 'fsdp') when they divide, else replicated."""
  data = mesh.shape["data"] * mesh.shape["fsdp"]
  if ndim == 0 or rows % data:
    return PartitionSpec()
  return PartitionSpec(*([None] * axis + [("data", "fsdp")]))


def abstract_batch(
    model_cfg, rows: int, seq_len: int, mesh: Mesh, grid_mode: str = "fixed"
) -> dict[str, jax.ShapeDtypeStruct]:
  """A batch like `bench/train_step.py: synthetic_batch` (one row built to read its structure), abstract."""

  one = synthetic_batch(model_cfg, 1, seq_len, grid_mode=grid_mode)
  return {
      k: jax.ShapeDtypeStruct(
          (rows,) + v.shape[1:], v.dtype, sharding=NamedSharding(mesh, _batch_spec(mesh, rows, 0, v.ndim))
      )
      for k, v in one.items()
  }


def abstract_cache(model_cfg, rows: int, max_len: int, num_vision: int, mesh: Mesh) -> Any:
  """The KV cache of `init_cache` as abstract arrays, each split over the data axes by its batch axis."""

  shapes = jax.eval_shape(lambda: init_cache(model_cfg.decoder, rows, max_len, num_vision=num_vision))
  scanned = model_cfg.decoder.scan_layers

  def place(path, leaf):
    in_layers = bool(path) and getattr(path[0], "key", None) == "layers"
    axis = 1 if scanned and in_layers else 0  # a scanned stack puts the layer axis first
    batched = leaf.ndim > axis and leaf.shape[axis] == rows
    spec = _batch_spec(mesh, rows, axis, leaf.ndim) if batched else PartitionSpec()
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(place, shapes)


def _inference_params(config: ml_collections.ConfigDict, model, mesh: Mesh) -> Any:
  """The weights as a server holds them: abstract, sharded, floats in the compute dtype, no LoRA adapters."""

  abstract, shardings = trainer.abstract_params_and_shardings(config, model, mesh)
  abstract.pop(lora.LORA_KEY, None)
  shardings.pop(lora.LORA_KEY, None)
  dtype = jnp.dtype(model.config.decoder.dtype)
  cast = lambda a: jax.ShapeDtypeStruct(a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype)
  return trainer.sharded_abstract(jax.tree.map(cast, abstract), shardings)


# --- The programs --------------------------------------------------------------------------------


def lower_train(config: ml_collections.ConfigDict, model, mesh: Mesh):

  setup, abstract_params = trainer.build_setup(config, model, mesh)
  params = trainer.sharded_abstract(abstract_params, setup.param_shardings)
  opt_state = trainer.sharded_abstract(jax.eval_shape(setup.tx.init, abstract_params), setup.opt_shardings)
  batch = abstract_batch(
      model.config, config.data.global_batch_size, config.data.seq_len, mesh, config.data.deepstack_grid_mode
  )
  step_fn = trainer.make_train_step(setup, trainer.loss_function(config), config.train.microbatches)
  return trainer.lower_step(setup, step_fn, params, opt_state, batch)


def _with_rules(config: ml_collections.ConfigDict, mesh: Mesh):

  return trainer.sharding_context(mesh, sharding.logical_rules(config.sharding.strategy))


def lower_prefill(config: ml_collections.ConfigDict, model, mesh: Mesh, max_len: int):

  cfg = model.config
  rows, seq_len = config.data.global_batch_size, config.data.seq_len
  params = _inference_params(config, model, mesh)
  batch = abstract_batch(cfg, rows, seq_len, mesh, config.data.deepstack_grid_mode)
  # The model's inputs but positions (prefill derives them from the segment ids).
  batch = {k: v for k, v in batch.items() if k in trainer.MODEL_INPUTS and k != "positions"}
  num_vision = cfg.tokens_per_image if "images" in batch else 0
  cache = abstract_cache(cfg, rows, max_len, num_vision, mesh)

  def prefill(params, batch):
    logits, new_cache = llvm.prefill(
        model,
        params,
        batch["tokens"],
        max_len,
        images=batch.get("images"),
        image_mask=batch.get("image_mask"),
        segment_ids=batch.get("segment_ids"),
        hires_images=batch.get("hires_images"),
        hires_grid=batch.get("hires_grid"),
    )
    return logits[:, -1], new_cache  # the sampler needs the last position only

  shard = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  logits_sharding = NamedSharding(mesh, _batch_spec(mesh, rows, 0, 2))
  with _with_rules(config, mesh):
    return jax.jit(
        prefill, in_shardings=(shard(params), shard(batch)), out_shardings=(logits_sharding, shard(cache))
    ).lower(params, batch)


def lower_decode(config: ml_collections.ConfigDict, model, mesh: Mesh, rows: int, max_len: int):

  cfg = model.config
  params = _inference_params(config, model, mesh)
  num_vision = cfg.tokens_per_image if cfg.vision is not None else 0
  cache = abstract_cache(cfg, rows, max_len, num_vision, mesh)
  token = jax.ShapeDtypeStruct((rows, 1), jnp.int32, sharding=NamedSharding(mesh, _batch_spec(mesh, rows, 0, 2)))
  shard = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  step = lambda params, token, cache: llvm.decode_step(model, params, token, cache)
  logits_sharding = NamedSharding(mesh, _batch_spec(mesh, rows, 0, 3))
  with _with_rules(config, mesh):
    return jax.jit(
        step,
        in_shardings=(shard(params), token.sharding, shard(cache)),
        out_shardings=(logits_sharding, shard(cache)),
        donate_argnums=(2,),
    ).lower(params, token, cache)


# --- Analysis ------------------------------------------------------------------------------------


# Instructions that move no bytes themselves: aliases, control flow (its bodies are walked), and the
# starts of async copies (their done counts the copy).
_NO_TRAFFIC = (
    "parameter",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "constant",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "while",
    "conditional",
    "call",
    "slice-start",
    "copy-start",
)
_SLICING = ("slice", "dynamic-slice", "gather")  # read only what they return from their first operand
_DTYPE_BYTES = {
    "pred": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
}


def _arrays(shape: str) -> list[tuple[int, int]]:
  """(bytes, memory space) of each array in an HLO shape, padded to its layout's first tile as HBM holds
  it (T(8,128) pads the two most minor dimensions to 8 and 128); the layout's S(n) names the memory
  space, none is HBM (TPU: S(1) is VMEM, S(2) SMEM)."""
  arrays = []
  for dtype, dims, layout in hlo.ARRAY.findall(shape):
    if dtype not in _DTYPE_BYTES:
      continue
    sizes = [int(d) for d in dims.split(",") if d]
    minor_to_major, _, tiling = (layout or "").partition(":")
    order = [int(d) for d in minor_to_major.split(",") if d.strip().isdigit()]
    tile = re.match(r"T\(([\d,]+)\)", tiling)
    if tile and len(order) == len(sizes):
      for dim, multiple in zip(order, reversed([int(t) for t in tile.group(1).split(",")])):
        sizes[dim] = -(-sizes[dim] // multiple) * multiple
    space = re.search(r"S\((\d+)\)", tiling)
    arrays.append((math.prod(sizes) * _DTYPE_BYTES[dtype], int(space.group(1)) if space else 0))
  return arrays


def _shape_bytes(shape: str) -> int:
  return sum(size for size, _ in _arrays(shape))


def _hbm_bytes(shape: str) -> int:
  return sum(size for size, space in _arrays(shape) if space == 0)


def _fused_reads(body: list[hlo.Instruction]) -> tuple[dict[int, int], tuple[int, int] | None]:
  """What a fusion reads of its operands: {operand index: bytes} for those it only slices or gathers
  from (the rest it reads whole), and (operand index, update bytes) when it updates an operand in place
  (a dynamic-update-slice root: only the update is written)."""
  parameters = {i.name: int(re.match(r"\d+", i.attributes).group()) for i in body if i.opcode == "parameter"}
  shapes = {i.name: i.shape for i in body}
  uses: dict[str, list[tuple[hlo.Instruction, int]]] = {}
  for instruction in body:
    for position, operand in enumerate(instruction.operands):
      uses.setdefault(operand, []).append((instruction, position))
  reads = {}
  for name, index in parameters.items():
    users = uses.get(name, [])
    if users and all(user.opcode in _SLICING and position == 0 for user, position in users):
      reads[index] = sum(_shape_bytes(user.shape) for user, _ in users)
  root = hlo.root(body)
  in_place = None
  if root is not None and root.opcode == "dynamic-update-slice" and root.operands[0] in parameters:
    in_place = (parameters[root.operands[0]], _shape_bytes(shapes.get(root.operands[1], "")))
  return reads, in_place


def _hbm_traffic(instruction: hlo.Instruction, shapes: dict[str, str], by_name: dict, computations: dict) -> int:
  """Bytes the instruction reads from and writes to HBM; what it moves within VMEM is not counted."""
  operands, shape = instruction.operands, instruction.shape
  in_hbm = lambda name: _hbm_bytes(shapes.get(name, "")) > 0
  opcode = instruction.opcode
  if opcode in ("slice-done", "copy-done"):  # an async copy, typically an HBM -> VMEM prefetch
    start = by_name.get(operands[0])
    source = start.operands[0] if start is not None and start.operands else None
    read = 0
    if source is not None and in_hbm(source):
      read = _shape_bytes(shape) if opcode == "slice-done" else _hbm_bytes(shapes.get(source, ""))
    return read + _hbm_bytes(shape)
  if opcode.endswith("-done"):
    return _hbm_bytes(shape)
  if opcode.endswith("-start"):
    return sum(_hbm_bytes(shapes.get(o, "")) for o in operands)
  if opcode in _SLICING:
    return (_shape_bytes(shape) if in_hbm(operands[0]) else 0) + _hbm_bytes(shape)
  if opcode == "dynamic-update-slice":  # in place: the update is read and written
    update = _shape_bytes(shapes.get(operands[1], ""))
    return (update if in_hbm(operands[1]) else 0) + (update if _hbm_bytes(shape) else 0)
  if opcode == "fusion":
    callee = re.search(r"calls=%?([\w.\-]+)", instruction.attributes)
    reads, in_place = _fused_reads(computations.get(callee.group(1), []) if callee else [])
    moved = 0
    for index, operand in enumerate(operands):
      if in_hbm(operand) and not (in_place and index == in_place[0]):
        moved += reads.get(index, _hbm_bytes(shapes.get(operand, "")))
    if in_place:
      return moved + (in_place[1] if _hbm_bytes(shape) else 0)
    return moved + _hbm_bytes(shape)
  return sum(_hbm_bytes(shapes.get(o, "")) for o in operands) + _hbm_bytes(shape)


def _top_level_bodies(
    computations: dict[str, list[hlo.Instruction]], weights: dict[str, int] | None = None
) -> Iterator[tuple[int, list[hlo.Instruction]]]:
  """(runs per program call, instructions) of each computation whose instructions run as such: the entry
  and while loops' bodies and conditions (fusion bodies and reducers are their callers' work). `weights`:
  `hlo_cost.loop_weights`; without them each runs once, as XLA's cost analysis counts them."""
  called = {
      c
      for body in computations.values()
      for instruction in body
      for c in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", instruction.attributes)
  }
  for name, body in computations.items():
    if name not in called or name.startswith(("while", "body", "cond")) or "while" in name:
      yield (weights or {}).get(name, 1), body


# Splash's Pallas kernels are custom calls named after the kernel; XLA's cost analysis counts none of
# their FLOPs, and their operands say nothing of the tiles they stream.
_SPLASH_KERNEL = re.compile(r"splash_mha_(fwd|dkv|dq)")


def splash_kernels(
    computations: dict[str, list[hlo.Instruction]],
    causal: bool = True,
    sliding_window: int | None = None,
    weights: dict[str, int] | None = None,
) -> list[tuple[str, float, float]]:
  """(kernel, FLOPs, HBM bytes) per chip of each splash kernel call in a compiled TPU program (its HLO text
  parsed: `hlo_text.computations`), MODELLED
  from the call's q/k/v shapes and the tiles its mask leaves non-empty (`attention.splash_visited_tiles`):
  the vision tower's calls (op_name under 'vision') full attention, the others the decoder's mask
  (`causal`, `sliding_window`); the padding tiles of a padded call count as visited. Per (row, query head)
  over V visited (bq, bk) tiles, flash attention's matmuls and tile traffic:
    fwd  QK' and PV: 2 bq bk (dq + dv) V FLOPs; reads q once and each visited tile's k and v, writes o
         and the log-sum-exp;
    dkv  QK', dV = P'dO, dP = dO V', dK = dS'Q: 4 bq bk (dq + dv) V; reads k, v once and each visited
         tile's q, dO and softmax statistics, writes dk, dv;
    dq   QK', dP, dQ = dS K: 2 bq bk (2 dq + dv) V; reads q, dO and statistics once and each visited
         tile's k and v, writes dq.
  Segment ids' reads and the softmax's exponentials are not counted. A call in a loop's body counts once
  per iteration with `weights` (`hlo_cost.loop_weights`), else once."""
  from llvm_jax.models import attention  # the mask's tiling is the kernel's; kept out of aot's import time

  kernels = []
  for runs, body in _top_level_bodies(computations, weights):
    for instruction in body:
      kernel = _SPLASH_KERNEL.match(instruction.name)
      if instruction.opcode != "custom-call" or not kernel:
        continue
      operands = instruction.attributes.split("operand_layout_constraints=", 1)[-1]
      arrays = [(dtype, [int(d) for d in dims.split(",") if d]) for dtype, dims, _ in hlo.ARRAY.findall(operands)]
      grid = next(dims for dtype, dims in arrays if dtype == "s8")  # the mask info: (heads, q tiles, kv tiles)
      # q, k, v: (rows, heads, length, head dim), rows squeezed away when a chip holds one.
      (dtype, q), (_, k), (_, v) = [a for a in arrays if len(a[1]) in (3, 4) and a[0] in ("bf16", "f16", "f32")][:3]
      b, (h, t, dq), (s, dk), dv = math.prod(q[:-3]), q[-3:], k[-2:], v[-1]
      bq, bk = t // grid[1], s // grid[2]
      op_name = re.search(r'op_name="([^"]*)"', instruction.attributes)
      if op_name and "/vision/" in op_name.group(1):
        visited = grid[1] * grid[2]  # the ViT: full attention (its padding keys are masked by segment)
      else:
        visited = attention.splash_visited_tiles(t, s, bq, bk, causal, sliding_window)
      size, tile = _DTYPE_BYTES[dtype], bq * bk
      if kernel.group(1) == "fwd":
        flops = 2 * tile * (dq + dv) * visited
        moved = t * (dq + dv) * size + t * 4 + visited * bk * (dk + dv) * size
      elif kernel.group(1) == "dkv":
        flops = 4 * tile * (dq + dv) * visited
        moved = 2 * s * (dk + dv) * size + visited * bq * ((dq + dv) * size + 8)
      else:
        flops = 2 * tile * (2 * dq + dv) * visited
        moved = t * (2 * dq + dv) * size + t * 8 + visited * bk * (dk + dv) * size
      kernels.append((f"splash_mha_{kernel.group(1)}", float(runs * b * h * flops), float(runs * b * h * moved)))
  return kernels


def _top_level_traffic(
    computations: dict[str, list[hlo.Instruction]], weights: dict[str, int] | None = None
) -> Iterator[tuple[str, int, str]]:
  """(kind, HBM bytes, op_name) of each of the compiled program's non-fused instructions (fusions named by
  what they compute: 'matmul' when they hold a convolution/dot, 'reduce', 'elementwise').

  Only HBM traffic counts: after memory-space assignment, TPU programs prefetch weights and activations
  into VMEM (async slices and copies into S(1) buffers) and their consumers read the VMEM copy; XLA's
  'bytes accessed' counts each of those transfers and reads again, as if all were HBM traffic. Slices and
  gathers read what they return; in-place updates write only the update. A while loop's body counts once
  per iteration with `weights` (`hlo_cost.loop_weights`), else once, as XLA's cost analysis counts it."""
  opcodes = {name: {i.opcode for i in body} for name, body in computations.items()}
  for runs, body in _top_level_bodies(computations, weights):
    shapes = {i.name: i.shape for i in body}
    by_name = {i.name: i for i in body}
    for instruction in body:
      if instruction.opcode in _NO_TRAFFIC or _SPLASH_KERNEL.match(instruction.name):
        continue  # a splash kernel's traffic is modelled (`splash_kernels`), not its operands once
      kind = instruction.opcode
      if kind == "fusion":
        callee = re.search(r"calls=%?([\w.\-]+)", instruction.attributes)
        inner = opcodes.get(callee.group(1), set()) if callee else set()
        kind = (
            "matmul fusion"
            if inner & {"convolution", "dot"}
            else "reduce fusion"
            if "reduce" in inner
            else "elementwise fusion"
        )
      elif kind in ("slice-done", "copy-done") and _hbm_bytes(instruction.shape) == 0:
        kind = "prefetch into VMEM"
      elif kind.endswith(("-start", "-done")):
        kind = kind.rsplit("-", 1)[0]
      op_name = re.search(r'op_name="([^"]*)"', instruction.attributes)
      moved = runs * _hbm_traffic(instruction, shapes, by_name, computations)
      yield kind, moved, op_name.group(1) if op_name else ""


def hbm_movers(traffic: list[tuple[str, int, str]], top: int = 8) -> list[tuple[str, int]]:
  """Which kinds of op move the HBM bytes of `_top_level_traffic`, summed, largest first (per chip)."""
  totals: dict[str, int] = {}
  for kind, moved, _ in traffic:
    totals[kind] = totals.get(kind, 0) + moved
  return sorted(totals.items(), key=lambda kv: -kv[1])[:top]


def top_instructions(traffic: list[tuple[str, int, str]], top: int = 6) -> list[tuple[str, int, int]]:
  """The JAX operations (op_name without the jit/transpose/remat wrappers) whose instructions move the most
  HBM bytes: (name, bytes, instruction count), largest first."""
  totals: dict[str, list[int]] = {}
  for kind, moved, op_name in traffic:
    parts = [p for p in op_name.split("/") if p and not p.startswith(("jit(", "jvp(", "transpose(", "checkpoint"))]
    name = f"{kind}: {'/'.join(parts[-3:]) or '(inserted by XLA)'}"
    entry = totals.setdefault(name, [0, 0])
    entry[0] += moved
    entry[1] += 1
  return [(name, b, n) for name, (b, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]]


def _loops(computations: dict[str, list[hlo.Instruction]], trips: dict[str, int | None]) -> dict[str, Any]:
  """The program's while loops by JAX operation (op_name): {name: [trip count per loop]}, and those whose
  trip count could not be read (`hlo_cost.trip_count`), whose bodies the costs count once."""
  trip_counts: dict[str, list[int | None]] = {}
  for instruction in (i for body in computations.values() for i in body if i.opcode == "while"):
    op_name = re.search(r'op_name="([^"]*)"', instruction.attributes)
    parts = [p for p in (op_name.group(1) if op_name else "").split("/") if p and not p.startswith("jit(step_fn")]
    name = "/".join(parts[-2:]) or "(inserted by XLA)"
    trip_counts.setdefault(name, []).append(trips.get(instruction.name))
  unknown = {name: sum(n is None for n in counts) for name, counts in trip_counts.items() if None in counts}
  return {
      "loop_trip_counts": trip_counts,
      "cost_program_loops": sum(unknown.values()),
      "cost_program_loop_ops": unknown,
  }


def _cost_dict(compiled) -> dict[str, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per device
    analysis = analysis[0] if analysis else {}
  return dict(analysis or {})


def analyse(
    compiled,
    topology: Topology,
    analytic_flops: float,
    compile_s: float,
    cost_compiled: Any = None,
    sliding_window: int | None = None,
) -> dict[str, Any]:
  """Memory against the chip's HBM, XLA's and the analytic FLOPs, and the estimated step time (per chip).

  cost_compiled: the program whose cost analysis to use instead of `compiled`'s (its loop-free twin).
  Splash kernels (custom calls XLA's cost analysis does not see) add their modelled FLOPs and HBM bytes
  (`splash_kernels`, causal over `sliding_window`); XLA's own estimate then omits them and is not used.
  """
  chip = topology.chip
  memory = compiled.memory_analysis()
  mem = {
      name: int(getattr(memory, f"{name}_size_in_bytes", 0) or 0)
      for name in ("argument", "output", "temp", "generated_code", "alias")
  }
  total = mem["argument"] + mem["output"] + mem["temp"] - mem["alias"]
  cost_program = compiled if cost_compiled is None else cost_compiled
  cost = _cost_dict(cost_program)
  xla_flops = float(cost.get("flops", 0.0))
  xla_bytes = float(cost.get("bytes accessed", 0.0))
  # One rendering and one parse of the cost program's HLO (megabytes for a 1B model) serve the loop
  # weights, the kernel model, the HBM count and the summaries.
  computations = hlo.computations(cost_program.as_text())
  # XLA counts each loop body once: every instruction's FLOPs are added again for its further iterations.
  weights, trips = hlo_cost.loop_weights(computations)
  repeated = any(runs > 1 for runs in weights.values())
  loop_flops = hlo_cost.repeated_flops(computations, weights)
  kernels = splash_kernels(computations, sliding_window=sliding_window, weights=weights)
  kernel_flops = sum(flop for _, flop, _ in kernels)
  try:
    traffic = list(_top_level_traffic(computations, weights)) + [
        (f"{name} (modelled)", moved, "attention kernel") for name, _, moved in kernels
    ]
    hbm_bytes, bytes_name = float(sum(moved for _, moved, _ in traffic)), "HBM bytes"
    movers, top = hbm_movers(traffic), top_instructions(traffic, top=12)
  except Exception:  # noqa: BLE001 - HLO text formats change; XLA's all-memory count is then an upper bound
    hbm_bytes, bytes_name, movers, top = xla_bytes, "XLA bytes (all memory spaces: the HBM count failed)", [], []
  optimal = cost.get("optimal_seconds")
  peak = chip.peak_flops
  compute_s, memory_s = (xla_flops + loop_flops + kernel_flops) / peak, hbm_bytes / chip.hbm_bandwidth
  # XLA's own estimate prices each loop body once and no kernel.
  if not kernels and not repeated and optimal is not None and math.isfinite(optimal) and optimal > 0:
    step_s, source = float(optimal), "XLA optimal_seconds"
  else:
    kernel_terms = " + splash kernels' modelled FLOPs" if kernels else ""
    loop_terms = " + loop bodies' further iterations" if repeated else ""
    step_s = max(compute_s, memory_s)
    source = f"roofline max((XLA flops{loop_terms}{kernel_terms}) / peak, {bytes_name} / HBM bandwidth), " + (
        "compute-bound" if compute_s >= memory_s else "memory-bound"
    )
  analytic_per_chip = analytic_flops / topology.chips
  return {
      "hbm_movers": movers,
      "top_instructions": top,
      # The cost program's while loops; those whose trip count is unknown are counted once (undercounted).
      **_loops(computations, trips),
      "compile_s": compile_s,
      "memory": {
          **{f"{k}_bytes": v for k, v in mem.items()},
          "total_bytes": total,
          "peak_bytes": int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
      },
      "hbm_bytes": chip.hbm_bytes,
      "fits": total <= chip.hbm_bytes,
      "headroom_bytes": chip.hbm_bytes - total,
      "xla_flops_per_chip": xla_flops,
      # What XLA's count misses of loop bodies run more than once (each iteration after the first).
      "loop_flops_per_chip": loop_flops,
      # Splash kernel calls (a loop's counted once) and their modelled work, which XLA's numbers lack.
      "splash_kernel_calls": len(kernels),
      "splash_kernel_flops_per_chip": kernel_flops,
      "splash_kernel_bytes_per_chip": float(sum(moved for _, _, moved in kernels)),
      # XLA's count includes every VMEM prefetch and VMEM read; the HBM count is what the roofline uses.
      "xla_bytes_accessed_per_chip": xla_bytes,
      "hbm_bytes_accessed_per_chip": hbm_bytes,
      "xla_optimal_seconds": optimal,
      "analytic_flops": analytic_flops,
      "analytic_flops_per_chip": analytic_per_chip,
      "estimated_step_s": step_s,
      "estimate_source": source,
      "roofline_compute_s": compute_s,
      "roofline_hbm_s": memory_s,
      # One read of every argument (weights, optimiser state or cache): the least HBM traffic there is.
      "min_traffic_s": mem["argument"] / chip.hbm_bandwidth,
      "estimated_mfu": analytic_per_chip / (step_s * peak) if step_s > 0 else 0.0,
  }


def out_of_memory(message: str, topology: Topology, analytic_flops: float, compile_s: float) -> dict[str, Any]:
  """The report of a program XLA refused for lack of HBM ('Ran out of memory on HBM ... (404.21G) ...')."""
  first = message.strip().splitlines()[0]
  found = re.search(r"required for [^(]*\(([\d.]+)([KMGT])\)", first)
  required = float(found.group(1)) * 2 ** (10 * "KMGT".index(found.group(2)) + 10) if found else None
  return {
      "compile_s": compile_s,
      "fits": False,
      "error": first,
      "hbm_bytes": topology.chip.hbm_bytes,
      "memory": {"total_bytes": int(required) if required else None},
      "headroom_bytes": topology.chip.hbm_bytes - int(required) if required else None,
      "analytic_flops": analytic_flops,
      "analytic_flops_per_chip": analytic_flops / topology.chips,
  }


# The twin's compile: XLA's TPU compiler otherwise turns FSDP's all-gather + matmul (and matmul +
# reduce-scatter) into 'windowed einsum' while loops, which its cost analysis again counts once.
TWIN_COMPILER_OPTIONS = {
    "xla_tpu_enable_windowed_einsum_for_all_gather": False,
    "xla_tpu_enable_windowed_einsum_for_reduce_scatter": False,
}


PROGRAM_COSTS = "program itself, each loop body weighted by its trip count"


def loop_weighted_flops(compiled) -> float:
  """The compiled program's FLOPs per chip with every loop iteration counted: XLA's count (each loop body
  once) plus each body's FLOPs (`hlo_cost.flops`) for its further iterations (`hlo_cost.loop_weights`)."""
  computations = hlo.computations(compiled.as_text())
  weights, _ = hlo_cost.loop_weights(computations)
  return float(_cost_dict(compiled).get("flops", 0.0)) + hlo_cost.repeated_flops(computations, weights)


def twin_costs_from(twin_config: ml_collections.ConfigDict) -> str:
  """A report's `costs_from` when its FLOPs, bytes and estimates come from the cost twin `twin_config`."""
  attention_impl = twin_config.model.decoder.attention_impl
  kernel = "einsum attention" if attention_impl == "xla" else "splash attention, its kernels' work modelled"
  if twin_config.model.decoder.scan_layers:
    return f"scanned twin (layers scanned, each loop body weighted by its trip count, {kernel}, one microbatch)"
  return f"loop-free twin (layers unrolled, {kernel}, one microbatch; XLA's cost analysis counts a loop body once)"


def cost_twin_config(
    config: ml_collections.ConfigDict, attention_impl: str | None = None, unroll: bool = True
) -> ml_collections.ConfigDict | None:
  """The config of the program's loop-free twin, whose costs count every FLOP and byte: layers unrolled,
  one microbatch (same global batch), the decoder's attention `attention_impl` ('xla': the einsum, every
  FLOP and byte seen by XLA; 'splash': the kernel, no loop either, its work modelled by `splash_kernels`;
  None: splash where the program runs splash, else the einsum); the ViT's splash where both the twin's
  decoder and the program's ViT run it, else the einsum; None when the program has no such loop.
  `unroll=False`: the same twin with its layers still scanned (a smaller compile, for a model whose
  unrolled twin outgrows the compiling machine's memory), its costs counted through the loops' trip
  counts."""
  decoder, vision = config.model.decoder, config.model.get("vision")
  attention_impl = attention_impl or ("splash" if decoder.attention_impl == "splash" else "xla")
  if attention_impl not in ("xla", "splash"):
    raise AotInputError(f"a loop-free twin's attention is 'xla' or 'splash', got {attention_impl!r}")
  kernels = {decoder.attention_impl} | ({vision.attention_impl} if vision else set())
  if not (decoder.scan_layers or kernels & {"blocked", "splash"} or config.train.microbatches > 1):
    return None
  twin = copy.deepcopy(config)
  with twin.unlocked():
    twin.model.decoder.scan_layers = config.model.decoder.scan_layers and not unroll
    twin.model.decoder.attention_impl = attention_impl
    if vision:
      both_splash = attention_impl == "splash" and vision.attention_impl == "splash"
      twin.model.vision.attention_impl = "splash" if both_splash else "xla"
    twin.train.microbatches = 1
  return twin


def compile_for_topology(
    config: ml_collections.ConfigDict,
    topology: str | Topology,
    num_slices: int = 1,
    what: Sequence[str] = PROGRAMS,
    decode_batch: int | None = None,
    new_tokens: int = 128,
    unrolled_costs: bool = False,
    compiler_options: dict[str, Any] | None = None,
    twin_attention: str | None = None,
) -> dict[str, Any]:
  """Compiles the `what` programs of `config` for the TPU topology; returns the report (see module doc).

  XLA's cost analysis counts a while loop's body once: a scanned decoder reports one layer of L, the
  blocked attention one tile. By default the program's own costs are used, each loop body weighted by its
  trip count (`hlo_cost.loop_weights`; the estimate is then the roofline). With `unrolled_costs`, a
  program with loops is compiled a second time as its loop-free twin (`cost_twin_config`) and the FLOPs,
  bytes and step-time estimate come from it (the same math, attention as one einsum or as splash with its
  work modelled; XLA's own estimate where valid); memory and fit stay those of the real program, whose
  loop-weighted FLOPs are reported next to the twin's.
  `compiler_options` (XLA/libtpu flags) apply to the program's own compile, e.g. TWIN_COMPILER_OPTIONS
  when `config` is itself a cost twin compiled on its own. `twin_attention`: the twin's decoder attention
  ('xla', 'splash': the TPU kernel, its work modelled; None: the program's own if splash; see
  `cost_twin_config`).
  """

  unknown = sorted(set(what) - set(PROGRAMS))
  if unknown:
    raise AotInputError(f"unknown program(s) {unknown}; expected some of {PROGRAMS}")
  model_cfg = config_utils.model_config(config)
  towers = (model_cfg.decoder, model_cfg.vision) if model_cfg.vision else (model_cfg.decoder,)
  if "cpu_flash" in (tower.attention_impl for tower in towers):
    raise AotInputError(
        "attention impl 'cpu_flash' is a kernel for XLA:CPU and cannot be compiled for a TPU: set the config's "
        "decoder and vision attention_impl to 'xla', 'blocked' or 'splash'"
    )
  if "cpu" in (part.dense_impl for part in (*towers, model_cfg.projector)):
    raise AotInputError(
        "dense_impl 'cpu' is a kernel for XLA:CPU and cannot be compiled for a TPU: set the config's decoder, "
        "vision and projector dense_impl to 'xla'"
    )
  topo = topology if isinstance(topology, Topology) else parse_topology(topology, num_slices)
  devices = topology_devices(topo)
  mesh = sharding.make_mesh(tuple(config.sharding.mesh_shape), devices=devices)
  model = LLVM(model_cfg)
  cfg = model.config
  rows, seq_len = config.data.global_batch_size, config.data.seq_len
  images = 1 if cfg.vision is not None else 0  # synthetic_batch: one image per row
  num_vision = images * cfg.tokens_per_image
  max_len = seq_len + new_tokens
  decode_rows = decode_batch or rows
  report: dict[str, Any] = {
      "topology": topo.name,
      "num_slices": topo.num_slices,
      "chips": topo.chips,
      "device_kind": devices[0].device_kind,
      "hbm_bytes_per_chip": topo.chip.hbm_bytes,
      "peak_flops_per_chip": topo.chip.peak_flops,
      "hbm_bandwidth_per_chip": topo.chip.hbm_bandwidth,
      "mesh": dict(mesh.shape),
      "strategy": config.sharding.strategy,
      "remat": cfg.decoder.remat_policy,
      "scan_layers": cfg.decoder.scan_layers,
      "batch": rows,
      "seq_len": seq_len,
      "microbatches": config.train.microbatches,
      "decode_batch": decode_rows,
      "cache_len": max_len,
      "programs": {},
  }
  notes = []
  if config.sharding.strategy.startswith("fsdp") and mesh.shape["fsdp"] == 1 and topo.chips > 1:
    notes.append(
        f"strategy {config.sharding.strategy} on a mesh whose fsdp axis is 1: parameters and optimiser state "
        "are replicated on every chip (FSDP over all chips: --config.sharding.mesh_shape='(1,-1,1)')"
    )
  twin_config = cost_twin_config(config, twin_attention)
  twin = None
  if twin_config is not None and unrolled_costs:
    twin = (twin_config, LLVM(config_utils.model_config(twin_config)))
    report["costs_from"] = twin_costs_from(twin_config)
  elif twin_config is not None:
    report["costs_from"] = PROGRAM_COSTS
    if cfg.decoder.attention_impl == "splash":
      notes.append("splash attention is a Pallas custom call XLA's cost analysis does not see: its work is modelled")
  report["notes"] = notes

  def lower(name: str, config, model):
    if name == "train":
      return lower_train(config, model, mesh)
    if name == "prefill":
      return lower_prefill(config, model, mesh, max_len)
    return lower_decode(config, model, mesh, decode_rows, max_len)

  for name in what:
    if name == "train":
      analytic = rows * flops.train_flops_per_sample(cfg, seq_len, images)
    elif name == "prefill":
      analytic = rows * flops.forward_flops(cfg, seq_len, images)["total"]
    else:
      analytic = decode_rows * flops.decode_flops_per_token(cfg, max_len, num_vision)
    tick = time.perf_counter()
    try:
      with _quiet_stderr():
        compiled = lower(name, config, model).compile(compiler_options=compiler_options)
    except jax.errors.JaxRuntimeError as e:
      # XLA's TPU compiler itself refuses a program whose buffers exceed the chip's HBM.
      if "RESOURCE_EXHAUSTED" not in str(e):
        raise
      report["programs"][name] = out_of_memory(str(e), topo, analytic, time.perf_counter() - tick)
      continue
    compile_s = time.perf_counter() - tick
    cost_compiled = None
    if twin is not None:
      tick = time.perf_counter()
      try:
        with _quiet_stderr():
          cost_compiled = lower(name, *twin).compile(compiler_options=TWIN_COMPILER_OPTIONS)
      except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
          raise
        # The twin may not fit where the program does; its costs are then unknown.
        cost_compiled = None
        report["costs_from"] = f"{PROGRAM_COSTS} (its loop-free twin does not fit)"
    report["programs"][name] = analyse(compiled, topo, analytic, compile_s, cost_compiled, cfg.decoder.sliding_window)
    if cost_compiled is not None:
      report["programs"][name]["cost_compile_s"] = time.perf_counter() - tick
      report["programs"][name]["program_flops_per_chip"] = loop_weighted_flops(compiled)
  report["fits"] = all(p["fits"] for p in report["programs"].values())
  return report


# --- CLI -----------------------------------------------------------------------------------------


def _size(n: float) -> str:
  for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{n:.0f} B"


def _flop(n: float) -> str:
  for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
    if abs(n) >= scale:
      return f"{n / scale:.3f} {unit}"
  return f"{n:.0f} FLOP"


def _seconds(s: float) -> str:
  return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def format_report(report: dict[str, Any]) -> str:
  chips = report["chips"]
  lines = [
      f"{report['topology']} x {report['num_slices']} slice(s): {chips} x {report['device_kind']} "
      f"({_size(report['hbm_bytes_per_chip'])} HBM, {report['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s bf16, "
      f"{report['hbm_bandwidth_per_chip'] / 1e9:.0f} GB/s per chip); mesh {report['mesh']}, strategy "
      f"{report['strategy']}, remat {report['remat']}, scan_layers {report['scan_layers']}"
  ]
  if "costs_from" in report:
    lines.append(f"FLOPs, bytes and estimates from the {report['costs_from']}")
  lines += [f"NOTE: {note}" for note in report.get("notes", ())]
  shapes = {
      "train": f"batch {report['batch']} x {report['seq_len']} tokens, {report['microbatches']} microbatch(es)",
      "prefill": f"batch {report['batch']} x {report['seq_len']} tokens into {report['cache_len']} cache slots",
      "decode": f"batch {report['decode_batch']}, one token against {report['cache_len']} cache slots",
  }
  for name, p in report["programs"].items():
    if "error" in p:
      lines += [f"[{name}] {shapes[name]}: DOES NOT FIT, XLA refused it after {p['compile_s']:.1f} s: {p['error']}"]
      continue
    m = p["memory"]
    lines += [
        f"[{name}] {shapes[name]}: compiled in {p['compile_s']:.1f} s"
        + (f" (+ {p['cost_compile_s']:.1f} s for the loop-free twin)" if "cost_compile_s" in p else ""),
        f"  HBM per chip: arguments {_size(m['argument_bytes'])}, outputs {_size(m['output_bytes'])}, temporaries "
        f"{_size(m['temp_bytes'])}, generated code {_size(m['generated_code_bytes'])}, "
        f"aliased {_size(m['alias_bytes'])}",
        f"  total {_size(m['total_bytes'])} of {_size(p['hbm_bytes'])}: "
        + (
            f"fits, headroom {_size(p['headroom_bytes'])} ({p['headroom_bytes'] / p['hbm_bytes']:.0%})"
            if p["fits"]
            else f"DOES NOT FIT, {_size(-p['headroom_bytes'])} over"
        ),
        f"  FLOPs per chip: XLA {_flop(p['xla_flops_per_chip'])} (remat recompute, masked attention in full, "
        f"elementwise ops)"
        + (
            f" + {_flop(p['loop_flops_per_chip'])} of loop bodies' further iterations"
            if p.get("loop_flops_per_chip")
            else ""
        )
        + (
            f" (the program's own, loop-weighted: {_flop(p['program_flops_per_chip'])})"
            if "program_flops_per_chip" in p
            else ""
        )
        + f", analytic {_flop(p['analytic_flops_per_chip'])}; HBM bytes read and written "
        f"{_size(p['hbm_bytes_accessed_per_chip'])} (XLA's bytes accessed, VMEM traffic included: "
        f"{_size(p['xla_bytes_accessed_per_chip'])})",
        f"  ESTIMATED step time {_seconds(p['estimated_step_s'])} ({p['estimate_source']}), ESTIMATED MFU "
        f"{p['estimated_mfu']:.1%}; HBM roofline {_seconds(p['roofline_hbm_s'])}, compute roofline "
        f"{_seconds(p['roofline_compute_s'])}",
    ]
    if p.get("splash_kernel_calls"):
      lines.append(
          f"  splash kernels: {p['splash_kernel_calls']} calls, MODELLED {_flop(p['splash_kernel_flops_per_chip'])} "
          f"and {_size(p['splash_kernel_bytes_per_chip'])} per chip (in the estimate; XLA's counts omit them)"
      )
    if p.get("hbm_movers"):
      lines.append("  HBM bytes moved by: " + ", ".join(f"{kind} {_size(n)}" for kind, n in p["hbm_movers"][:5]))
    if p.get("cost_program_loops"):
      lines.append(
          f"  NOTE: {p['cost_program_loops']} while loop(s) of unknown trip count in the program the costs come from "
          f"({p.get('cost_program_loop_ops')}): each body counted once, so its FLOPs, bytes and the estimate are "
          "too low"
      )
    for name, moved, count in p.get("top_instructions", [])[:3]:
      lines.append(f"    {_size(moved)} in {count} instruction(s) of {name}")
  lines.append("all programs fit" if report["fits"] else "SOME PROGRAM DOES NOT FIT")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  try:
    report = compile_for_topology(
        f.config,
        f.topology,
        f.num_slices,
        [w for w in f.what.split(",") if w],
        f.decode_batch or None,
        f.new_tokens,
        f.unrolled_costs,
        twin_attention=None if f.twin_attention == "auto" else f.twin_attention,
    )
  except AotInputError as e:
    print(f"llvm_jax.aot: {e}", file=sys.stderr)
    sys.exit(2)
  report["command"] = "python -m llvm_jax.aot " + " ".join(sys.argv[1:])
  print(format_report(report))
  if f.json:
    with open(f.json, "w") as out:
      json.dump(report, out, indent=2, default=str)
  if not report["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py[:arg]).", lock_config=True)
  flags.DEFINE_string("topology", "v5e:2x2", "TPU topology: 'v5e:2x4' or an accelerator type ('v5e-8', 'v5p-8').")
  flags.DEFINE_integer("num_slices", 1, "Slices (multi-slice over DCN).")
  flags.DEFINE_string("what", ",".join(PROGRAMS), "Programs to compile: train, prefill, decode (comma-separated).")
  flags.DEFINE_integer("decode_batch", 0, "Rows of the decode step (0: data.global_batch_size).")
  flags.DEFINE_integer("new_tokens", 128, "Cache slots past the prompt (prefill and decode cache length).")
  flags.DEFINE_string("json", "", "Also write the report as JSON here.")
  flags.DEFINE_bool(
      "unrolled_costs",
      False,
      "Programs with loops (scanned layers, blocked attention, microbatches): take FLOPs, bytes and estimates "
      "from a second, loop-free twin compile (XLA's own estimate where valid) instead of the program's own "
      "costs with each loop body weighted by its trip count (a roofline).",
  )
  flags.DEFINE_enum(
      "twin_attention",
      "auto",
      ["auto", "xla", "splash"],
      "The loop-free twin's decoder attention: the einsum (XLA sees all its work; its (T, S) logits go through "
      "HBM), the splash kernel (kept on chip; its FLOPs and bytes modelled from its shapes and mask), or auto: "
      "splash where the program's decoder runs splash, else the einsum.",
  )
  flags.mark_flags_as_required(["config"])
  app.run(main)
