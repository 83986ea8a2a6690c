"""What the technique studies (experiments/study_*.py) share: runs through the CLI, seeds, tables, figures.

Every run is one `python -m llvm_jax.main --config=configs/demo.py:ARG [--config.X=Y ...]` in its own
workdir (the command a user would type; it is written to the run's `command.txt` and quoted in the
results). A finished run (its metrics.jsonl holds the final eval) is reused when a study is re-run;
an unfinished one resumes from its checkpoint, which is what `llvm_jax.main` does in a workdir.
Runs go `--jobs` at a time (tiny models use a CPU core poorly, so two at once finish sooner than
one after the other on two cores).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "experiments", "results")
sys.path.insert(0, REPO)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One arm of a study: the demo config's arg string plus command-line overrides."""

  name: str
  arg: str
  overrides: tuple[str, ...] = ()
  # Another variant's run (same seed) whose checkpoint this one starts from (e.g. PO after SFT).
  init_from: str | None = None


@dataclasses.dataclass
class RunResult:
  name: str
  seed: int
  workdir: str
  command: str
  wall_seconds: float
  eval: dict[str, float]  # the last eval's metrics, without the 'eval/test/' prefix
  loss_curve: list[tuple[int, float]]
  step_time: float  # median steady-state train step, seconds

  @property
  def accuracy(self) -> float:
    return self.eval["accuracy"]


def command(variant: Variant, seed: int, workdir: str, init_checkpoint: str | None = None) -> list[str]:
  cmd = [
      sys.executable,
      "-m",
      "llvm_jax.main",
      f"--config=configs/demo.py:{variant.arg}",
      f"--workdir={workdir}",
      f"--config.seed={seed}",
      f"--config.data.seed={seed}",
      *variant.overrides,
  ]
  if init_checkpoint:
    cmd.append(f"--config.init_checkpoint={init_checkpoint}")
  return cmd


def _final_eval(workdir: str) -> dict[str, float] | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  lines = [json.loads(line) for line in open(path) if line.strip()]
  evals = [l for l in lines if "eval/test/accuracy" in l]
  config = json.load(open(os.path.join(workdir, "config.json")))
  if not evals or evals[-1]["step"] < config["train"]["total_steps"]:
    return None
  return {k[len("eval/test/") :]: v for k, v in evals[-1].items() if k.startswith("eval/test/")}


def _result(variant: Variant, seed: int, workdir: str, cmd: list[str], wall: float) -> RunResult:
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl")) if line.strip()]
  train = [l for l in lines if "train/loss" in l]
  times = [l["train/step_time"] for l in train[len(train) // 4 :]] or [float("nan")]
  return RunResult(
      name=variant.name,
      seed=seed,
      workdir=workdir,
      command=shlex.join(["python", *cmd[1:]]).replace(REPO + os.sep, ""),
      wall_seconds=wall,
      eval=_final_eval(workdir) or {},
      # By step: a resumed run logs the steps after its checkpoint again; the last write wins.
      loss_curve=sorted({l["step"]: l["train/loss"] for l in train}.items()),
      step_time=float(np.median(times)),
  )


def run_one(
    variant: Variant, seed: int, root: str, init_checkpoint: str | None = None, replot: bool = False
) -> RunResult:
  """Trains and evaluates one (variant, seed) through the CLI, or reads the finished run back
  (`replot`: only read back; an unfinished run is an error, never a training run)."""
  workdir = os.path.join(root, variant.name, f"seed{seed}")
  cmd = command(variant, seed, workdir, init_checkpoint)
  wall_file = os.path.join(workdir, "wall_seconds.txt")
  if _final_eval(workdir) is None:
    if replot:
      raise SystemExit(f"--replot: {workdir} has no finished run; run the study without --replot")
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "command.txt"), "w") as f:
      f.write(shlex.join(cmd) + "\n")
    start = time.time()
    with open(os.path.join(workdir, "run.log"), "a") as log:
      proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=_env())
    if proc.returncode != 0 or _final_eval(workdir) is None:
      raise RuntimeError(f"{variant.name} seed {seed} failed (exit {proc.returncode}); see {workdir}/run.log")
    with open(wall_file, "w") as f:
      f.write(f"{time.time() - start:.1f}\n")
  wall = float(open(wall_file).read()) if os.path.exists(wall_file) else float("nan")
  return _result(variant, seed, workdir, cmd, wall)


def _env() -> dict[str, str]:
  env = dict(os.environ)
  # Seeds 2.. of a variant reuse its compiled programs.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  return env


