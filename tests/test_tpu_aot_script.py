"""experiments/tpu_aot.py without compiling: its cache merges a program's memory with its twin's costs,
the report marks what is not compiled yet, and a compile whose process died is reported, not rerun."""

import concurrent.futures
import json
import multiprocessing
import os
import re

import pytest

from experiments import tpu_aot

GiB = 2**30


def _report(program: dict, **extra) -> dict:
  return {"chips": 8, "fits": program.get("fits", True), "programs": {"train": program}, "wall_s": 1.0, **extra}


def _memory_program(total_gib: float) -> dict:
  memory = {"argument_bytes": GiB, "total_bytes": int(total_gib * GiB)}
  return {
      "memory": memory,
      "fits": True,
      "compile_s": 100.0,
      "estimated_step_s": 1e-3,  # counts one loop body: replaced by the twin's
      "min_traffic_s": 0.5,
      "analytic_flops": 80.0,
      "analytic_flops_per_chip": 10.0,
  }


def _cost_program(step_s: float, hbm_bytes: float | None = 2 * GiB) -> dict:
  """A twin's costs; without `hbm_bytes`, one compiled before the HBM count (roofline of XLA's bytes)."""
  return {
      "memory": {"argument_bytes": 9 * GiB, "total_bytes": 99 * GiB},  # the twin's own memory: never reported
      "fits": False,
      "compile_s": 400.0,
      "estimated_step_s": step_s,
      "estimate_source": "roofline max(XLA flops / peak, HBM bytes / HBM bandwidth), memory-bound",
      "estimated_mfu": 0.25,
      "xla_flops_per_chip": 13.0,
      "xla_bytes_accessed_per_chip": 6 * GiB,
      **({"hbm_bytes_accessed_per_chip": hbm_bytes} if hbm_bytes is not None else {}),
      "roofline_hbm_s": step_s,
      "roofline_compute_s": step_s / 4,
      "hbm_movers": [["matmul fusion", 5 * GiB]],
      "top_instructions": [["matmul fusion: mlp/up/dot_general", 2 * GiB, 48]],
      "cost_program_loops": 0,
  }


CRASHED = {"error": "the compiling process died (killed: out of host memory?)", "crashed": True, "programs": {}}


