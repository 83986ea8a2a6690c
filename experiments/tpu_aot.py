"""What the models need on Cloud TPU, from ahead-of-time compiles on this machine (llvm_jax.aot; no TPU).

  python experiments/tpu_aot.py           # writes experiments/results/tpu_aot.md (hours on 2 cores)
  python experiments/tpu_aot.py --quick   # tiny stand-ins of every model, same tables: checks the script
  python experiments/tpu_aot.py --compile=1b & python experiments/tpu_aot.py --compile=7b   # both cores
  python experiments/tpu_aot.py --compile=  # the report from what is cached so far (missing rows marked)
  python experiments/tpu_aot.py --compile=1b --only=v5p-8   # only the missing compiles whose key matches

Every number comes from XLA's TPU compiler (libtpu) compiling the real programs for a deviceless
topology: HBM per chip from `memory_analysis()`, step times and MFU ESTIMATED from XLA's cost model
(`optimal_seconds`) or, where it gives none, the roofline of the compiled FLOPs and HBM bytes. Sections:
  1. The ~1B LLVM (configs/bench_1b.py: InternVL2-1B-like, batch 16 x 1024 tokens, bf16 compute, fp32
     master weights, remat full) with each technique, FSDP on v5e-8 (8 chips, one 2x4 host) and
     v5p-8 (Cloud TPU's name counts TensorCores: 4 chips, one 2x2x1 host): the train step.
  1b. The same with the decoder and the ViT on the splash kernel (p-MoD's MoD layers on their kept tokens,
     padded to whole tiles), costed by a twin that keeps the kernel and models its work
     (`aot.splash_kernels`; `--compile=splash`).
  2. The paper-scale 7B models of configs/paper.py at SFT shapes (global batch 128, 2048 tokens, one
     image per sample, the SFT stage's freeze rules): the smallest v5e and v5p slice of 8 ... 256
     chips whose train step fits, trying FSDP, FSDP with 4 microbatches, FSDP + 4-way tensor
     parallelism (remat full); the search compiles the scanned programs only (memory).
  3. The decode step (1B on v5e-8, weights replicated: 16 rows against 1152 cache slots): estimated
     time against the HBM roofline of its compiled bytes and against one read of its arguments.
  4. p-MoD against its dense model: estimated step times next to the analytic FLOPs (paper: 58.7%), for
     the train steps above and for the prefill at the paper's inference shape (16 rows of one image and
     a 64-token prompt, weights replicated: the 1B on v5e-8, LLaVA-1.5-7B on v5p-8).
Layers are scanned with the blocked attention, as bench_1b runs them. XLA's cost analysis counts a loop
body once (one layer of the scan, one tile of the attention), so every estimate comes from the program's
loop-free twin (`aot.cost_twin_config`: layers unrolled, einsum attention, one microbatch), the memory
from the real program: two compiles per row. Where the unrolled twin outgrows this machine's 24 GiB
(--scanned_twins: all_four's 1B train steps), the twin keeps its layers scanned and its costs count every
iteration through the loops' trip counts (`llvm_jax/hlo_cost.py`; on a tiny model, FLOPs within 0.03%
of the unrolled twin's). The 7B train steps (--program_costs), whose unrolled twins need more than
24 GiB, are costed by the programs themselves the same way (a tiny p-MoD model's program, blocked attention
and all: FLOPs 1.6% above its loop-free twin's). Each compile is cached in experiments/results/tpu_aot.jsonl
(keyed by its settings; committed with the report, since a fresh checkout would otherwise compile for
hours again), so an interrupted run resumes where it stopped. Each compile runs in its own process; one
that dies (killed for host memory) is reported as failed, and compiled again only with --retry_crashed.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only; set before jax is imported

import argparse  # noqa: E402
import concurrent.futures  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import bench_1b, paper  # noqa: E402
from llvm_jax import aot, config_utils  # noqa: E402

TECHNIQUES = ("baseline", "trol", "phantom", "deepstack", "pmod", "all_four")
# Compile order: what the targets need first (the baseline's MFU, p-MoD against it).
COMPILE_ORDER = ("baseline", "pmod", "trol", "phantom", "deepstack", "all_four")
PAPER_7B = {
    "llava15_7b": "LLaVA-1.5-7B",
    "pmod_llava15_7b": "p-MoD-LLaVA-1.5-7B",
    "deepstack_l_7b": "DeepStack-L-7B",
    "trol_7b": "TroL-7B-like",
    "phantom_7b": "Phantom-7B-like",
}
# Quick mode: the bench_1b tiny model with the matching technique stands in for each 7B model.
QUICK_TECHNIQUE = {
    "llava15_7b": "baseline",
    "pmod_llava15_7b": "pmod",
    "deepstack_l_7b": "deepstack",
    "trol_7b": "trol",
    "phantom_7b": "phantom",
}
PMOD_DENSE_REFERENCE = ("llava15_7b", "v5p")  # section 4's 7B pair runs on this model's slice
PAPER_PMOD_FLOPS = 0.587  # p-MoD-LLaVA-1.5-7B's TFLOPs against LLaVA-1.5-7B (p-MoD paper)
TARGETS = {"mfu_1b_v5e": 0.50, "pmod_step_ratio": 0.65, "decode_of_roofline": 0.70}
OUT = os.path.join(REPO, "experiments", "results", "tpu_aot.md")
CACHE = os.path.join(REPO, "experiments", "results", "tpu_aot.jsonl")


@dataclasses.dataclass
class Plan:
  quick: bool
  one_b_topologies: tuple[str, ...] = ("v5e-8", "v5p-8")
  one_b_shape: tuple[int, int] = (16, 1024)  # batch, seq_len
  paper_shape: tuple[int, int] = (128, 2048)
  chips: tuple[int, ...] = (8, 16, 32, 64, 128, 256)
  tensor_parallel: int = 4
  decode_rows: int = 16
  new_tokens: int = 128
  prompt_tokens: int = 64  # the text after the image in section 4's prefill (the paper's inference shape)

  @classmethod
  def make(cls, quick: bool) -> Plan:
    if quick:
      return cls(True, one_b_shape=(16, 128), paper_shape=(16, 128), chips=(4, 8), tensor_parallel=2, new_tokens=32)
    return cls(False)


# --- Configs -------------------------------------------------------------------------------------


def _finish(config, strategy: str, tp: int, microbatches: int, attention: str = "blocked"):
  """The sharding: 'dp' replicates the weights, 'fsdp' shards them over every chip, 'fsdp_tp' adds `tp`-way
  tensor parallelism. Layers scanned, the decoder's attention `attention`: the blocked (online-softmax)
  kernel, as bench_1b runs, or splash (section 1b)."""
  config.sharding.strategy = strategy
  config.sharding.mesh_shape = (-1, 1, 1) if strategy == "dp" else (1, -1, tp if strategy == "fsdp_tp" else 1)
  config.train.microbatches = microbatches
  config.model.decoder.scan_layers = True
  config.model.decoder.attention_impl = attention
  if config.model.get("vision"):
    # On splash, the ViT too (its 1025 tokens padded to 1152). Otherwise the ViT's einsum, as every cached
    # program was compiled before the ViT had a kernel switch (its temporaries are an upper bound for the
    # blocked kernel's; the twins use the einsum anyway).
    config.model.vision.attention_impl = "splash" if attention == "splash" else "xla"
  config.lock()
  return config


def one_b_config(plan: Plan, technique: str, strategy: str = "fsdp", attention: str = "blocked"):
  batch, seq = plan.one_b_shape
  config = bench_1b.get_config(
      f"technique={technique},batch={batch},seq_len={seq},remat=full,size={'tiny' if plan.quick else '1b'}"
  )
  config.unlock()
  return _finish(config, strategy, 1, 1, attention)


def prefill_config(plan: Plan, model: str):
  """Section 4's prefill, the shape of the paper's inference FLOPs: `plan.decode_rows` rows of one image and
  a `plan.prompt_tokens`-token prompt, weights replicated. `model`: a 1B technique or a PAPER_7B name."""
  config = one_b_config(plan, model, "dp") if model in TECHNIQUES else paper_config(plan, model, "dp", 1)
  tokens = config_utils.model_config(config).tokens_per_image
  with config.unlocked():
    config.data.update(global_batch_size=plan.decode_rows, seq_len=tokens + plan.prompt_tokens)
  return config


def paper_config(plan: Plan, name: str, strategy: str, microbatches: int):
  batch, seq = plan.paper_shape
  if plan.quick:
    config = bench_1b.get_config(f"technique={QUICK_TECHNIQUE[name]},batch={batch},seq_len={seq},remat=full,size=tiny")
    config.unlock()
  else:
    model = config_utils.with_precision(paper.MODELS[name](), "bfloat16", "float32", "full")
    config = config_utils.experiment(model, task="train", lock=False)
    config_utils.set_stage(config, "sft")
    config.data.update(global_batch_size=batch, seq_len=seq)
  return _finish(config, strategy, plan.tensor_parallel, microbatches)


# --- Compiles, cached ----------------------------------------------------------------------------


def _compile_program(config, topology: str, what: tuple[str, ...], kwargs: dict) -> dict[str, Any]:
  return aot.compile_for_topology(config, topology, what=what, **kwargs)


class Runner:
  """Runs `aot.compile_for_topology`, each compile in a fresh process (a 1B twin holds ~10 GiB of host
  memory, which a long-lived process would keep growing from; an out-of-memory kill takes only that compile),
  caching each result by its key in a JSON-lines file."""

  def __init__(
      self,
      cache_path: str,
      refresh: bool,
      compile_missing: bool = True,
      retry_crashed: bool = False,
      only: str | None = None,
      scanned_twins: str | None = None,
      program_costs: str | None = None,
  ):
    self.path = cache_path
    self.compile_missing = compile_missing
    self.only = re.compile(only) if only else None  # compile only the missing keys it matches
    self.retry_crashed = retry_crashed
    # Rows (their keys) costed by a scanned twin: the unrolled one outgrows this machine's memory.
    self.scanned_twins = re.compile(scanned_twins) if scanned_twins else None
    # Rows (their keys) costed by the program itself, loop-weighted: no twin of theirs compiles here.
    self.program_costs = re.compile(program_costs) if program_costs else None
    self.pending: list[str] = []  # keys looked up but neither cached nor compiled
    self.done: dict[str, Any] = {}
    if os.path.exists(cache_path) and not refresh:
      with open(cache_path) as f:
        for line in f:
          entry = json.loads(line)
          if "report" in entry and not (retry_crashed and entry["report"].get("crashed")):
            self.done[entry["key"]] = entry["report"]
    self.compile_s = 0.0

  def compiles(self, key: str) -> bool:
    """Whether this run compiles `key` when the cache lacks it."""
    return self.compile_missing and (self.only is None or self.only.search(key) is not None)

  def __call__(self, key: str, config, topology: str, what: tuple[str, ...], **kwargs) -> dict[str, Any]:
    """`aot.compile_for_topology(config, topology, what, **kwargs)`, cached under `key`."""
    if key in self.done:
      return self.done[key]
    if not self.compiles(key):
      self.pending.append(key)
      return {"pending": True, "fits": None, "programs": {}}
    print(f"compiling {key} ...", flush=True)
    tick = time.perf_counter()
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
      # A process that cannot start (a caller without the __main__ guard) is no compile result: raised, not cached.
      future = pool.submit(_compile_program, config, topology, what, kwargs)
      try:
        report = future.result()
      except concurrent.futures.process.BrokenProcessPool:
        report = {"error": "the compiling process died (killed: out of host memory?)", "crashed": True, "programs": {}}
      except Exception as e:  # noqa: BLE001 - recorded in the tables; the other compiles still run
        traceback.print_exc()
        report = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}", "fits": False, "programs": {}}
    report["wall_s"] = time.perf_counter() - tick
    self.compile_s += report["wall_s"]
    print(f"  {report['wall_s']:.0f} s, fits={report.get('fits')}", flush=True)
    self.done[key] = report
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    with open(self.path, "a") as f:
      f.write(json.dumps({"key": key, "report": report}, default=str) + "\n")
    return report

  def memory(self, key: str, config, topology: str, what: tuple[str, ...], **kwargs) -> dict[str, Any]:
    """The real program alone: memory, fit and its own costs. Its compile under PROGRAM_COSTS_KEY (the same
    program, loop-weighted costs: see `row`) is used where cached, for whichever section asks."""
    costed = self.done.get(f"{key}:{PROGRAM_COSTS_KEY}")
    if costed is not None and "error" not in costed:
      return costed
    return self(f"{key}:twin=False", config, topology, what, unrolled_costs=False, **kwargs)

  def row(
      self,
      key: str,
      config,
      topology: str,
      what: tuple[str, ...],
      twin_attention: str = "xla",
      scanned: bool | None = None,
      **kwargs,
  ) -> dict[str, Any]:
    """The real program's memory and fit with the FLOPs, bytes and estimates of its loop-free twin (its
    decoder attention `twin_attention`: see `aot.cost_twin_config`): two compiles, cached apart (a resumed
    run keeps either), merged here. `scanned`: a twin with its layers scanned (None: where `scanned_twins`
    matches the key)."""
    report = self.memory(key, config, topology, what, **kwargs)
    if self.program_costs is not None and self.program_costs.search(key):
      return self._program_costed(key, report, config, topology, what, **kwargs)
    if scanned is None:
      scanned = self.scanned_twins is not None and self.scanned_twins.search(key) is not None
    twin_config = aot.cost_twin_config(config, twin_attention, unroll=not scanned)
    if report.get("pending") or not report.get("fits") or twin_config is None:
      return report
    twin_key, old_key = f"{key}:{SCANNED_TWIN_KEY if scanned else TWIN_KEY}", f"{key}:costs=loop-free"
    if twin_key not in self.done and old_key in self.done:
      # Compiled before HBM bytes were counted (its roofline says so): kept unless this run compiles it
      # again; one that died is compiled again only with --retry_crashed, as any other.
      if not self.compiles(twin_key) or (self.done[old_key].get("crashed") and not self.retry_crashed):
        twin_key = old_key
    twin = self(
        twin_key,
        twin_config,
        topology,
        what,
        unrolled_costs=False,
        compiler_options=aot.TWIN_COMPILER_OPTIONS,
        **kwargs,
    )
    if twin.get("pending"):
      return {**report, "costs_pending": True}
    merged = json.loads(json.dumps(report))
    merged["costs_from"] = aot.twin_costs_from(twin_config)
    merged["wall_s"] = report.get("wall_s", 0.0) + twin.get("wall_s", 0.0)
    for name, program in merged["programs"].items():
      costs = (twin.get("programs") or {}).get(name)
      if not costs or "error" in costs:
        merged["twin_error"] = (costs or twin).get("error", "?")
        merged["costs_from"] = f"program itself (its loop-free twin failed: {merged['twin_error']})"
        continue
      program.update({field: costs[field] for field in COST_FIELDS if field in costs})
      program["cost_compile_s"] = costs["compile_s"]
    return merged

  def _program_costed(self, key: str, report: dict, config, topology: str, what: tuple[str, ...], **kwargs) -> dict:
    """The program's own report, its costs loop-weighted (`aot.PROGRAM_COSTS`). A program cached before
    loops were weighted (each loop body counted once) is compiled again under its own key."""
    if report.get("pending") or not report.get("fits") or _program_costs(report):
      return report
    costed = self(f"{key}:{PROGRAM_COSTS_KEY}", config, topology, what, unrolled_costs=False, **kwargs)
    return {**report, "costs_pending": PROGRAM_COSTS_KEY} if costed.get("pending") else costed


# The cache key of a loop-free twin; 'hbm': its bytes are the HBM traffic counted by memory space (older
# twins, keyed 'costs=loop-free', have XLA's all-memory 'bytes accessed' in their roofline).
TWIN_KEY = "costs=loop-free:hbm"
SCANNED_TWIN_KEY = "costs=scanned:loops"
PROGRAM_COSTS_KEY = "costs=program:loops"  # a program compiled again for its loop-weighted costs
# Rows (cache keys) costed by a scanned twin by default: all_four's 1B train steps, einsum and splash.
SCANNED_TWINS = r"1b:\w+:all_four:.*:train(:splash\+vit)?$"
SCANNED_BASIS = "baseline, scanned twin"  # section 1's extra row where some technique's twin is scanned
# Fields of `aot.analyse` that come from the cost analysis (the rest: memory, from the real program).
COST_FIELDS = (
    "hbm_movers",
    "top_instructions",
    "xla_flops_per_chip",
    "xla_bytes_accessed_per_chip",
    "hbm_bytes_accessed_per_chip",
    "xla_optimal_seconds",
    "estimated_step_s",
    "estimate_source",
    "roofline_compute_s",
    "roofline_hbm_s",
    "estimated_mfu",
    "loop_flops_per_chip",
    "loop_trip_counts",
    "cost_program_loops",
    "cost_program_loop_ops",
    "splash_kernel_calls",
    "splash_kernel_flops_per_chip",
    "splash_kernel_bytes_per_chip",
)


# --- The sections --------------------------------------------------------------------------------


def section_one_b(plan: Plan, run: Runner) -> dict[tuple[str, str, str], dict]:
  """Train steps (FSDP) on each topology; decode steps on the first with the weights replicated (DP), as a
  server holds a 1B model (FSDP would all-gather every weight for every token). Compiled in the order the
  targets need them, quickest first: the decode steps (seconds each), the first topology's train steps,
  then the other topologies. Keyed (technique, topology, 'train' or 'decode')."""
  results = {}
  first = plan.one_b_topologies[0]

  def train(topology: str) -> None:
    keys = {
        technique: f"1b:{plan.quick}:{technique}:{topology}:{plan.one_b_shape}:train" for technique in COMPILE_ORDER
    }
    for technique, key in keys.items():
      results[(technique, topology, "train")] = run.row(key, one_b_config(plan, technique), topology, ("train",))
    _scanned_basis(run, results, keys, one_b_config(plan, "baseline"), topology)

  for technique in COMPILE_ORDER:
    key = f"1b:{plan.quick}:{technique}:{first}:{plan.one_b_shape}:decode:{plan.decode_rows}:{plan.new_tokens}"
    results[(technique, first, "decode")] = run.row(
        key,
        one_b_config(plan, technique, "dp"),
        first,
        ("decode",),
        decode_batch=plan.decode_rows,
        new_tokens=plan.new_tokens,
    )
  for topology in plan.one_b_topologies:
    train(topology)
  return results


def section_one_b_splash(plan: Plan, run: Runner) -> dict[tuple[str, str, str], dict]:
  """Section 1's train steps with the decoder on the splash kernel, costed by a splash twin (its kernels'
  work modelled: `aot.splash_kernels`). The baseline on every topology first (the MFU target), then the
  other techniques. Keyed as section 1."""
  results = {}
  order = [("baseline", t) for t in plan.one_b_topologies]
  order += [(technique, t) for t in plan.one_b_topologies for technique in COMPILE_ORDER[1:]]
  key = lambda technique, topology: f"1b:{plan.quick}:{technique}:{topology}:{plan.one_b_shape}:train:splash+vit"
  for technique, topology in order:
    config = one_b_config(plan, technique, attention="splash")
    results[(technique, topology, "train")] = run.row(
        key(technique, topology), config, topology, ("train",), twin_attention="splash"
    )
  for topology in plan.one_b_topologies:
    keys = {technique: key(technique, topology) for technique in COMPILE_ORDER}
    config = one_b_config(plan, "baseline", attention="splash")
    _scanned_basis(run, results, keys, config, topology, twin_attention="splash")
  return results


def _scanned_basis(run: Runner, results: dict, keys: dict[str, str], baseline_config, topology: str, **kwargs) -> None:
  """Where some technique's row (`keys`: technique -> cache key) is costed by a scanned twin, the baseline
  costed the same way, as the row SCANNED_BASIS: the basis to compare those rows with (a scanned twin's HBM
  bytes differ from the unrolled twin's with the compiled form)."""
  if run.scanned_twins is not None and any(run.scanned_twins.search(key) for key in keys.values()):
    results[(SCANNED_BASIS, topology, "train")] = run.row(
        keys["baseline"], baseline_config, topology, ("train",), scanned=True, **kwargs
    )


def _candidates(plan: Plan, chips: int) -> list[tuple[str, int]]:
  """(strategy, microbatches) to try on `chips` chips, in order: FSDP, FSDP with 4 microbatches (a quarter
  of the activations live at once), FSDP + tensor parallelism; each microbatch must split over the data axes."""
  batch = plan.paper_shape[0]
  out = []
  for strategy, microbatches in (("fsdp", 1), ("fsdp", 4), ("fsdp_tp", 1)):
    data = chips // (plan.tensor_parallel if strategy == "fsdp_tp" else 1)
    if batch % microbatches == 0 and (batch // microbatches) % data == 0:
      out.append((strategy, microbatches))
  return out


def _required_bytes(report: dict) -> float | None:
  p = (report.get("programs") or {}).get("train") or {}
  return (p.get("memory") or {}).get("total_bytes")


def _fit_on(plan: Plan, run: Runner, name: str, generation: str, chips: int, entry: dict) -> tuple[str, float | None]:
  """Tries the candidates of `chips` chips in order, each recorded in entry['tried'], the first that fits
  as the entry's slice. Returns 'fits', 'refused' or 'pending', and the smallest bytes x chips that a refused
  candidate needed (None if none said)."""
  hbm = aot.CHIPS[generation].hbm_bytes
  topology = aot.topology_for_chips(generation, chips).name
  needed_total = None
  for strategy, microbatches in _candidates(plan, chips):
    key = f"7b:{plan.quick}:{name}:{topology}:{strategy}:{microbatches}:{plan.paper_shape}"
    config = paper_config(plan, name, strategy, microbatches)
    report = run.memory(key, config, topology, ("train",))
    if report.get("pending"):
      return "pending", needed_total
    entry["tried"].append((topology, strategy, microbatches, report))
    if report.get("fits"):
      entry.update(
          topology=topology,
          strategy=strategy,
          microbatches=microbatches,
          report=report,
          chips=chips,
          key=key,
          config=config,
      )
      return "fits", needed_total
    needed = _required_bytes(report)
    if needed:
      needed_total = needed * chips if needed_total is None else min(needed_total, needed * chips)
      if needed > 1.5 * hbm:
        break  # far over: the other strategies will not close the gap on this size
  return "refused", needed_total


def section_paper(
    plan: Plan,
    run: Runner,
    names=tuple(PAPER_7B),
    start: dict[str, int] | None = None,
    step_times: re.Pattern | None = None,
) -> dict[tuple[str, str], dict]:
  """The smallest slice (and the first strategy) each 7B model's train step fits on, per generation.

  The search goes up from `start[generation]` chips (default: the fewest) until a size fits. A refused
  compile reports the bytes it needed (R on c chips): sizes where R·c/c' is still over 1.5x the chip's HBM
  are skipped (microbatches and tensor parallelism cut activations, not that much). Where the first size
  tried fits, the search goes down instead, while a size fits: a model that fits on no strategy of c chips
  fits on none of fewer. `start`: where the dense reference fit, for the other 7B models (the same ~7B
  LLM, plus their technique): a compile of the fewest chips, which cannot hold them, is then not spent.
  The search compiles the scanned programs only (memory). The slice found then gets a step-time estimate
  (`Runner.row`) for the dense reference of section 4 (LLaVA-1.5-7B on v5p) and for the rows whose
  'name:generation' `step_times` matches (e.g. 'trol_7b:v5p'; each a recompile of 5-25 minutes); the
  others show their memory only, or the estimate of such a recompile already in the cache.
  """
  found = {}
  for name in names:
    for generation in ("v5e", "v5p"):
      entry = found[(name, generation)] = {"tried": []}
      hbm = aot.CHIPS[generation].hbm_bytes
      first = plan.chips.index((start or {}).get(generation, plan.chips[0]))
      outcome, lower_bound = _fit_on(plan, run, name, generation, plan.chips[first], entry)
      if outcome == "fits":
        for chips in reversed(plan.chips[:first]):
          outcome, _ = _fit_on(plan, run, name, generation, chips, entry)
          if outcome != "fits":
            break
      elif outcome == "refused":
        for chips in plan.chips[first + 1 :]:
          if lower_bound is not None and lower_bound / chips > 1.5 * hbm:
            continue
          outcome, needed = _fit_on(plan, run, name, generation, chips, entry)
          if needed is not None:
            lower_bound = needed if lower_bound is None else min(lower_bound, needed)
          if outcome != "refused":
            break
      if outcome == "pending":
        entry["pending"] = True
      elif "report" in entry and (
          (name, generation) == PMOD_DENSE_REFERENCE or (step_times and step_times.search(f"{name}:{generation}"))
      ):
        entry["report"] = run.row(entry["key"], entry["config"], entry["topology"], ("train",))
  return found


# --- The report ----------------------------------------------------------------------------------


def _gib(n) -> str:
  return "–" if n is None else f"{n / 2**30:.2f}"


def _ms(s) -> str:
  return "–" if s is None else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def _program(report: dict, name: str) -> dict | None:
  return (report.get("programs") or {}).get(name)


def _compile_time(p: dict) -> str:
  twin = f" + {p['cost_compile_s']:.0f} s twin" if "cost_compile_s" in p else ""
  return f"{p['compile_s']:.0f} s{twin}"


def _xla_estimate(p: dict) -> bool:
  """Whether the estimate is XLA's own (optimal_seconds), not the roofline it falls back to."""
  return p.get("estimate_source", "").startswith("XLA")


def _roofline_s(p: dict) -> float:
  """The roofline of a costed program: compute and HBM traffic fully overlapped, at peak."""
  return max(p["roofline_compute_s"], p["roofline_hbm_s"])


def _bound(p: dict) -> str:
  """A roofline's two terms and which one sets it, e.g. 'compute 2.31 s, HBM 6.23 s (memory-bound)'."""
  bound = "memory" if p["roofline_hbm_s"] > p["roofline_compute_s"] else "compute"
  return f"compute {_ms(p['roofline_compute_s'])}, HBM {_ms(p['roofline_hbm_s'])} ({bound}-bound)"


def _source(p: dict) -> str:
  hbm_counted = "hbm_bytes_accessed_per_chip" in p
  if _xla_estimate(p):
    # Rows on the two chip models are not comparable: the roofline goes alongside XLA's estimate.
    source = f"XLA (roofline {_ms(_roofline_s(p))}{'' if hbm_counted else ', XLA bytes'})"
  else:
    source = "roofline" if hbm_counted else "roofline (XLA bytes)"
  # Loops XLA's compiler put back into the twin: each body counted once, so the estimate is too low.
  loops = p.get("cost_program_loops")
  return f"{source} ({loops} loops left)" if loops else source


def section_pmod_7b(plan: Plan, run: Runner, paper_found: dict) -> dict | None:
  """p-MoD-LLaVA-1.5-7B on the slice and strategy where its dense model fits, costed as its dense model
  (`Runner.row`): a like-for-like step time for section 4. None until the dense model's search has found
  its slice and p-MoD's program is compiled (its costs may still be pending: `costs_pending`)."""
  dense_found = paper_found.get(PMOD_DENSE_REFERENCE, {})
  if "report" not in dense_found:
    return None
  key = (
      f"7b:{plan.quick}:pmod_llava15_7b:{dense_found['topology']}:{dense_found['strategy']}:"
      f"{dense_found['microbatches']}:{plan.paper_shape}"
  )
  config = paper_config(plan, "pmod_llava15_7b", dense_found["strategy"], dense_found["microbatches"])
  report = run.row(key, config, dense_found["topology"], ("train",))
  return None if report.get("pending") else report


# Section 4's prefill pairs: (label, dense model, p-MoD model, topology, compiled with which --compile section).
PREFILL_PAIRS = (
    ("~1B", "baseline", "pmod", "v5e-8", "1b"),
    ("LLaVA-1.5-7B", "llava15_7b", "pmod_llava15_7b", "v5p-8", "7b"),
)


def section_pmod_prefill(plan: Plan, run: Runner, sections: set[str]) -> dict[str, tuple]:
  """p-MoD's prefill against its dense model's at the paper's inference shape (`prefill_config`), where
  vision tokens are most of the sequence: {label: (dense report, p-MoD report, (rows, seq_len), topology)}.
  Pairs of a section this run does not compile come from the cache."""
  pairs = {}
  for label, dense, sparse, topology, section in PREFILL_PAIRS:
    run_compile, run.compile_missing = run.compile_missing, section in sections
    reports = []
    for model in (dense, sparse):
      config = prefill_config(plan, model)
      shape = (config.data.global_batch_size, config.data.seq_len)
      key = f"prefill:{plan.quick}:{model}:{topology}:{shape}:{plan.new_tokens}"
      reports.append(run.row(key, config, topology, ("prefill",), new_tokens=plan.new_tokens))
    run.compile_missing = run_compile
    pairs[label] = (reports[0], reports[1], shape, topology)
  return pairs


def _costed(one_b: dict, technique: str, topology: str, program: str) -> dict | None:
  """The program's report with every estimate field, or None (pending, failed, or its twin not compiled)."""
  return _costed_program(one_b.get((technique, topology, program), {}), program)


def _costed_program(report: dict, program: str) -> dict | None:
  p = _program(report, program)
  return p if p and "error" not in p and _has_costs(report) else None


def _executed_flops(p: dict) -> float:
  """The FLOPs per chip the estimate counts: XLA's, its loops' further iterations, the splash kernels'."""
  return p["xla_flops_per_chip"] + p.get("loop_flops_per_chip", 0.0) + p.get("splash_kernel_flops_per_chip", 0.0)


def _scanned(report: dict) -> bool:
  """Whether the costs come from a scanned twin (loop bodies weighted by their trip counts)."""
  return report.get("costs_from", "").startswith("scanned twin")


def _program_costs(report: dict) -> bool:
  """Whether the costs are the program's own, every loop body weighted by its trip count."""
  return report.get("costs_from", "").startswith(aot.PROGRAM_COSTS)


def _costing(report: dict) -> str:
  """A source cell's mark for costs that are not a loop-free twin's."""
  return " (scanned twin)" if _scanned(report) else " (program's own)" if _program_costs(report) else ""


def _has_costs(report: dict) -> bool:
  """Whether the report's estimates count every loop iteration: from the loop-free twin, a scanned twin
  or the program itself (loop bodies weighted by their trip counts), or a program without loops (no
  `costs_from`)."""
  return not report.get("costs_pending") and (
      report.get("costs_from", "loop-free").startswith("loop-free") or _scanned(report) or _program_costs(report)
  )


def _step_ratio(sparse: dict, dense: dict) -> tuple[float | None, str]:
  """p-MoD / dense estimated step time, like for like: where XLA's estimate is valid for only one of the
  two programs, the ratio of their rooflines (an XLA estimate over a roofline compares two chip models).
  None (and why) where the rooflines count different bytes (one twin predates the HBM count)."""
  same_model = _xla_estimate(sparse) == _xla_estimate(dense)
  if same_model and _xla_estimate(dense):  # two XLA estimates: their bytes do not enter
    return sparse["estimated_step_s"] / dense["estimated_step_s"], ""
  if _bytes_name(sparse) != _bytes_name(dense):
    return None, " (one twin predates the HBM count: not comparable)"
  if same_model:  # two rooflines of the same kind of bytes
    return sparse["estimated_step_s"] / dense["estimated_step_s"], ""
  return _roofline_s(sparse) / _roofline_s(dense), " (both rooflines: XLA's estimate is valid for one program only)"


def _ratio_cell(ratio: float | None, basis: str) -> str:
  return f"{ratio:.3f}{basis}" if ratio is not None else f"–{basis}"


def _pair_state(report: dict, program: str) -> str:
  """'ok', or why a report has no estimate: not compiled yet, failed (why), its twin pending or failed."""
  p = _program(report, program)
  if report.get("pending"):
    return "not compiled yet"
  if p is None or "error" in p or "error" in report:
    return f"failed: {(p or report).get('error', '?')}"
  return "ok" if _has_costs(report) else _twin_state(report)


def _twin_state(report: dict) -> str:
  """Why a compiled program has no estimate: its twin (or loop-weighted recompile) is pending, or failed (and
  why)."""
  if report.get("costs_pending") == PROGRAM_COSTS_KEY:
    return "loop-weighted recompile not compiled yet"
  if report.get("costs_pending"):
    return "twin not compiled yet"
  return f"twin failed: {report['twin_error']}" if "twin_error" in report else "failed"


def _one_b_row(report: dict, technique: str, topology: str) -> str:
  p = _program(report, "train")
  if report.get("pending"):
    return f"| {technique} | {topology} | – | not compiled yet | – | – | – | – | – |"
  if p is None or "error" in p:
    error = (p or report).get("error", "failed")
    needed = _gib((p or {}).get("memory", {}).get("total_bytes"))
    return f"| {technique} | {topology} | {needed} | no | – | – | – | – | {report.get('wall_s', 0):.0f} s |  <!-- {error} -->"
  estimate = (
      f"{_ms(p['estimated_step_s'])} | {_source(p)}{_costing(report)} | "
      f"{p['estimated_mfu']:.1%} | "
      f"{_executed_flops(p) / p['analytic_flops_per_chip']:.2f}"
      if _has_costs(report)
      else f"{_twin_state(report)} | – | – | –"
  )
  return (
      f"| {technique} | {topology} ({report['chips']} chips) | {_gib(p['memory']['total_bytes'])} | "
      f"{'yes' if p['fits'] else 'NO'} | {estimate} | {_compile_time(p)} |"
  )


def _one_b_table(plan: Plan, results: dict) -> list[str]:
  """A 1B train-step table's rows, each topology's SCANNED_BASIS row after its techniques, and where there
  are such rows, what they are for and how the scanned twin's costs compare with the unrolled twin's."""
  lines = []
  for topology in plan.one_b_topologies:
    for technique in TECHNIQUES:
      lines.append(_one_b_row(results.get((technique, topology, "train"), {"pending": True}), technique, topology))
    if (SCANNED_BASIS, topology, "train") in results:
      lines.append(_one_b_row(results[(SCANNED_BASIS, topology, "train")], SCANNED_BASIS, topology))
  if not any(key[0] == SCANNED_BASIS for key in results):
    return lines
  lines += [
      "",
      "Rows marked (scanned twin) are costed by a twin with its layers still scanned (its unrolled twin needs "
      "more host memory than this machine's 24 GiB to compile), every loop iteration counted through the loops' "
      "trip counts (`llvm_jax/hlo_cost.py`). Its FLOPs are the unrolled twin's; its HBM bytes are those of a "
      "different compiled program, so compare such a row with the baseline costed the same way (the row "
      f"'{SCANNED_BASIS}'), not with the baseline's row above it.",
  ]
  for topology in plan.one_b_topologies:
    scanned, unrolled = (_costed(results, technique, topology, "train") for technique in (SCANNED_BASIS, "baseline"))
    if scanned and unrolled:
      lines.append(
          f"- baseline {topology}, scanned against unrolled twin: {_executed_flops(scanned) / 1e12:.3f} against "
          f"{_executed_flops(unrolled) / 1e12:.3f} TFLOP per chip; HBM bytes {_hbm_bytes(scanned) / 1e9:.1f} against "
          f"{_hbm_bytes(unrolled) / 1e9:.1f} GB."
      )
  return lines


def markdown(
    plan: Plan,
    command: str,
    one_b: dict,
    one_b_splash: dict,
    paper_found: dict,
    pmod_7b: dict | None,
    prefill_pairs: dict[str, tuple],
    run: Runner,
    notes: list[str],
) -> str:
  lines = [
      "# Cloud TPU estimates from ahead-of-time compiles" + (" (QUICK: tiny stand-in models)" if plan.quick else ""),
      "",
      f"Produced by `{command}` on {datetime.date.today()} (no TPU: `python -m llvm_jax.aot` compiles the real "
      "programs with libtpu for deviceless topologies). Step times and MFU are ESTIMATES of XLA's cost model "
      "(`optimal_seconds`, 'XLA') or of the roofline max(compiled FLOPs / peak, HBM bytes / HBM bandwidth) "
      "('roofline'), never measurements. HBM bytes: what the compiled program's instructions read from and write "
      "to HBM, by their buffers' memory spaces (XLA's own 'bytes accessed' also counts each prefetch into VMEM and "
      "each read of the VMEM copy; 'roofline (XLA bytes)' marks twins compiled before the HBM count, which used "
      "it). MFU = analytic FLOPs (llvm_jax/flops.py, causal attention at 1/2, no remat) / (estimated time x peak). "
      "HBM / chip = arguments + outputs + temporaries − aliased, per chip.",
      "",
      f"## 1. ~1B LLVM, train step, FSDP (batch {plan.one_b_shape[0]} x {plan.one_b_shape[1]} tokens, remat full)",
      "",
      "| technique | slice | HBM / chip (GiB) | fits | est. step time | source | est. MFU | XLA / analytic FLOPs "
      "| compile (program + twin) |",
      "|---|---|---:|---|---:|---|---:|---:|---:|",
  ]
  lines += _one_b_table(plan, one_b)
  lines += [
      "",
      "### 1b. The same train steps with the decoder on the splash kernel (`attention_impl=splash`)",
      "",
      "Splash keeps the (T, S) logits on chip, but as a Pallas custom call its work is invisible to XLA's cost "
      "analysis. Here the program and its twin run it in the decoder and the ViT (whose 1025 tokens it pads to 1152), "
      "the twin with its layers unrolled (scanned where marked), and `aot.splash_kernels` "
      "MODELS each kernel call from its q/k/v shapes and the tiles its mask leaves non-empty (the decoder's causal "
      "mask: 36 of 64; all of the ViT's): flash "
      "attention's matmuls (the backward recomputes QK') and tile loads, added to XLA's FLOPs and HBM bytes; the "
      "estimate is then always the roofline. p-MoD's MoD layers run it on their kept tokens, padded to whole tiles.",
      "",
      "| technique | slice | HBM / chip (GiB) | fits | est. step time | source | est. MFU | "
      "(XLA + kernels) / analytic FLOPs | compile (program + twin) |",
      "|---|---|---:|---|---:|---|---:|---:|---:|",
  ]
  lines += _one_b_table(plan, one_b_splash)
  # How far XLA's own cost model sits above the roofline, where it gave an estimate for section 1's twins.
  above = {
      f"{technique} {topology}": p["estimated_step_s"] / _roofline_s(p)
      for technique in TECHNIQUES
      for topology in plan.one_b_topologies
      if (p := _costed(one_b, technique, topology, "train")) and _xla_estimate(p)
  }
  if above:
    low, high = f"{min(above.values()):.2f}", f"{max(above.values()):.2f}"
    lines += [
        "",
        "A roofline is the least time the compiled work can take (compute and HBM traffic fully overlapped, at "
        "peak). XLA's cost model, which cannot price the kernels, gave section 1's twins estimates "
        f"{low if low == high else f'{low}-{high}'}x their roofline where it "
        "gave a valid one "
        f"({', '.join(f'{name}: {ratio:.2f}x' for name, ratio in above.items())}): the MFU above is an upper "
        "bound of that kind, not a prediction.",
    ]

  lines += [
      "",
      f"## 2. Paper-scale 7B models, SFT train step (global batch {plan.paper_shape[0]} x "
      f"{plan.paper_shape[1]} tokens, remat full)",
      "",
      "| model | generation | smallest slice that fits | strategy | microbatches | HBM / chip (GiB) | "
      "est. step time | source | est. MFU | compiles tried |",
      "|---|---|---|---|---:|---:|---:|---|---:|---:|",
  ]
  for (name, generation), found in paper_found.items():
    tried = len(found["tried"])
    if found.get("pending"):
      if "report" in found:
        smallest = f"search not finished ({found['topology']} fits; fewer chips not compiled yet)"
      else:
        smallest = f"search not finished ({found['tried'][-1][0]} refused)" if tried else "not compiled yet"
      lines.append(f"| {PAPER_7B[name]} | {generation} | {smallest} | – | – | – | – | – | – | {tried} |")
      continue
    if "report" not in found:
      lines.append(
          f"| {PAPER_7B[name]} | {generation} | none up to {plan.chips[-1]} chips | – | – | – | – | – "
          f"| – | "
          f"{tried} |"
      )
      continue
    p = found["report"]["programs"]["train"]
    estimate = (
        f"{_ms(p['estimated_step_s'])} | {_source(p)}{_costing(found['report'])} | {p['estimated_mfu']:.1%}"
        if _has_costs(found["report"])
        else f"– | {'costs not compiled yet' if found['report'].get('costs_pending') else 'memory only'} | –"
    )
    lines.append(
        f"| {PAPER_7B[name]} | {generation} | {found['topology']} ({found['report']['chips']} chips) | "
        f"{found['strategy']} | {found['microbatches']} | {_gib(p['memory']['total_bytes'])} | "
        f"{estimate} | {tried} |"
    )
  if any(_program_costs(found.get("report", {})) for found in paper_found.values()):
    lines += [
        "",
        "Rows marked (program's own) are costed by the compiled program itself (scanned layers, blocked "
        "attention), every loop body weighted by its trip count (`llvm_jax/hlo_cost.py`): with its 32 layers "
        "unrolled, a 7B twin needs more host memory than this machine's 24 GiB to compile. A conditional's "
        "branch is counted as if it ran, so the blocked attention's tiles that the causal mask skips at run time "
        "(6 of 16 at 2048 tokens) are counted, as the einsum twins count the masked logits: an upper bound.",
    ]
  bounds = [
      f"- {PAPER_7B[name]} {generation}: {_bound(found['report']['programs']['train'])}"
      for (name, generation), found in paper_found.items()
      if "report" in found and _has_costs(found["report"]) and not _xla_estimate(found["report"]["programs"]["train"])
  ]
  if bounds:
    lines += ["", "What bounds each roofline above (compiled FLOPs at peak against HBM bytes over bandwidth):", *bounds]

  decode_topology = plan.one_b_topologies[0]
  lines += [
      "",
      f"## 3. Decode step, ~1B LLVM on {decode_topology} ({plan.decode_rows} rows, "
      f"{plan.one_b_shape[1] + plan.new_tokens} cache slots, weights replicated in bf16)",
      "",
      "| technique | HBM / chip (GiB) | est. step time | source | HBM roofline (HBM bytes / bandwidth) | "
      "roofline / estimate | one read of the arguments | that / estimate |",
      "|---|---:|---:|---|---:|---:|---:|---:|",
  ]
  decode_ratios = {}
  for technique in TECHNIQUES:
    p = _costed(one_b, technique, decode_topology, "decode")
    if p is None:
      report = one_b.get((technique, decode_topology, "decode"), {})
      state = "failed" if report.get("error") or "error" in (_program(report, "decode") or {}) else "not compiled yet"
      lines.append(f"| {technique} | – | {state} | – | – | – | – | – |")
      continue
    decode_ratios[technique] = (
        p["roofline_hbm_s"] / p["estimated_step_s"],
        p["min_traffic_s"] / p["estimated_step_s"],
        not _xla_estimate(p),
    )
    lines.append(
        f"| {technique} | {_gib(p['memory']['total_bytes'])} | {_ms(p['estimated_step_s'])} | {_source(p)} | "
        f"{_ms(p['roofline_hbm_s'])} | {decode_ratios[technique][0]:.0%} | {_ms(p['min_traffic_s'])} | "
        f"{decode_ratios[technique][1]:.0%} |"
    )

  lines += [
      "",
      "## 4. p-MoD against its dense model",
      "",
      "| pair | slice | est. step time, p-MoD / dense | analytic FLOPs, p-MoD / dense | paper (FLOPs) |",
      "|---|---|---:|---:|---:|",
  ]
  pmod_ratios = {}
  tokens = config_utils.model_config(one_b_config(plan, "pmod")).tokens_per_image
  for kernel, results in (("", one_b), (", splash", one_b_splash)):
    for topology in plan.one_b_topologies:
      dense, sparse = (_costed(results, t, topology, "train") for t in ("baseline", "pmod"))
      if dense and sparse:
        ratio, basis = _step_ratio(sparse, dense)
        if ratio is not None:
          pmod_ratios[f"1B {topology}{kernel}"] = ratio
        lines.append(
            f"| ~1B{kernel}, {tokens} of {plan.one_b_shape[1]} tokens vision | {topology} | "
            f"{_ratio_cell(ratio, basis)} | {sparse['analytic_flops'] / dense['analytic_flops']:.3f} | – |"
        )
  dense_found = paper_found.get(PMOD_DENSE_REFERENCE, {})
  dense = _program(dense_found.get("report", {}), "train") if _has_costs(dense_found.get("report", {})) else None
  sparse = _program(pmod_7b or {}, "train")
  label = f"LLaVA-1.5-7B{' (tiny stand-in)' if plan.quick else ''}, one image per sample"
  if dense and sparse and "error" not in sparse and _has_costs(pmod_7b):
    ratio, basis = _step_ratio(sparse, dense)
    if ratio is not None:
      pmod_ratios[f"LLaVA-1.5-7B train step, {dense_found['topology']}"] = ratio
    lines.append(
        f"| {label} | {dense_found['topology']} | {_ratio_cell(ratio, basis)}{_costing(pmod_7b)} | "
        f"{sparse['analytic_flops'] / dense['analytic_flops']:.3f} | {PAPER_PMOD_FLOPS:.3f} |"
    )
  elif dense and sparse and "error" not in sparse:  # p-MoD's program compiled; its twin failed or is pending
    state = _twin_state(pmod_7b)
    lines.append(
        f"| {label} | {dense_found['topology']} | – ({state}) | "
        f"{sparse['analytic_flops'] / dense['analytic_flops']:.3f} | {PAPER_PMOD_FLOPS:.3f} |"
    )
  else:
    lines.append(f"| {label} | – | not compiled yet | – | {PAPER_PMOD_FLOPS:.3f} |")
  for label, (dense_report, sparse_report, (rows, seq_len), topology) in prefill_pairs.items():
    name = f"{label} prefill: {rows} rows of one image + a {plan.prompt_tokens}-token prompt ({seq_len} tokens)"
    paper = f"{PAPER_PMOD_FLOPS:.3f}" if "7B" in label else "–"
    dense, sparse = (_costed_program(r, "prefill") for r in (dense_report, sparse_report))
    if dense and sparse:
      ratio, basis = _step_ratio(sparse, dense)
      if ratio is not None:
        pmod_ratios[f"{label} prefill, {topology}"] = ratio
      lines.append(
          f"| {name} | {topology} | {_ratio_cell(ratio, basis)} | "
          f"{sparse['analytic_flops'] / dense['analytic_flops']:.3f} "
          f"| {paper} |"
      )
    else:
      states = {_pair_state(r, "prefill") for r in (dense_report, sparse_report)} - {"ok"}
      lines.append(f"| {name} | {topology} | {', '.join(sorted(states))} | – | {paper} |")

  lines += ["", "## Targets", ""]
  for attention, results in (
      ("blocked kernel, einsum twin", one_b),
      ("splash kernel modelled, roofline: an upper bound", one_b_splash),
  ):
    base = _costed(results, "baseline", plan.one_b_topologies[0], "train")
    if base:
      ok = base["estimated_mfu"] >= TARGETS["mfu_1b_v5e"]
      lines.append(
          f"- 1B baseline train step on {plan.one_b_topologies[0]} ({attention}): est. MFU "
          f"{base['estimated_mfu']:.1%} (target >= {TARGETS['mfu_1b_v5e']:.0%}): {'met' if ok else 'MISSED'}."
      )
  for pair, ratio in pmod_ratios.items():
    ok = ratio <= TARGETS["pmod_step_ratio"]
    lines.append(
        f"- p-MoD / dense est. step time ({pair}): {ratio:.3f} (target <= {TARGETS['pmod_step_ratio']}): "
        f"{'met' if ok else 'MISSED'}."
    )
  for technique, (ratio, ideal_ratio, by_construction) in decode_ratios.items():
    # Where the estimate is the roofline of XLA's own bytes, that ratio is 1 by construction: the target
    # is then judged against the ideal traffic, each argument (weights, KV cache) read once.
    judged = ideal_ratio if by_construction else ratio
    ok = judged >= TARGETS["decode_of_roofline"]
    what = (
        f"one read of the arguments / est. time {ideal_ratio:.0%} (the estimate is the HBM bytes' roofline, "
        f"so HBM roofline / estimate = {ratio:.0%} by construction)"
        if by_construction
        else f"HBM roofline / est. time {ratio:.0%}"
    )
    lines.append(
        f"- decode ({technique}): {what} (target >= {TARGETS['decode_of_roofline']:.0%}): "
        f"{'met' if ok else 'MISSED'}."
    )
  lines += [""] + notes + [""] + _loops_left(one_b, paper_found, pmod_7b, prefill_pairs)
  lines += [f"Compile time of this run: {run.compile_s / 60:.1f} min (cached compiles excluded).", ""]
  if run.pending:
    lines += [
        f"INCOMPLETE: {len(run.pending)} programs are not compiled yet (the rows marked so, and any 7B search "
        f"step after them). `{command}` compiles them; the compiles above are cached and not repeated.",
        "",
    ]
  return "\n".join(lines)


def _top(p: dict) -> str:
  return (
      "; ".join(
          f"{name} {moved / 2**30:.2f} GiB ({count} ops)" for name, moved, count in p.get("top_instructions", [])[:6]
      )
      or "–"
  )


def _loops_left(one_b: dict, paper_found: dict, pmod_7b: dict | None, prefill_pairs: dict) -> list[str]:
  """Where a twin kept loops ('N loops left' above), the JAX operations they come from."""
  reports = {f"{t} {topology} {program}": r for (t, topology, program), r in one_b.items()}
  reports.update(
      {f"{PAPER_7B[name]} {generation}": f.get("report", {}) for (name, generation), f in paper_found.items()}
  )
  reports["p-MoD-LLaVA-1.5-7B (section 4)"] = pmod_7b or {}
  for label, (dense, sparse, _, topology) in prefill_pairs.items():
    reports[f"{label} prefill {topology} (dense)"], reports[f"{label} prefill {topology} (p-MoD)"] = dense, sparse
  lines = []
  for label, report in reports.items():
    for program in (report.get("programs") or {}).values():
      if _has_costs(report) and program.get("cost_program_loops"):
        ops = (
            ", ".join(f"{n}x {name}" for name, n in program.get("cost_program_loop_ops", {}).items()) or "not recorded"
        )
        lines.append(f"- {label}: {program['cost_program_loops']} loops left in the twin, from: {ops}.")
  return ["### Loops left in the twins", ""] + lines + [""] if lines else []


def _movers(p: dict) -> str:
  movers = ", ".join(f"{kind} {size / 2**30:.2f} GiB" for kind, size in p.get("hbm_movers", [])[:5]) or "–"
  if "hbm_bytes_accessed_per_chip" not in p:  # a twin compiled before the HBM count
    movers += " (operands + results in any memory space, VMEM included)"
  return movers


def _hbm_bytes(p: dict) -> float:
  """The program's HBM traffic; XLA's all-memory count for twins compiled before it was counted."""
  return p.get("hbm_bytes_accessed_per_chip", p["xla_bytes_accessed_per_chip"])


def _bytes_name(p: dict) -> str:
  return "HBM bytes" if "hbm_bytes_accessed_per_chip" in p else "XLA bytes (VMEM traffic included)"


def why_missed(
    plan: Plan,
    one_b: dict,
    prefill_pairs: dict | None = None,
    one_b_splash: dict | None = None,
    pmod_7b_pair: tuple[dict, dict, str] | None = None,
) -> list[str]:
  """Per missed target: FLOP overheads, which roofline binds, and the ops that move the bytes (per chip).
  `pmod_7b_pair`: section 4's 7B train steps, (dense report, p-MoD report, topology)."""
  topology = plan.one_b_topologies[0]
  lines = []
  splash = _costed(one_b_splash or {}, "baseline", topology, "train")
  if splash and splash["estimated_mfu"] < TARGETS["mfu_1b_v5e"]:
    executed = _executed_flops(splash)
    lines += [
        "### Why the 1B baseline on the splash kernel misses the MFU target",
        "",
        f"- XLA's FLOPs and the kernels' modelled ones come to {executed / splash['analytic_flops_per_chip']:.2f}x "
        "the analytic FLOPs (remat='full' recomputes every layer's forward, attention included; the backward "
        "kernels recompute QK'; the causal mask's diagonal tiles are computed whole; elementwise ops).",
        f"- Roofline: {_bound(splash)}.",
        f"- HBM bytes moved by: {_movers(splash)}.",
        f"- The JAX operations behind them: {_top(splash)}.",
        "",
    ]
  base = _costed(one_b, "baseline", topology, "train")
  if base and base["estimated_mfu"] < TARGETS["mfu_1b_v5e"]:
    lines += [
        "### Why the 1B baseline's einsum twin misses the MFU target",
        "",
        f"- XLA executes {_executed_flops(base) / base['analytic_flops_per_chip']:.2f}x the analytic FLOPs "
        "(remat='full' recomputes every layer's forward; elementwise ops; the twin's einsum attention computes "
        "the masked half of the causal logits).",
        f"- Roofline: {_bound(base)}; estimate {_ms(base['estimated_step_s'])} ({_source(base)}).",
        f"- HBM bytes moved by (what the top-level ops read from and write to HBM): {_movers(base)}.",
        f"- The JAX operations behind them: {_top(base)}.",
    ]
    # The logits' einsums (bkgts) and the decoder's softmax over them (DecoderLayer/attn/...: sub, exp,
    # reduce_sum), among the ops that move the most bytes.
    logits = sum(
        moved
        for name, moved, _ in base.get("top_instructions", [])
        if "bkgts" in name or ("reduce fusion" in name and "DecoderLayer/attn/" in name)
    )
    if logits:
      # The twin's einsum attention writes its (T, S) logits to HBM and reads them back; a fused kernel
      # (attention_impl='splash') keeps them on chip. Without that traffic: a bound, not an estimate.
      chip = aot.parse_topology(topology).chip
      rest_s = (_hbm_bytes(base) - logits) / chip.hbm_bandwidth
      bound_s = max(rest_s, base["roofline_compute_s"])
      lines.append(
          f"- The twin's einsum attention moves its (T, S) logits through HBM: the einsums' and the softmax's "
          f"reads and writes come to {logits / 2**30:.1f} GiB of the {_hbm_bytes(base) / 2**30:.1f} GiB of "
          f"{_bytes_name(base)}. A fused "
          "kernel (`attention_impl=splash`: Pallas, whose work XLA's cost analysis does not see) keeps them in VMEM: "
          f"without those bytes the roofline is {_ms(bound_s)} "
          f"({'compute' if bound_s == base['roofline_compute_s'] else 'memory'}-bound), MFU at most "
          f"{base['analytic_flops_per_chip'] / (bound_s * chip.peak_flops):.1%}"
          + (f"; with the kernel's own work modelled (section 1b), {splash['estimated_mfu']:.1%}." if splash else ".")
      )
    lines.append("")
  for kernel, results in (("", one_b), (" on splash", one_b_splash or {})):
    dense, sparse = (_costed(results, t, topology, "train") for t in ("baseline", "pmod"))
    ratio = _step_ratio(sparse, dense)[0] if dense and sparse else None
    if ratio is not None and ratio > TARGETS["pmod_step_ratio"]:
      lines += [
          f"### Why p-MoD's step{kernel} is not <= 0.65x the dense one",
          "",
          f"- Analytic FLOPs ratio {sparse['analytic_flops'] / dense['analytic_flops']:.3f}: p-MoD only thins the "
          "vision tokens of its MoD layers; the ViT, the text tokens and the LM head cost the same.",
          f"- p-MoD bytes moved by: {_movers(sparse)}; dense: {_movers(dense)}.",
          "",
      ]
  for technique in TECHNIQUES:
    p = _costed(one_b, technique, topology, "decode")
    if p is None:
      continue
    if (
        p["roofline_hbm_s"] / p["estimated_step_s"] < TARGETS["decode_of_roofline"]
        or p["min_traffic_s"] / p["estimated_step_s"] < TARGETS["decode_of_roofline"]
    ):
      lines.append(
          f"- decode ({technique}): {_bytes_name(p)} {_hbm_bytes(p) / 2**30:.2f} GiB against "
          f"{p['memory']['argument_bytes'] / 2**30:.2f} GiB of arguments; moved by: {_movers(p)}."
      )
  pairs = [
      (f"{label} prefill ({topology})", dense, sparse, "prefill")
      for label, (dense, sparse, _, topology) in (prefill_pairs or {}).items()
  ]
  if pmod_7b_pair:
    pairs.append((f"LLaVA-1.5-7B train step ({pmod_7b_pair[2]})", *pmod_7b_pair[:2], "train"))
  for title, dense_report, sparse_report, program in pairs:
    dense, sparse = (_costed_program(r, program) for r in (dense_report, sparse_report))
    if not (dense and sparse):
      continue
    ratio, _ = _step_ratio(sparse, dense)
    if ratio is None or ratio <= TARGETS["pmod_step_ratio"]:
      continue
    over = lambda p: p["estimated_step_s"] - p["roofline_compute_s"]
    lines += [
        f"### Why p-MoD's {title} is {ratio:.3f}x the dense one, not <= {TARGETS['pmod_step_ratio']}x",
        "",
        f"- The compiled FLOPs fall to {_executed_flops(sparse) / _executed_flops(dense):.3f}x (analytic "
        f"{sparse['analytic_flops'] / dense['analytic_flops']:.3f}x), the compute roofline with them; the HBM bytes "
        f"only to {_hbm_bytes(sparse) / _hbm_bytes(dense):.3f}x.",
        f"- The estimates spend {_ms(over(dense))} (dense) and {_ms(over(sparse))} (p-MoD) beyond the compute "
        "roofline: time p-MoD does not shrink with its FLOPs.",
        f"- HBM bytes moved by: p-MoD {_movers(sparse)}; dense {_movers(dense)}.",
        f"- The JAX operations behind p-MoD's: {_top(sparse)}.",
        "",
    ]
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny stand-in models: checks the script in minutes")
  parser.add_argument("--out", default=None, help=f"report path (default {OUT}; --quick: /tmp/tpu_aot_quick.md)")
  parser.add_argument(
      "--cache", default=None, help=f"compile cache (default {CACHE}; --quick: /tmp/tpu_aot_quick.jsonl)"
  )
  parser.add_argument("--refresh", action="store_true", help="ignore the cache (recompile everything)")
  parser.add_argument(
      "--retry_crashed",
      action="store_true",
      help="compile again the programs whose compiling process died (otherwise reported as failed)",
  )
  parser.add_argument(
      "--compile",
      default="1b,7b,splash",
      help="sections whose missing programs this run compiles (1b: sections 1 and 3; 7b: sections 2 and 4; "
      "splash: section 1b); the "
      "others come from the cache only, as 'not compiled yet' where absent. Two runs with --compile=1b and "
      "--compile=7b use both cores; --compile= writes the report from the cache alone",
  )
  parser.add_argument(
      "--only",
      default=None,
      help="a regular expression: of the programs --compile would compile, only those whose cache key it "
      "matches (e.g. 'v5p-8' for one topology's rows, 'twin=False' for the programs without their twins; "
      "keys as in the cache file); the others stay 'not compiled yet'",
  )
  parser.add_argument(
      "--program_costs",
      default=r"^7b:",
      help="a regular expression: the programs (cache keys) costed by the program itself, its loop bodies "
      "weighted by their trip counts, with no twin; default: the 7B train steps (section 2's dense reference "
      "and section 4's pair), whose unrolled twins need more than 24 GiB of host memory",
  )
  parser.add_argument(
      "--step_times_7b",
      default="",
      help="a regular expression on 'model:generation' (e.g. 'trol_7b:v5p', '.*:v5e'; models as in "
      "PAPER_7B): section 2's rows whose slice also gets a step-time estimate, a recompile of 5-25 minutes "
      "each (default: none but LLaVA-1.5-7B on v5p, which section 4 needs; the others show their memory only, or "
      "the estimate of such a recompile already in the cache)",
  )
  parser.add_argument(
      "--scanned_twins",
      default=SCANNED_TWINS,
      help="a regular expression: the programs (cache keys) whose costs come from a scanned twin (layers "
      "scanned, loop bodies weighted by their trip counts) instead of the unrolled one; default: all_four's 1B "
      "train steps (einsum and splash), whose unrolled twins need more than 24 GiB of host memory to compile",
  )
  args = parser.parse_args()
  sections = {name for name in args.compile.split(",") if name}
  if sections - {"1b", "7b", "splash"}:
    parser.error(f"--compile takes some of 1b, 7b, splash, got {args.compile!r}")
  plan = Plan.make(args.quick)
  out = args.out or ("/tmp/tpu_aot_quick.md" if args.quick else OUT)
  run = Runner(
      args.cache or ("/tmp/tpu_aot_quick.jsonl" if args.quick else CACHE),
      args.refresh,
      retry_crashed=args.retry_crashed,
      only=args.only,
      scanned_twins=args.scanned_twins,
      program_costs=args.program_costs,
  )
  command = "python experiments/tpu_aot.py" + (" --quick" if args.quick else "")
  start = time.perf_counter()
  prefill_pairs = section_pmod_prefill(plan, run, sections)  # minutes: before the hours of train steps
  run.compile_missing = "1b" in sections
  one_b = section_one_b(plan, run)
  run.compile_missing = "7b" in sections
  # The dense reference first, then its p-MoD pair (section 4), then the other models' searches.
  step_times = re.compile(args.step_times_7b) if args.step_times_7b else None
  paper_found = section_paper(plan, run, PMOD_DENSE_REFERENCE[:1], step_times=step_times)
  pmod_7b = section_pmod_7b(plan, run, paper_found)
  dense_chips = {g: f["chips"] for (_, g), f in paper_found.items() if "chips" in f}
  others = [name for name in PAPER_7B if name != PMOD_DENSE_REFERENCE[0]]
  paper_found.update(section_paper(plan, run, others, start=dense_chips, step_times=step_times))
  run.compile_missing = "splash" in sections
  one_b_splash = section_one_b_splash(plan, run)
  dense_7b = paper_found.get(PMOD_DENSE_REFERENCE, {})
  pmod_7b_pair = (dense_7b["report"], pmod_7b, dense_7b["topology"]) if pmod_7b and "report" in dense_7b else None
  notes = why_missed(plan, one_b, prefill_pairs, one_b_splash, pmod_7b_pair)
  text = markdown(plan, command, one_b, one_b_splash, paper_found, pmod_7b, prefill_pairs, run, notes)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    f.write(text)
  print(text)
  print(f"wrote {out} in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
  main()
