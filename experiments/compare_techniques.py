"""Every technique against the baseline on synthetic_vqa, same tiny model, same budget, several seeds.

  python experiments/compare_techniques.py                       # 3 seeds x 7 variants, ~30 min on 2 CPU cores
  python experiments/compare_techniques.py --steps=3500 --eval_examples=500   # the demo's budget, ~4 h

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
from llvm_jax.data.pipeline import make_iterator, open_data_source  # noqa: E402
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
  return config_utils.with_techniques(config_utils.model_config(demo.get_config()), techniques,
                                      deepstack=DEEPSTACK, pmod=PMOD)


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
    config.data.packing = False  # one image per row: the crops travel per image slot
    config.data.max_images = 1
  config.train.update(log_every=10, checkpoint_every=steps)
  return config


def train(config, workdir: str, source=None) -> dict:
  model = LLVM(config_utils.model_config(config))
  tokenizer = main.resolve_tokenizer(config, workdir)
  mesh = trainer.mesh_from_config(config)
  data = make_iterator(config.data, tokenizer, num_image_tokens=model.config.tokens_per_image,
                       image_token=config.image_token, mesh=mesh, mode="train", source=source)
  last = trainer.train(config, workdir, data, main.make_evaluators(config, workdir, model, tokenizer), model)
  last.pop("params")
  return last


def run(name: str, seed: int, args) -> dict:
  workdir = os.path.join(args.workdir, f"{name}_steps{args.steps}_eval{args.eval_examples}", f"seed{seed}")
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
      "name": name, "seed": seed, "workdir": workdir, "wall_seconds": time.time() - start,
      "accuracy": last["eval/test/accuracy"], "chance": last["eval/test/chance"],
      "loss_curve": [(l["step"], l["train/loss"]) for l in train_lines],
      # Steady state: the median step time after the first logs (compile and warm-up excluded).
      "step_time": float(np.median([l["train/step_time"] for l in train_lines[len(train_lines) // 4:]])),
  }
  with open(done, "w") as f:
    json.dump(result, f)
  return result


def write_report(results: dict[str, list[dict]], args) -> str:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(args.out, exist_ok=True)
  base_step = np.mean([r["step_time"] for r in results["baseline"]])
  rows, points = [], []
  for name, runs in results.items():
    cfg = model_config(VARIANTS[name])
    report = cost.report(cfg, TEXT_TOKENS)
    acc = np.asarray([r["accuracy"] for r in runs])
    step_ratio = np.mean([r["step_time"] for r in runs]) / base_step
    rows.append(f"| {name} | {acc.mean():.3f} ± {acc.std():.3f} | {report['params']:,} | "
                f"{report['train_flops_per_sample'] / 1e6:.1f} | {report['prefill_flops'] / 1e6:.1f} | "
                f"{report['kv_cache_bytes'] / 1024:.1f} | {step_ratio:.2f} |")
    points.append((name, report["prefill_flops"], acc.mean(), acc.std()))
  chance = np.mean([r["chance"] for runs in results.values() for r in runs])
  base = demo.get_config()
  command = "python experiments/compare_techniques.py " + " ".join(sys.argv[1:])
  text = "\n".join([
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
  ])
  with open(os.path.join(args.out, "compare.md"), "w") as f:
    f.write(text)

  fig, ax = plt.subplots(figsize=(7, 4))
  for name, runs in results.items():
    offset = args.steps if name == "phantom+po" else 0  # PO continues the Phantom run
    steps = [s + offset for s, _ in runs[0]["loss_curve"]]
    n = min(len(r["loss_curve"]) for r in runs)
    mean = np.mean([[l for _, l in r["loss_curve"][:n]] for r in runs], axis=0)
    ax.plot(steps[:n], mean, label=name)
  ax.set(xlabel="step (PO steps follow the Phantom SFT run)", ylabel="train loss (mean over seeds)", yscale="log")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "compare_loss.png"), dpi=100)
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, flops_, mean, std in points:
    ax.errorbar(flops_ / 1e6, mean, yerr=std, fmt="o", capsize=3)
    ax.annotate(name, (flops_ / 1e6, mean), fontsize=8, xytext=(4, 4), textcoords="offset points")
  ax.axhline(chance, color="gray", ls="--", lw=1, label="chance (question prior)")
  ax.set(xlabel="prefill MFLOPs / sample", ylabel="test accuracy")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "compare_accuracy_vs_flops.png"), dpi=100)
  return text


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
  args = parser.parse_args()
  names = args.variants.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown or "baseline" not in names:
    parser.error(f"--variants must include baseline and come from {list(VARIANTS)}; unknown: {unknown}")
  from absl import flags

  flags.FLAGS.mark_as_parsed()
  results = {name: [run(name, seed, args) for seed in range(args.seeds)] for name in names}
  print(write_report(results, args))


if __name__ == "__main__":
  main_cli()