@pytest.fixture
def cache(tmp_path):
  plan = tpu_aot.Plan.make(quick=False)
  key = f"1b:False:baseline:v5e-8:{plan.one_b_shape}:train"
  entries = [
      {"key": f"{key}:twin=False", "report": _report(_memory_program(5.0), costs_from="program itself: ...")},
      {"key": f"{key}:{tpu_aot.TWIN_KEY}", "report": _report(_cost_program(0.2))},
      # ... and its scanned twin: the basis for all_four's row, costed that way.
      {"key": f"{key}:{tpu_aot.SCANNED_TWIN_KEY}", "report": _report(_cost_program(0.15))},
      # p-MoD's program compiled, its twin not yet.
      {"key": key.replace("baseline", "pmod") + ":twin=False", "report": _report(_memory_program(6.0))},
      # A compile whose process died.
      {"key": key.replace("baseline", "trol") + ":twin=False", "report": CRASHED},
      # all_four costed by a scanned twin: XLA's 13 FLOPs per chip (its loop bodies once) + 39 for their repeats.
      {"key": key.replace("baseline", "all_four") + ":twin=False", "report": _report(_memory_program(7.5))},
      {
          "key": key.replace("baseline", "all_four") + f":{tpu_aot.SCANNED_TWIN_KEY}",
          "report": _report(dict(_cost_program(0.3), loop_flops_per_chip=39.0)),
      },
      # DeepStack's program compiled, its twin's process died.
      {"key": key.replace("baseline", "deepstack") + ":twin=False", "report": _report(_memory_program(7.0))},
      {"key": key.replace("baseline", "deepstack") + ":costs=loop-free", "report": CRASHED},
      # Section 1b: the baseline on splash, its twin's kernels modelled (3 of its 13 FLOPs per chip).
      {"key": f"{key}:splash+vit:twin=False", "report": _report(_memory_program(4.0))},
      {
          "key": f"{key}:splash+vit:{tpu_aot.TWIN_KEY}",
          "report": _report(
              dict(_cost_program(0.1), estimated_mfu=0.55, xla_flops_per_chip=10.0, splash_kernel_flops_per_chip=3.0)
          ),
      },
      # ... all_four on splash costed by a scanned twin (10 FLOPs by XLA, 30 for the loops' repeats, 12 by the
      # kernels), its basis the baseline's scanned splash twin.
      {"key": key.replace("baseline", "all_four") + ":splash+vit:twin=False", "report": _report(_memory_program(8.0))},
      {
          "key": key.replace("baseline", "all_four") + f":splash+vit:{tpu_aot.SCANNED_TWIN_KEY}",
          "report": _report(
              dict(
                  _cost_program(0.25),
                  xla_flops_per_chip=10.0,
                  loop_flops_per_chip=30.0,
                  splash_kernel_flops_per_chip=12.0,
              )
          ),
      },
      {
          "key": f"{key}:splash+vit:{tpu_aot.SCANNED_TWIN_KEY}",
          "report": _report(dict(_cost_program(0.08), splash_kernel_flops_per_chip=3.0)),
      },
      # p-MoD on splash (its kept tokens padded to whole tiles): its pair with the baseline in section 4.
      {"key": key.replace("baseline", "pmod") + ":splash+vit:twin=False", "report": _report(_memory_program(4.0))},
      {
          "key": key.replace("baseline", "pmod") + f":splash+vit:{tpu_aot.TWIN_KEY}",
          "report": _report(dict(_cost_program(0.09), splash_kernel_flops_per_chip=2.0)),
      },
  ]
  # Decode steps estimated by the roofline of their bytes, 4x one read of their arguments: the baseline's
  # twin counted HBM bytes, p-MoD's is older (XLA's bytes).
  decode_key = key.replace(":train", f":decode:{plan.decode_rows}:{plan.new_tokens}")
  decode_memory = dict(_memory_program(1.0), min_traffic_s=1e-3)
  for technique, suffix, program in (
      ("baseline", ":twin=False", decode_memory),
      ("baseline", f":{tpu_aot.TWIN_KEY}", _cost_program(4e-3)),
      ("pmod", ":twin=False", decode_memory),
      ("pmod", ":costs=loop-free", _cost_program(4e-3, hbm_bytes=None)),
  ):
    entries.append(
        {
            "key": decode_key.replace("baseline", technique) + suffix,
            "report": dict(_report({}), programs={"decode": program}),
        }
    )
  path = tmp_path / "cache.jsonl"
  path.write_text("".join(json.dumps(e) + "\n" for e in entries))
  return plan, str(path)


