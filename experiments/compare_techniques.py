"""Every technique against the baseline on synthetic_vqa, same tiny model, same budget, several seeds.

  python experiments/compare_techniques.py                       # 3 seeds x 7 variants, ~30 min on 2 CPU cores
  python experiments/compare_techniques.py --steps=3500 --eval_examples=500   # the demo's budget, ~4 h
  python experiments/compare_techniques.py --replot    # redraw compare.md and the figures from the saved runs

Trains baseline, +TroL, +Phantom, +Phantom then Phantom Optimization, +DeepStack, +p-MoD and all four
together (each a config switch on the same model) for --steps SFT steps per seed, evaluates VQA
accuracy on the first --eval_examples of the test split (with the blind question-prior chance level), and writes
experiments/results/compare.md (accuracy mean ± std, params, train / prefill FLOPs, KV cache,
measured step-time ratio to the baseline) and compare_loss.png / compare_accuracy_vs_flops.png.
'+PO' continues the Phantom run with --po_steps PO steps on preference pairs made from the training
split (llvm_jax.data.synthetic.preference_records), so it has that many more steps than the others.
Finished runs are kept in --workdir and reused when the script is run again.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# Seeds 2 and 3 of a variant reuse its compiled programs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import numpy as np  # noqa: E402

from configs import demo  # noqa: E402
from llvm_jax import config_utils, cost, main  # noqa: E402
from llvm_jax.data import synthetic  # noqa: E402
from llvm_jax.data.pipeline import open_data_source  # noqa: E402
from llvm_jax.models.config import DeepStackConfig, PmodConfig  # noqa: E402
from llvm_jax.models.llvm import LLVM  # noqa: E402
from llvm_jax.train import trainer  # noqa: E402

TEXT_TOKENS = 40  # a typical prompt + answer of synthetic_vqa, for the analytic costs
# 4 layers: DeepStack's 2 x 2 crop groups go before layers 0..3 (start=0); p-MoD routes layers 1..3.
DEEPSTACK = DeepStackConfig(start=0)
PMOD = PmodConfig(schedule="explicit", layers=(1, 2, 3), ratios=(0.5, 0.5, 0.5))
VARIANTS = {
    "baseline": "baseline",
    "trol": "trol",
    "phantom": "phantom",
    "phantom+po": "phantom",
    "deepstack": "deepstack",
    "pmod": "pmod",
    "all_four": "all_four",
}


def model_config(techniques: str):
  """The demo's model (configs/demo.py) with `techniques` switched on."""
  return config_utils.with_techniques(
      config_utils.model_config(demo.get_config()), techniques, deepstack=DEEPSTACK, pmod=PMOD
  )


def experiment_config(techniques: str, seed: int, steps: int, lr: float, args):
  """The demo's recipe (data, optimiser, frozen-ViT rules) with the variant's model and this seed."""
  config = demo.get_config(f"steps={steps},lr={lr},batch={args.batch}")
  cfg = model_config(techniques)
  with config.unlocked():
    config.model = config_utils.model_block(cfg)
    config.evals.test.max_examples = args.eval_examples
  config.seed = seed
  config.data.update(data_dir=args.data_dir, seed=seed)
  if cfg.deepstack is not None:
    config.data.deepstack_grid = cfg.deepstack.num_crops
  if cfg.deepstack is not None or cfg.decoder.pmod is not None:
    # One image per row: DeepStack's crops travel per image slot; p-MoD's kept length is sized for it.
    config.data.packing = False
    config.data.max_images = 1
  config.train.update(log_every=10, checkpoint_every=steps)
  return config


def train(config, workdir: str, source=None) -> dict:
  model = LLVM(config_utils.model_config(config))
  tokenizer = main.resolve_tokenizer(config, workdir)
  data = main.train_iterator(config, model, tokenizer, source)
  last = trainer.train(config, workdir, data, main.make_evaluators(config, workdir, model, tokenizer), model)
  last.pop("params")
  return last


def run_dir(name: str, seed: int, args) -> str:
  return os.path.join(args.workdir, f"{name}_steps{args.steps}_eval{args.eval_examples}", f"seed{seed}")


def replot_result(name: str, seed: int, args) -> dict:
  """The saved result of a finished run (--replot); a missing one is an error, never a training run."""
  done = os.path.join(run_dir(name, seed, args), "result.json")
  if not os.path.exists(done):
    raise SystemExit(f"--replot: {done} is missing; run without --replot to train it")
  return json.load(open(done))


