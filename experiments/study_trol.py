"""TroL study: does traversing each layer twice buy the capacity of a deeper model, at the same
parameter count?

  python experiments/study_trol.py                 # 3 variants x 3 seeds, ~40 min on 2 CPU cores
  python experiments/study_trol.py --replot        # redraw from the finished runs

Task: --dataset (default synthetic_vqa/large, the demo's: colour, shape, count and position
questions, a quarter of them multiple choice). Model: configs/demo.py's (width 64, 2-layer ViT) with
an LLM of --layers layers. Variants:
- baseline: the --layers-layer LLM.
- trol: the same LLM with TroL on every layer (each layer re-applied to its own output, a token-wise
  gate mixing the two passes): about 2x the decoder FLOPs, 0.1% more parameters.
- baseline_2x: a baseline of 2 x --layers layers: 2x the decoder FLOPs and 2x its parameters.
If TroL buys capacity, trol lands between baseline and baseline_2x, near baseline_2x.

Full budget on a TPU slice (same script, longer runs):
  python experiments/study_trol.py --steps=20000 --seeds=5 --jobs=1
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studies  # noqa: E402
from studies import Variant  # noqa: E402

TEXT_TOKENS = 40
STYLES = {
    "baseline": dict(color="black", ls="--", marker="o"),
    "trol": dict(color="tab:blue", ls="-", marker="s"),
    "baseline_2x": dict(color="tab:orange", ls="-.", marker="D"),
}


def variants(args) -> list[Variant]:
  base = f"dataset={args.dataset},steps={args.steps}"
  ev = (studies.eval_override(args),)
  return [
      Variant("baseline", f"{base},layers={args.layers}", ev),
      Variant("trol", f"{base},layers={args.layers},technique=trol", ev),
      Variant("baseline_2x", f"{base},layers={2 * args.layers}", ev),
  ]


def verdict(acc: dict[str, np.ndarray]) -> str:
  """Whether this run supports TroL's claim (more capacity at the same parameters), and why not."""
  t_trol = studies.welch_t(acc["trol"], acc["baseline"])
  t_depth = studies.welch_t(acc["baseline_2x"], acc["baseline"])
  if t_trol > studies.SIGNIFICANT_T:
    return "supports the claim at this scale: TroL beats the baseline of equal parameters significantly."
  if not t_depth > studies.SIGNIFICANT_T:  # (nan, with one seed, is no evidence either)
    return (
        "not testable at this budget. Even twice the depth does not beat the baseline significantly "
        f"(n = {min(map(len, acc.values()))}), so "
        "the task does not yet reward capacity; TroL's mean gain moves with the deeper model's, which is consistent "
        "with the claim but no evidence for it. A harder task or longer runs (the docstring's full budget) are needed."
    )
  return "does not support the claim here: depth helps significantly, TroL at the same parameters does not."


def write(results, args) -> None:
  rep = studies.cost_reports(results, TEXT_TOKENS)
  acc = {n: studies.accuracies(r) for n, r in results.items()}
  types = sorted({k.split("/", 1)[1] for runs in results.values() for k in runs[0].eval if k.startswith("accuracy/")})
  cols = [
      studies.accuracy_column("accuracy", "test accuracy (mean ± std)"),
      *[studies.accuracy_column(f"accuracy/{t}", t) for t in types],
      ("params", lambda n, _: f"{rep[n]['params']:,}"),
      ("prefill MFLOPs", lambda n, _: f"{rep[n]['prefill_flops'] / 1e6:.1f}"),
      ("train MFLOPs / sample", lambda n, _: f"{rep[n]['train_flops_per_sample'] / 1e6:.1f}"),
      studies.step_time_column(),
  ]
  gap = acc["baseline_2x"].mean() - acc["baseline"].mean()
  t_depth = studies.welch_t(acc["baseline_2x"], acc["baseline"])
  if abs(t_depth) > studies.SIGNIFICANT_T:
    share = f"TroL recovers {(acc['trol'].mean() - acc['baseline'].mean()) / gap:.0%} of the depth gain"
  else:
    share = "doubling the depth gives no significant gain here, so there is no depth gain for TroL to recover"
  findings = [
      "## Findings",
      "",
      f"- trol − baseline: {acc['trol'].mean() - acc['baseline'].mean():+.3f} (Welch t = "
      f"{studies.welch_t(acc['trol'], acc['baseline']):.1f}); baseline_2x − baseline: {gap:+.3f} (t = {t_depth:.1f}); "
      f"{share}. TroL adds {rep['trol']['params'] / rep['baseline']['params'] - 1:.1%} parameters (baseline_2x: "
      f"{rep['baseline_2x']['params'] / rep['baseline']['params'] - 1:.0%}).",
      f"- Verdict: {verdict(acc)}",
      "",
  ]
  chance = studies.mean_chance(results)
  lines = [
      *studies.header("TroL: capacity from traversing layers, at the same parameters", "study_trol.py", args, results),
      f"Task `{args.dataset}` (chance, the blind question prior: {chance:.3f}). Model: configs/demo.py's, LLM width 64, "
      f"{args.layers} layers (baseline_2x: {2 * args.layers}). Costs per sample of one image and {TEXT_TOKENS} text "
      "tokens.",
      "",
      *studies.table(results, cols),
      *findings,
  ]
  studies.write_report(
      args.out,
      "study_trol.md",
      lines,
      [("accuracy vs parameters and FLOPs", "trol_accuracy.png"), ("train loss", "trol_loss.png")],
      results,
  )
  plot(results, rep, args.out)


def plot(results, rep, out: str) -> None:
  plt = studies.pyplot()
  n = len(next(iter(results.values())))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  studies.accuracy_points(axes[0], results, STYLES, lambda k: rep[k]["params"] / 1e3)
  axes[0].set(xlabel="parameters (thousands)", ylabel="test accuracy")
  studies.accuracy_points(axes[1], results, STYLES, lambda k: rep[k]["train_flops_per_sample"] / 1e6)
  axes[1].set(xlabel="train MFLOPs / sample")
  for ax in axes:
    studies.chance_line(ax, results)
    ax.grid(True, alpha=0.3)
  fig.suptitle(f"TroL vs depth: test accuracy, mean ± std over n = {n} seeds")
  axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
  studies.save(fig, out, "trol_accuracy.png")
  plt.close(fig)
  studies.loss_figure(results, STYLES, out, "trol_loss.png", "train loss, mean ± std over seeds")


def main() -> None:
  p = studies.parser(__doc__, steps=1000)
  p.add_argument("--dataset", default="synthetic_vqa/large")
  p.add_argument("--layers", type=int, default=2)
  args = p.parse_args()
  results, root = studies.run_study(
      args, "study_trol", variants(args), f"layers{args.layers}", args.dataset.replace("/", "-")
  )
  write(results, args)
  print(open(os.path.join(args.out, "study_trol.md")).read())


if __name__ == "__main__":
  main()