def test_rows_merge_memory_and_twin_costs_and_the_report_marks_the_rest(cache):
  plan, path = cache
  run = tpu_aot.Runner(path, refresh=False, compile_missing=False, scanned_twins=tpu_aot.SCANNED_TWINS)
  one_b = tpu_aot.section_one_b(plan, run)
  base = one_b[("baseline", "v5e-8", "train")]
  program = base["programs"]["train"]
  # Memory, fit and compile time from the real program; FLOPs, bytes and estimates from the twin.
  assert program["memory"]["total_bytes"] == 5 * GiB and program["fits"] and program["min_traffic_s"] == 0.5
  assert program["estimated_step_s"] == 0.2 and program["estimated_mfu"] == 0.25 and program["cost_compile_s"] == 400
  assert base["costs_from"].startswith("loop-free twin") and tpu_aot._has_costs(base)
  assert one_b[("pmod", "v5e-8", "train")]["costs_pending"] and not tpu_aot._has_costs(
      one_b[("pmod", "v5e-8", "train")]
  )
  prefill_pairs = tpu_aot.section_pmod_prefill(plan, run, set())
  one_b_splash = tpu_aot.section_one_b_splash(plan, run)
  paper = tpu_aot.section_paper(plan, run)
  text = tpu_aot.markdown(plan, "cmd", one_b, one_b_splash, paper, None, prefill_pairs, run, [])
  assert (
      "| LLaVA-1.5-7B prefill: 16 rows of one image + a 64-token prompt (640 tokens) | v5p-8 | not compiled yet |"
      in text
  )
  assert (
      "| baseline | v5e-8 (8 chips) | 5.00 | yes | 200.00 ms | roofline | 25.0% | 1.30 | 100 s + 400 s twin |" in text
  )
  assert "| pmod | v5e-8 (8 chips) | 6.00 | yes | twin not compiled yet |" in text
  # The scanned twin's estimate and its loop-weighted FLOPs: (13 + 39) / 10 analytic.
  all_four = one_b[("all_four", "v5e-8", "train")]
  assert all_four["costs_from"].startswith("scanned twin") and tpu_aot._has_costs(all_four)
  assert (
      "| all_four | v5e-8 (8 chips) | 7.50 | yes | 300.00 ms | roofline (scanned twin) | 25.0% | 5.20 | 100 s + 400 s twin |"
      in text
  )
  assert (
      "| baseline, scanned twin | v5e-8 (8 chips) | 5.00 | yes | 150.00 ms | roofline (scanned twin) | 25.0% | 1.30 |"
      in text
  )
  assert "| phantom | v5e-8 | – | not compiled yet |" in text
  # Section 1b: all_four on splash against the baseline's scanned splash twin; (10 + 30 + 12) / 10 analytic.
  splash = text.split("### 1b.")[1].split("## 2.")[0]
  assert (
      "| all_four | v5e-8 (8 chips) | 8.00 | yes | 250.00 ms | roofline (scanned twin) | 25.0% | 5.20 | 100 s + 400 s twin |"
      in splash
  )
  assert (
      "| baseline, scanned twin | v5e-8 (8 chips) | 4.00 | yes | 80.00 ms | roofline (scanned twin) | 25.0% | 1.60 |"
      in splash
  )
  assert "compare such a row with the baseline costed the same way" in splash
  # On v5p-8 nothing is compiled: its basis row is pending like the rest.
  assert "| baseline, scanned twin | v5p-8 | – | not compiled yet |" in splash
  assert (
      "| deepstack | v5e-8 (8 chips) | 7.00 | yes | twin failed: the compiling process died (killed: out of host memory?) |"
      in text
  )
  # A roofline estimate equals the HBM bytes / bandwidth by construction: the decode target is judged against
  # one read of the arguments instead.
  assert "- decode (baseline): one read of the arguments / est. time 25% " in text and "70%): MISSED" in text
  # A twin compiled before the HBM count is used by a run that compiles nothing, and labelled so.
  assert "| pmod | 1.00 | 4.00 ms | roofline (XLA bytes) | 4.00 ms | 100% | 1.00 ms | 25% |" in text
  assert "| baseline | 1.00 | 4.00 ms | roofline | 4.00 ms | 100% | 1.00 ms | 25% |" in text
  # No p-MoD pair without p-MoD's twin; the baseline's MFU target is judged.
  assert "est. MFU 25.0% (target >= 50%): MISSED" in text and "(1B v5e-8)" not in text
  # Section 1b: XLA's and the kernels' FLOPs over the analytic ones; the MFU target judged on it too.
  assert (
      "| baseline | v5e-8 (8 chips) | 4.00 | yes | 100.00 ms | roofline | 55.0% | 1.30 | 100 s + 400 s twin |" in text
  )
  assert "| trol | v5e-8 | – | not compiled yet |" in text
  assert "(splash kernel modelled, roofline: an upper bound): est. MFU 55.0% (target >= 50%): met." in text
  assert "| pmod | v5e-8 (8 chips) | 4.00 | yes | 90.00 ms | roofline |" in text
  assert "| ~1B, splash, 256 of 1024 tokens vision | v5e-8 | 0.900 | 1.000 | – |" in text
  assert "- p-MoD / dense est. step time (1B v5e-8, splash): 0.900 (target <= 0.65): MISSED." in text
  notes = "\n".join(tpu_aot.why_missed(plan, one_b, prefill_pairs, one_b_splash))
  assert "### Why p-MoD's step on splash is not <= 0.65x the dense one" in notes
  assert "- Analytic FLOPs ratio 1.000" in notes
  assert f"INCOMPLETE: {len(run.pending)} programs are not compiled yet" in text and len(run.pending) > 20