def run(name: str, seed: int, args) -> dict:
  workdir = run_dir(name, seed, args)
  done = os.path.join(workdir, "result.json")
  if os.path.exists(done):
    return json.load(open(done))
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  if name == "phantom+po":
    sft = run("phantom", seed, args)
    config = experiment_config(VARIANTS[name], seed, args.po_steps, args.lr / 3, args)
    config_utils.set_stage(config, "po2")
    config.init_checkpoint = sft["workdir"]
    config.data.packing = False
    records = open_data_source(config.data.name, "train", args.data_dir)
    source = synthetic.preference_records([records[i] for i in range(len(records))], seed)
    last = train(config, workdir, source)
  else:
    config = experiment_config(VARIANTS[name], seed, args.steps, args.lr, args)
    last = train(config, workdir)
  lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_lines = [l for l in lines if "train/loss" in l]
  result = {
      "name": name,
      "seed": seed,
      "workdir": workdir,
      "wall_seconds": time.time() - start,
      "accuracy": last["eval/test/accuracy"],
      "chance": last["eval/test/chance"],
      "loss_curve": [(l["step"], l["train/loss"]) for l in train_lines],
      # Steady state: the median step time after the first logs (compile and warm-up excluded).
      "step_time": float(np.median([l["train/step_time"] for l in train_lines[len(train_lines) // 4 :]])),
  }
  with open(done, "w") as f:
    json.dump(result, f)
  return result


def write_report(results: dict[str, list[dict]], args) -> str:
  os.makedirs(args.out, exist_ok=True)
  base_step = np.mean([r["step_time"] for r in results["baseline"]])
  rows, points = [], []
  for name, runs in results.items():
    cfg = model_config(VARIANTS[name])
    report = cost.report(cfg, TEXT_TOKENS)
    acc = np.asarray([r["accuracy"] for r in runs])
    step_ratio = np.mean([r["step_time"] for r in runs]) / base_step
    rows.append(
        f"| {name} | {acc.mean():.3f} ± {acc.std():.3f} | {report['params']:,} | "
        f"{report['train_flops_per_sample'] / 1e6:.1f} | {report['prefill_flops'] / 1e6:.1f} | "
        f"{report['kv_cache_bytes'] / 1024:.1f} | {step_ratio:.2f} |"
    )
    points.append((name, report["prefill_flops"], acc.mean(), acc.std()))
  chance = np.mean([r["chance"] for runs in results.values() for r in runs])
  base = demo.get_config()
  command = "python experiments/compare_techniques.py " + " ".join(sys.argv[1:])
  text = "\n".join(
      [
          "# Technique comparison on synthetic_vqa (tiny scale)",
          "",
          f"Produced by `{command.strip()}` on {datetime.date.today()} ({args.seeds} seeds, {args.steps} SFT steps of "
          f"{args.batch} rows x {base.data.seq_len} tokens, lr {args.lr}; '+po': then {args.po_steps} PO steps). Model and "
          f"recipe of configs/demo.py ({base.data.name}, {base.model.vision.image_size} px, "
          f"{model_config('baseline').tokens_per_image} image tokens, {base.model.decoder.num_layers}-layer LLM of width "
          f"{base.model.decoder.embed_dim}; trainable rules {list(map(tuple, base.optim.trainable))}). "
          f"Costs per sample of one image + {TEXT_TOKENS} text tokens (fp32 cache). Step time: median steady-state "
          "train step, this CPU, ratio to the baseline measured in the same run.",
          "",
          f"Test accuracy on the first {args.eval_examples} test examples. Chance level (blind question prior fitted on "
          f"the training split, on the same examples): {chance:.3f}.",
          "",
          "| variant | test accuracy (mean ± std) | params | train MFLOPs / sample | prefill MFLOPs | KV cache (KiB) | step time vs baseline |",
          "|---|---:|---:|---:|---:|---:|---:|",
          *rows,
          "",
          "![loss](compare_loss.png) ![accuracy vs FLOPs](compare_accuracy_vs_flops.png)",
          "",
      ]
  )
  with open(os.path.join(args.out, "compare.md"), "w") as f:
    f.write(text)

  plot(results, points, chance, args.out)
  return text


# One colour, line style and marker per variant, the same in both figures (the baseline dashed and black,
# so no curve hides it).
STYLES = {
    "baseline": dict(color="black", ls="--", marker="o"),
    "trol": dict(color="tab:blue", ls="-", marker="s"),
    "phantom": dict(color="tab:orange", ls="-", marker="^"),
    "phantom+po": dict(color="tab:red", ls="-", marker="v"),
    "deepstack": dict(color="tab:green", ls="-", marker="D"),
    "pmod": dict(color="tab:purple", ls="-", marker="P"),
    "all_four": dict(color="tab:brown", ls="-.", marker="X"),
}


def _band(ax, runs: list[dict], style: dict, label: str) -> None:
  """Mean ± std over seeds of the runs' loss curves (the steps every seed logged)."""
  n = min(len(r["loss_curve"]) for r in runs)
  steps = np.asarray([s for s, _ in runs[0]["loss_curve"][:n]])
  curves = np.asarray([[l for _, l in r["loss_curve"][:n]] for r in runs])
  mean, std = curves.mean(0), curves.std(0)
  ax.plot(steps, mean, color=style["color"], ls=style["ls"], lw=1.4, label=label)
  ax.fill_between(steps, mean - std, mean + std, color=style["color"], alpha=0.15, lw=0)


def _log_axis(ax, axis: str = "y") -> None:
  """A log axis labelled at 1, 1.5, 2, 3, 5 and 7 of each decade (a plain log axis over less than a
  decade may show one label)."""
  from matplotlib import ticker

  target = ax.yaxis if axis == "y" else ax.xaxis
  target.set_major_locator(ticker.LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
  target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  target.set_minor_locator(ticker.LogLocator(subs=np.arange(1, 10)))
  target.set_minor_formatter(ticker.NullFormatter())


def plot(results: dict[str, list[dict]], points: list[tuple], chance: float, out: str) -> None:
  """compare_loss.png (SFT loss per variant; PO's objective on its own panel) and
  compare_accuracy_vs_flops.png, both mean ± std over the seeds (n stated)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  seeds = {len(runs) for runs in results.values()}
  n_text = (
      f"n={seeds.pop()} seeds" if len(seeds) == 1 else "n=" + ", ".join(f"{k}: {len(v)}" for k, v in results.items())
  )
  has_po = "phantom+po" in results
  fig, axes = plt.subplots(
      1,
      2 if has_po else 1,
      figsize=(11 if has_po else 7, 4.2),
      gridspec_kw={"width_ratios": [2.2, 1]} if has_po else None,
      squeeze=False,
  )
  ax = axes[0, 0]
  for name, runs in results.items():
    if name != "phantom+po":
      _band(ax, runs, STYLES.get(name, {"color": None, "ls": "-"}), name)
  ax.set_yscale("log")
  _log_axis(ax)
  ax.set(xlabel="SFT step", ylabel="train loss (cross-entropy)", title=f"SFT train loss, mean ± std over {n_text}")
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=8, ncol=2)
  if has_po:
    ax = axes[0, 1]
    _band(ax, results["phantom+po"], STYLES["phantom+po"], "phantom+po")
    ax.set(
        xlabel="PO step (after the Phantom SFT run)",
        ylabel="PO objective (SFT + λ·SimPO)",
        title="Phantom Optimization",
    )
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "compare_loss.png"), dpi=110)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(7.5, 4.2))
  seen: dict[float, int] = {}
  for name, flops_, mean, std in points:
    style = STYLES.get(name, {"color": None, "marker": "o"})
    # A legend instead of annotations, and points of equal FLOPs (phantom, phantom+po) nudged apart, so
    # neither labels nor error bars collide.
    dodge = 1.0 + 0.025 * seen.get(flops_, 0)
    seen[flops_] = seen.get(flops_, 0) + 1
    ax.errorbar(
        flops_ / 1e6 * dodge, mean, yerr=std, fmt=style["marker"], color=style["color"], capsize=3, ms=7, label=name
    )
  ax.axhline(chance, color="gray", ls=":", lw=1.2, label="chance (blind question prior)")
  ax.set_xscale("log")
  _log_axis(ax, "x")
  ax.set(
      xlabel="prefill MFLOPs / sample (log)",
      ylabel="test VQA accuracy",
      title=f"Test accuracy vs compute: mean ± std over {n_text}",
  )
  ax.grid(True, which="major", alpha=0.3)
  ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  fig.tight_layout()
  fig.savefig(os.path.join(out, "compare_accuracy_vs_flops.png"), dpi=110)
  plt.close(fig)


def main_cli() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--po_steps", type=int, default=30)
  parser.add_argument("--eval_examples", type=int, default=200, help="first N examples of the test split")
  parser.add_argument("--lr", type=float, default=demo.get_config().optim.lr)
  parser.add_argument("--batch", type=int, default=demo.get_config().data.global_batch_size)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "compare"))
  parser.add_argument("--data_dir", default=os.path.join(REPO, "workdirs", "tfds"))
  parser.add_argument("--out", default=os.path.join(REPO, "experiments", "results"))
  parser.add_argument(
      "--replot",
      action="store_true",
      help="only redraw the report and figures from the finished runs in --workdir (no training)",
  )
  args = parser.parse_args()
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown or "baseline" not in names:
    parser.error(f"--variants must include baseline and come from {list(VARIANTS)}; unknown: {unknown}")
  from absl import flags

  flags.FLAGS.mark_as_parsed()
  if args.replot:
    results = {name: [replot_result(name, seed, args) for seed in range(args.seeds)] for name in names}
  else:
    results = {name: [run(name, seed, args) for seed in range(args.seeds)] for name in names}
  print(write_report(results, args))


if __name__ == "__main__":
  main_cli()