def run_all(
    variants: Sequence[Variant], seeds: int, root: str, jobs: int, replot: bool = False, partial: bool = False
) -> dict[str, list[RunResult]]:
  """Every variant x seed, `jobs` at a time; variants with `init_from` wait for their source run.
  `replot`: read the finished runs back without training; with `partial`, unfinished runs are left
  out (the report states n per variant) instead of being an error."""
  by_name = {v.name: v for v in variants}
  futures: dict[tuple[str, int], concurrent.futures.Future] = {}
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:

    def submit(v: Variant, seed: int) -> concurrent.futures.Future:
      if (v.name, seed) in futures:
        return futures[(v.name, seed)]
      if v.init_from is None:
        fut = pool.submit(run_one, v, seed, root, None, replot)
      else:
        source = submit(by_name[v.init_from], seed)
        fut = pool.submit(lambda: run_one(v, seed, root, source.result().workdir, replot))
      futures[(v.name, seed)] = fut
      return fut

    # Seed-major order: seed 0 of every variant first, so a partial study already compares them all;
    # variants that continue another run last, so no worker sits waiting for its source.
    for dependent in (False, True):
      for seed in range(seeds):
        for v in variants:
          if (v.init_from is not None) == dependent:
            submit(v, seed)
    results: dict[str, list[RunResult]] = {}
    for v in variants:
      for s in range(seeds):
        try:
          results.setdefault(v.name, []).append(futures[(v.name, s)].result())
        except SystemExit as e:
          if not partial:
            raise
          print(f"--partial: leaving out {v.name} seed {s}: {e}", file=sys.stderr)
    return {name: runs for name, runs in results.items() if runs}


def parser(doc: str, steps: int, seeds: int = 3) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--seeds", type=int, default=seeds)
  p.add_argument("--steps", type=int, default=steps)
  p.add_argument("--jobs", type=int, default=2, help="runs at once")
  p.add_argument("--eval_examples", type=int, default=300, help="first N examples of the test split")
  p.add_argument("--workdir", default=None, help="default workdirs/<study>")
  p.add_argument("--out", default=RESULTS)
  p.add_argument("--replot", action="store_true", help="only redraw the results from the finished runs")
  p.add_argument(
      "--partial", action="store_true", help="with --replot: leave unfinished runs out (n per variant is stated)"
  )
  return p


def workdir_root(args: argparse.Namespace, study: str, *extra: str) -> str:
  """Where a study's runs go: --workdir, else workdirs/<study>/<budget> (so runs of another budget
  are never mistaken for this one's)."""
  if args.workdir:
    return args.workdir
  return os.path.join(REPO, "workdirs", study, "_".join([f"steps{args.steps}", f"eval{args.eval_examples}", *extra]))


def mean_std(values: Sequence[float]) -> str:
  a = np.asarray(values, dtype=float)
  return f"{a.mean():.3f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.3f}"


def cost_reports(results: dict[str, list[RunResult]], text_tokens: int) -> dict[str, dict[str, Any]]:
  """llvm_jax.cost.report of each variant's trained model, per sample of one image and `text_tokens`."""
  from llvm_jax import cost

  return {name: cost.report(model_config(runs[0]), text_tokens) for name, runs in results.items()}


def model_config(result: RunResult):
  """The run's model (from the config.json the run wrote), for analytic costs."""
  from llvm_jax.models.config import LLVMConfig

  return LLVMConfig.from_dict(json.load(open(os.path.join(result.workdir, "config.json")))["model"])


def header(title: str, script: str, args: argparse.Namespace, results: dict[str, list[RunResult]]) -> list[str]:
  wall = sum(r.wall_seconds for runs in results.values() for r in runs)
  counts = {name: len(runs) for name, runs in results.items()}
  n = (
      f"n = {args.seeds} seeds per variant"
      if set(counts.values()) == {args.seeds}
      else "n = "
      + ", ".join(f"{k}: {v}" for k, v in counts.items())
      + f" seeds of the {args.seeds} planned (unfinished runs left out)"
  )
  return [
      f"# {title}",
      "",
      f"Produced by `{study_command(script)}`"
      + (" (this report redrawn from the finished runs with --replot)" if args.replot else "")
      + f" on {datetime.date.today()}: "
      f"{n} (mean ± sample std), {args.steps} training steps each, test accuracy on "
      f"the first {args.eval_examples} test examples (greedy generation, VQA exact match). Summed wall time of the "
      f"runs: {wall / 60:.0f} min on this shared 2-core CPU machine.",
      "",
  ]