def test_pmod_step_ratio_compares_like_with_like():
  roofline = _cost_program(0.2)  # estimate = roofline, 0.2 s
  xla = dict(_cost_program(0.1), estimate_source="XLA optimal_seconds", estimated_step_s=0.3)  # roofline 0.1 s
  assert tpu_aot._step_ratio(roofline, dict(roofline, estimated_step_s=0.4)) == (0.5, "")
  ratio, basis = tpu_aot._step_ratio(roofline, xla)  # 0.2 / 0.3 would mix the two chip models
  assert tpu_aot._source(xla) == "XLA (roofline 100.00 ms)" and tpu_aot._source(roofline) == "roofline"
  assert ratio == 2.0 and "rooflines" in basis
  # A roofline of XLA's bytes (a twin from before the HBM count) is not compared with one of HBM bytes.
  older = _cost_program(0.4, hbm_bytes=None)
  assert tpu_aot._step_ratio(roofline, older) == (None, " (one twin predates the HBM count: not comparable)")
  assert tpu_aot._step_ratio(older, dict(older, estimated_step_s=0.8))[0] == 0.5
  assert tpu_aot._source(older) == "roofline (XLA bytes)"
  older_xla = dict(older, estimate_source="XLA optimal_seconds", estimated_step_s=0.9)
  assert tpu_aot._source(older_xla) == "XLA (roofline 400.00 ms, XLA bytes)"


def test_a_compile_whose_process_died_is_reported_and_retried_only_on_request(cache):
  plan, path = cache
  key = f"1b:False:trol:v5e-8:{plan.one_b_shape}:train"
  one_b = tpu_aot.section_one_b(plan, tpu_aot.Runner(path, refresh=False, compile_missing=False))
  row = tpu_aot._one_b_row(one_b[("trol", "v5e-8", "train")], "trol", "v5e-8")
  assert row.startswith("| trol | v5e-8 | – | no |") and "process died" in row
  assert f"{key}:twin=False" not in tpu_aot.Runner(path, refresh=False, retry_crashed=True).done


class _FitsFrom:
  """A runner whose train steps fit on `chips` chips or more (needing 2x the HBM below)."""

  def __init__(self, chips: int):
    self.chips = chips

  def memory(self, key, config, topology, what):
    chips = tpu_aot.aot.parse_topology(topology).chips
    needed = 2 * tpu_aot.aot.CHIPS["v5e"].hbm_bytes * (chips < self.chips)
    return {"fits": chips >= self.chips, "programs": {"train": {"memory": {"total_bytes": needed}}}}

  row = memory


def test_the_7b_search_starts_where_the_dense_model_fit_and_goes_down_or_up():
  plan = tpu_aot.Plan.make(quick=False)  # batch 128: every strategy splits over up to 128 chips
  plan.chips = (8, 16, 32, 64)
  # From the fewest chips up: one refused size (far over: its other strategies skipped), then the fit.
  found = tpu_aot.section_paper(plan, _FitsFrom(32), ["trol_7b"])[("trol_7b", "v5e")]
  assert found["chips"] == 32 and [t[0] for t in found["tried"]] == ["v5e:2x4", "v5e:4x4", "v5e:4x8"]
  # Started at 32 where it fits: down to 16 (refused), never 8.
  found = tpu_aot.section_paper(plan, _FitsFrom(32), ["trol_7b"], start={"v5e": 32})[("trol_7b", "v5e")]
  assert found["chips"] == 32 and [t[0] for t in found["tried"]] == ["v5e:4x8", "v5e:4x4"]
  # A model smaller than the start: down while it fits.
  found = tpu_aot.section_paper(plan, _FitsFrom(16), ["trol_7b"], start={"v5e": 32})[("trol_7b", "v5e")]
  assert found["chips"] == 16 and found["topology"] == "v5e:4x4" and "pending" not in found
  # A bigger one: up from the start.
  found = tpu_aot.section_paper(plan, _FitsFrom(64), ["trol_7b"], start={"v5e": 32})[("trol_7b", "v5e")]
  assert found["chips"] == 64 and [t[0] for t in found["tried"]][0] == "v5e:4x8"


def test_only_restricts_the_compiles_to_the_matching_keys(monkeypatch, tmp_path):
  compiled = []
  monkeypatch.setattr(tpu_aot, "_compile_program", lambda *a: compiled.append(a[1]) or {"fits": True, "programs": {}})
  monkeypatch.setattr(tpu_aot.concurrent.futures, "ProcessPoolExecutor", _InProcess)
  run = tpu_aot.Runner(str(tmp_path / "cache.jsonl"), refresh=False, only="v5p-8")
  assert run("1b:baseline:v5e-8:train:twin=False", None, "v5e-8", ("train",))["pending"]
  assert run("1b:baseline:v5p-8:train:twin=False", None, "v5p-8", ("train",))["fits"]
  assert compiled == ["v5p-8"] and run.pending == ["1b:baseline:v5e-8:train:twin=False"]


class _InProcess(concurrent.futures.ThreadPoolExecutor):

  def __init__(self, workers, mp_context=None):
    super().__init__(workers)


def test_each_compile_runs_in_its_own_process(monkeypatch, tmp_path):
  """The compile runs in a spawned process: its errors come back, a crash there is recorded, and the
  runner goes on."""
  run = tpu_aot.Runner(str(tmp_path / "cache.jsonl"), refresh=False)
  config = tpu_aot.one_b_config(tpu_aot.Plan.make(quick=True), "baseline")
  assert "v9z" in run("bad topology", config, "v9z-8", ("train",))["error"]
  monkeypatch.setattr(tpu_aot, "_compile_program", _die)
  report = run("k", None, "v5e-8", ("train",))
  assert report["crashed"] and "died" in report["error"] and run.done["k"] is report


def _die(*args):
  os._exit(9)  # as a process the OOM killer takes


class _Unstartable(multiprocessing.context.SpawnProcess):

  def start(self):
    raise RuntimeError("cannot start: the caller lacks the __main__ guard")


def test_a_compile_process_that_cannot_start_raises_and_is_not_cached(monkeypatch, tmp_path):
  path = tmp_path / "cache.jsonl"
  run = tpu_aot.Runner(str(path), refresh=False)
  monkeypatch.setattr(multiprocessing.get_context("spawn"), "Process", _Unstartable)
  with pytest.raises(RuntimeError, match="__main__ guard"):
    run("k", None, "v5e-8", ("train",))
  assert "k" not in run.done and not path.exists()