def study_command(script: str) -> str:
  """The command that trains this study: the script and its flags, without the redraw-only ones."""
  flags_, skip = [], False
  for a in sys.argv[1:]:
    if skip:
      skip = False
    elif a == "--out":
      skip = True  # its value follows
    elif a not in ("--replot", "--partial") and not a.startswith("--out="):
      flags_.append(a)
  return " ".join(["python", f"experiments/{script}", *flags_])


def commands_section(results: dict[str, list[RunResult]]) -> list[str]:
  lines = ["## Exact commands (seed 0; other seeds change `--config.seed` and `--config.data.seed`)", "", "```"]
  lines += [runs[0].command for runs in results.values()]
  return lines + ["```", ""]


# -- figures ---------------------------------------------------------------------------------------
def pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 8.5})
  return plt


def loss_band(ax, runs: Sequence[RunResult], label: str, color, ls: str = "-") -> None:
  """Mean ± std over seeds of the train-loss curves (on the steps every seed logged)."""
  n = min(len(r.loss_curve) for r in runs)
  steps = np.asarray([s for s, _ in runs[0].loss_curve[:n]])
  curves = np.asarray([[l for _, l in r.loss_curve[:n]] for r in runs])
  mean, std = curves.mean(0), curves.std(0)
  ax.plot(steps, mean, color=color, ls=ls, lw=1.5, label=label)
  ax.fill_between(steps, np.maximum(mean - std, 1e-6), mean + std, color=color, alpha=0.18, lw=0)


def loss_panel(ax, results: dict[str, list[RunResult]], styles: dict[str, dict], title: str) -> None:
  """Train-loss bands from 10% of training on (the first steps' fall from ~4 would flatten the rest)."""
  from matplotlib import ticker

  last = max(r.loss_curve[-1][0] for runs in results.values() for r in runs)
  start = 0.1 * last
  visible = []
  for name, runs in results.items():
    style = styles[name]
    loss_band(ax, runs, name, style["color"], style.get("ls", "-"))
    visible += [l for r in runs for s, l in r.loss_curve if s >= start]
  ax.set_xlim(start, last)
  ax.set_ylim(0.92 * min(visible), 1.08 * max(visible))
  ax.set_yscale("log")
  ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.yaxis.set_minor_locator(ticker.LogLocator(subs=np.arange(1, 10) / 1.0))
  # Label the minor ticks whose leading digit is 4, 6, 8 or 9 too: the range is often under a decade.
  ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "4689" else ""))
  ax.set(xlabel="training step", ylabel="train loss (log)", title=title)
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(loc="upper right")


def accuracy_points(
    ax,
    results: dict[str, list[RunResult]],
    styles: dict[str, dict],
    x_of: Callable[[str], float],
    key: str = "accuracy",
    label_suffix: str = "",
) -> None:
  """Mean ± std accuracy of each variant at x = x_of(name), with its marker and colour. Points of
  (nearly) equal x are nudged apart so their error bars do not hide each other."""
  xs = {name: x_of(name) for name in results}
  span = (max(xs.values()) - min(xs.values())) or abs(next(iter(xs.values()))) or 1.0
  placed: list[float] = []
  for name, runs in results.items():
    acc = np.asarray([r.eval[key] for r in runs])
    style = styles[name]
    x = xs[name]
    x += 0.025 * span * sum(abs(x - p) < 0.02 * span for p in placed)
    placed.append(xs[name])
    mean, std = acc.mean(), (acc.std(ddof=1) if len(acc) > 1 else 0.0)
    # Mean ± std, clipped to [0, 1], and each seed as a faint dot (n = 3: the spread says more than a bar).
    yerr = [[mean - max(0.0, mean - std)], [min(1.0, mean + std) - mean]]
    ax.errorbar(
        x,
        mean,
        yerr=yerr,
        fmt=style.get("marker", "o"),
        color=style["color"],
        ms=7,
        capsize=3,
        label=name + label_suffix,
    )
    ax.plot([x] * len(acc), acc, ".", color=style["color"], alpha=0.35, ms=5)


def plain_log_axis(ax, axis: str = "x") -> None:
  """A log axis labelled with plain numbers (20, 30, 50) rather than 2x10^1."""
  from matplotlib import ticker

  target = ax.xaxis if axis == "x" else ax.yaxis
  target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  target.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "2357" else ""))


def mean_chance(results: dict[str, list[RunResult]], key: str = "chance") -> float:
  """The blind question prior's accuracy (`chance`), averaged over the runs that measured it (nan if none)."""
  values = [r.eval[key] for runs in results.values() for r in runs if key in r.eval]
  return float(np.mean(values)) if values else float("nan")


def chance_line(ax, results: dict[str, list[RunResult]], key: str = "chance") -> None:
  chance = mean_chance(results, key)
  if not np.isnan(chance):
    ax.axhline(chance, color="gray", ls=":", lw=1.2, label="chance (blind question prior)")


def save(fig, out: str, name: str) -> str:
  os.makedirs(out, exist_ok=True)
  fig.tight_layout()
  path = os.path.join(out, name)
  fig.savefig(path, dpi=120)
  return name


def loss_figure(results: dict[str, list[RunResult]], styles: dict[str, dict], out: str, name: str, title: str) -> None:
  """One train-loss panel (`loss_panel`) saved as out/name."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  loss_panel(ax, results, styles, title)
  save(fig, out, name)
  plt.close(fig)


def write_report(out: str, name: str, lines: Sequence[str], figures: Sequence[tuple[str, str]], results) -> str:
  """Writes out/name: `lines`, then each (alt text, png) figure, then the exact commands; returns the text."""
  figure_lines = [line for alt, png in figures for line in (f"![{alt}]({png})", "")]
  text = "\n".join([*lines, "", *figure_lines, *commands_section(results)])
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, name), "w") as f:
    f.write(text)
  return text


def run_study(args: argparse.Namespace, study: str, variants: Sequence[Variant], *root_extra: str):
  """Runs (or with --replot reads back) every variant x seed of a study; returns (results, root).
  The raw results also go to root/results.json."""
  flags_parsed()
  root = workdir_root(args, study, *root_extra)
  results = run_all(variants, args.seeds, root, args.jobs, args.replot, args.partial)
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump(as_dict(results), f)
  return results, root


def flags_parsed() -> None:
  """The study process imports llvm_jax modules that define absl flags; mark them parsed."""
  from absl import flags

  flags.FLAGS.mark_as_parsed()


def eval_override(args: argparse.Namespace) -> str:
  return f"--config.eval_specs=test,max_examples={args.eval_examples}"


def as_dict(results: dict[str, list[RunResult]]) -> dict[str, Any]:
  return {name: [dataclasses.asdict(r) for r in runs] for name, runs in results.items()}


Column = tuple[str, Callable[[str, list[RunResult]], str]]


def table(results: dict[str, list[RunResult]], columns: Sequence[Column]) -> list[str]:
  """A markdown table: one row per variant, `columns` = (header, cell(name, runs))."""
  lines = ["| variant | " + " | ".join(h for h, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
  for name, runs in results.items():
    lines.append(f"| {name} | " + " | ".join(cell(name, runs) for _, cell in columns) + " |")
  return lines + [""]


def accuracy_column(key: str = "accuracy", header_text: str | None = None) -> Column:
  return (header_text or f"test {key} (mean ± std)", lambda _, runs: mean_std([r.eval[key] for r in runs]))


def step_time_column() -> Column:
  def cell(name: str, runs: list[RunResult]) -> str:
    return f"{np.mean([r.step_time for r in runs]) * 1e3:.0f}"

  return ("train step (ms; shared CPU, indicative only)", cell)


def accuracies(runs: Sequence[RunResult], key: str = "accuracy") -> np.ndarray:
  return np.asarray([r.eval[key] for r in runs], dtype=float)


def still_falling(runs: Sequence[RunResult]) -> tuple[float, float]:
  """Mean train loss over the 2nd-to-last and the last tenth of training (averaged over seeds): a
  clear drop between them means the run had not converged."""
  first, last = [], []
  for r in runs:
    losses = [l for _, l in r.loss_curve]
    tenth = max(1, len(losses) // 10)
    first.append(np.mean(losses[-2 * tenth : -tenth]))
    last.append(np.mean(losses[-tenth:]))
  return float(np.mean(first)), float(np.mean(last))


def above_prior(runs: Sequence[RunResult], margin: float = 0.05) -> int:
  """Runs whose test accuracy beats their blind question prior (`chance`) by more than `margin`:
  the runs that learned to read the image at all."""
  return sum(r.eval["accuracy"] > r.eval["chance"] + margin for r in runs)


SIGNIFICANT_T = 2.8  # |Welch t| above this: two-sided p < 0.05 at n = 3 + 3 (about 4 degrees of freedom)


def welch_t(a: Sequence[float], b: Sequence[float]) -> float:
  """Welch's t statistic of mean(a) - mean(b) (|t| > ~2.8 at n = 3 + 3: p < 0.05 two-sided)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if len(a) < 2 or len(b) < 2:
    return float("nan")
  se = np.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
  return float((a.mean() - b.mean()) / se) if se > 0 else float("inf") * np.sign(a.mean() - b.mean())