def test_7b_rows_are_costed_by_their_programs_and_an_older_program_is_compiled_again(tmp_path):
  plan = tpu_aot.Plan.make(quick=False)
  dense, sparse = (f"7b:False:{name}:v5p:2x2x2:fsdp:1:{plan.paper_shape}" for name in ("llava15_7b", "pmod_llava15_7b"))
  older = "program itself: its FLOPs, bytes and estimates count each loop's body ONCE"
  costed = {**_memory_program(60.0), **_cost_program(0.4), "memory": _memory_program(60.0)["memory"], "fits": True}
  entries = [
      # Both programs compiled before loops were weighted; only the dense one compiled again since.
      {"key": f"{dense}:twin=False", "report": _report(_memory_program(60.0), costs_from=older)},
      {"key": f"{dense}:{tpu_aot.PROGRAM_COSTS_KEY}", "report": _report(costed, costs_from=tpu_aot.aot.PROGRAM_COSTS)},
      {"key": f"{sparse}:twin=False", "report": _report(_memory_program(50.0), costs_from=older)},
  ]
  path = tmp_path / "cache.jsonl"
  path.write_text("".join(json.dumps(e) + "\n" for e in entries))

  def report(run):
    paper = tpu_aot.section_paper(plan, run, ("llava15_7b", "pmod_llava15_7b"))
    pmod = tpu_aot.section_pmod_7b(plan, run, paper)
    one_b = tpu_aot.section_one_b(plan, run)
    dense_found = paper[tpu_aot.PMOD_DENSE_REFERENCE]
    notes = tpu_aot.why_missed(plan, one_b, pmod_7b_pair=(dense_found["report"], pmod or {}, dense_found["topology"]))
    return pmod, tpu_aot.markdown(plan, "cmd", one_b, {}, paper, pmod, {}, run, notes)

  run = tpu_aot.Runner(str(path), refresh=False, compile_missing=False, program_costs=r"^7b:")
  pmod, text = report(run)
  assert (
      "| LLaVA-1.5-7B | v5p | v5p:2x2x2 (8 chips) | fsdp | 1 | 60.00 | 400.00 ms | roofline (program's own) |" in text
  )
  assert "Rows marked (program's own)" in text
  # Which term sets each costed row's roofline; the p-MoD row, memory only, has none.
  assert "- LLaVA-1.5-7B v5p: compute 100.00 ms, HBM 400.00 ms (memory-bound)" in text
  assert "- p-MoD-LLaVA-1.5-7B v5p:" not in text
  # p-MoD's older program counts each loop body once: it is not used, its loop-weighted compile is pending.
  assert pmod["costs_pending"] and f"{sparse}:{tpu_aot.PROGRAM_COSTS_KEY}" in run.pending
  assert (
      "| LLaVA-1.5-7B, one image per sample | v5p:2x2x2 | – (loop-weighted recompile not compiled yet) | 1.000 |"
      in text
  )

  sparse_costed = dict(costed, estimated_step_s=0.3, roofline_hbm_s=0.3, roofline_compute_s=0.1, analytic_flops=48.0)
  with open(path, "a") as f:
    entry = {
        "key": f"{sparse}:{tpu_aot.PROGRAM_COSTS_KEY}",
        "report": _report(sparse_costed, costs_from=tpu_aot.aot.PROGRAM_COSTS),
    }
    f.write(json.dumps(entry) + "\n")
  pmod, text = report(tpu_aot.Runner(str(path), refresh=False, compile_missing=False, program_costs=r"^7b:"))
  assert "| LLaVA-1.5-7B, one image per sample | v5p:2x2x2 | 0.750 (program's own) | 0.600 | 0.587 |" in text
  assert "- p-MoD / dense est. step time (LLaVA-1.5-7B train step, v5p:2x2x2): 0.750 (target <= 0.65): MISSED." in text
  # Section 2's p-MoD row shows the costs section 4 compiled.
  assert (
      "| p-MoD-LLaVA-1.5-7B | v5p | v5p:2x2x2 (8 chips) | fsdp | 1 | 60.00 | 300.00 ms | roofline (program's own) |"
      in text
  )
  assert "### Why p-MoD's LLaVA-1.5-7B train step (v5p:2x2x2) is 0.750x the dense one, not <= 0.65x" in text
  assert "- The compiled FLOPs fall to 1.000x (analytic 0.600x)" in text
  # Without --program_costs, the dense reference's costs wait for its twin.
  _, text = report(tpu_aot.Runner(str(path), refresh=False, compile_missing=False))
  assert "| LLaVA-1.5-7B | v5p | v5p:2x2x2 (8 chips) | fsdp | 1 | 60.00 | – | costs not compiled yet | – |" in text


def test_7b_step_times_are_compiled_for_the_rows_asked(tmp_path):
  plan = tpu_aot.Plan.make(quick=False)
  key = f"7b:False:trol_7b:v5p:2x2x2:fsdp:1:{plan.paper_shape}"
  path = tmp_path / "cache.jsonl"
  older = "program itself: its FLOPs, bytes and estimates count each loop's body ONCE"
  entry = {"key": f"{key}:twin=False", "report": _report(_memory_program(55.0), costs_from=older)}
  path.write_text(json.dumps(entry) + "\n")
  for step_times, state in ((None, "memory only"), (re.compile("trol_7b:v5p"), "costs not compiled yet")):
    run = tpu_aot.Runner(str(path), refresh=False, compile_missing=False, program_costs=r"^7b:")
    found = tpu_aot.section_paper(plan, run, ("trol_7b",), start={"v5e": 8, "v5p": 8}, step_times=step_times)
    assert found[("trol_7b", "v5p")]["topology"] == "v5p:2x2x2", found
    text = tpu_aot.markdown(plan, "cmd", {}, {}, found, None, {}, run, [])
    assert f"| TroL-7B-like | v5p | v5p:2x2x2 (8 chips) | fsdp | 1 | 55.00 | – | {state} | – |" in text
    assert (f"{key}:{tpu_aot.PROGRAM_COSTS_KEY}" in run.pending) == (step_times is not None)
