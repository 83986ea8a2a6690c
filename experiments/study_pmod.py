"""p-MoD study: accuracy against decoder FLOPs and KV cache over retention schedules.

  python experiments/study_pmod.py                 # 4 variants x 3 seeds, ~60 min on 2 CPU cores
  python experiments/study_pmod.py --replot        # redraw from the finished runs

Task: synthetic_vqa/basic (colour, shape and position questions, short answers) on 64 px images
with patch 8: 64 image tokens, most of them black background, the redundancy p-MoD is built to
drop. Model: configs/demo.py's (4-layer LLM, width 64, 2-layer ViT). Variants, each a PRD
(progressive ratio decay, shifted cosine) schedule of retention ratios r(l) = cos(pi l/(L-1))/2 + r̄
clamped to [min, max] (layers with r > max stay dense):
- baseline: every layer keeps every vision token.
- pmod_mild: r̄ 0.7, max 0.95, min 0.4.
- pmod_prd: the paper's default, r̄ 0.5, max 0.85, min 0.15.
- pmod_harsh: r̄ 0.3, max 0.7, min 0.05.
Decoder FLOPs and KV bytes are analytic (llvm_jax.flops / llvm_jax.cost) and the KV bytes are also
measured: the cache `sampler`'s prefill allocates for one test prompt, with seed 0's trained weights.

Full budget on a TPU slice (same script, longer runs):
  python experiments/study_pmod.py --steps=20000 --seeds=5 --jobs=1
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import studies  # noqa: E402
from studies import Variant  # noqa: E402

TEXT_TOKENS = 24  # prompt + answer of a basic question, for the analytic costs
SCHEDULES = {"pmod_mild": (0.7, 0.95, 0.4), "pmod_prd": (0.5, 0.85, 0.15), "pmod_harsh": (0.3, 0.7, 0.05)}
STYLES = {
    "baseline": dict(color="black", ls="--", marker="o"),
    "pmod_mild": dict(color="tab:blue", ls="-", marker="s"),
    "pmod_prd": dict(color="tab:purple", ls="-", marker="P"),
    "pmod_harsh": dict(color="tab:red", ls="-", marker="v"),
}


def variants(args) -> list[Variant]:
  base = f"dataset=synthetic_vqa/basic,res=64,steps={args.steps}"
  # One image a row for every variant: p-MoD's kept length is static, sized for rows that hold
  # their image slots' vision tokens (config_utils.finalize rejects p-MoD with packing).
  common = (studies.eval_override(args), "--config.data.packing=False", "--config.data.max_images=1")
  out = [Variant("baseline", base, common)]
  for name, (avg, hi, lo) in SCHEDULES.items():
    out.append(
        Variant(
            name,
            f"{base},technique=pmod",
            (
                *common,
                f"--config.model.decoder.pmod.average_ratio={avg}",
                f"--config.model.decoder.pmod.max_ratio={hi}",
                f"--config.model.decoder.pmod.min_ratio={lo}",
            ),
        )
    )
  return out


def measured_kv_bytes(workdir: str) -> int:
  """Bytes of the KV cache that the sampler's prefill builds for one test prompt (batch of one),
  with the run's trained weights."""
  from llvm_jax import predict, tree_utils
  from llvm_jax.data.pipeline import open_data_source
  from llvm_jax.models import llvm

  p = predict.from_checkpoint(workdir)
  record = open_data_source("synthetic_vqa/basic", "test", os.path.join(studies.REPO, "workdirs", "tfds"))[0]
  batch = p.inputs([record["image"]], record["question"].decode())
  _, cache = llvm.prefill(
      p.model, p.params, batch["tokens"], batch["tokens"].shape[1] + 8, batch["images"], batch.get("image_mask")
  )
  return tree_utils.tree_bytes(cache)


def verdict(acc: dict[str, np.ndarray], decoder: dict[str, float], base: str) -> str:
  """Whether this run supports p-MoD's claim (the baseline's accuracy at ~55-60% of the decoder FLOPs)."""
  if "pmod_prd" not in acc:
    return "the paper's schedule (pmod_prd) did not run."
  t = studies.welch_t(acc["pmod_prd"], acc[base])
  share = decoder["pmod_prd"] / decoder[base]
  worse = [n for n in SCHEDULES if n in acc and studies.welch_t(acc[n], acc[base]) < -studies.SIGNIFICANT_T]
  if not t < -studies.SIGNIFICANT_T:  # (nan, with one seed, is no evidence of a loss)
    return (
        f"consistent with the claim at this scale: the paper's schedule keeps the baseline's accuracy (no significant "
        f"difference, t = {t:.1f}, n = {min(map(len, acc.values()))}) at {share:.0%} of the decoder prefill FLOPs; "
        + (
            f"schedules that lose accuracy significantly: {', '.join(worse)}."
            if worse
            else "no schedule, down to the harshest, loses accuracy significantly."
        )
        + f" With n = {min(map(len, acc.values()))} and a baseline far from perfect, 'no significant loss' is weak evidence, not proof of equality."
    )
  return f"does not support the claim here: the paper's schedule loses accuracy significantly (t = {t:.1f}) at {share:.0%} of the FLOPs."


def write(results, args, root: str) -> None:
  from llvm_jax import flops
  from llvm_jax.models import pmod

  cfgs = {n: studies.model_config(runs[0]) for n, runs in results.items()}
  rep = studies.cost_reports(results, TEXT_TOKENS)
  decoder = {n: flops.prefill_flops(c, TEXT_TOKENS)["decoder"] for n, c in cfgs.items()}
  kv_file = os.path.join(root, "measured_kv.json")
  measured = json.load(open(kv_file)) if os.path.exists(kv_file) else {}
  for name, runs in results.items():
    if name not in measured:
      measured[name] = measured_kv_bytes(runs[0].workdir)
  with open(kv_file, "w") as f:
    json.dump(measured, f)
  base = "baseline"

  def ratios(name: str) -> str:
    r = pmod.layer_ratios(cfgs[name].decoder)
    return ", ".join(f"{l}: {v:.2f}" for l, v in r.items()) or "—"

  cols = [
      studies.accuracy_column("accuracy", "test accuracy (mean ± std)"),
      ("retention ratio by layer", lambda n, _: ratios(n)),
      ("decoder prefill FLOPs vs baseline", lambda n, _: f"{decoder[n] / decoder[base]:.0%}"),
      ("KV cache vs baseline (analytic)", lambda n, _: f"{rep[n]['kv_cache_bytes'] / rep[base]['kv_cache_bytes']:.0%}"),
      (
          "KV bytes in the sampler (measured, one test prompt)",
          lambda n, _: f"{measured[n]:,} ({measured[n] / measured[base]:.0%})",
      ),
      studies.step_time_column(),
  ]
  acc = {n: studies.accuracies(r) for n, r in results.items()}
  findings = ["## Findings", ""]
  for name in SCHEDULES:
    if name in results:
      findings.append(
          f"- {name}: {studies.mean_std(acc[name])} vs baseline {studies.mean_std(acc[base])} "
          f"(Δ = {acc[name].mean() - acc[base].mean():+.3f}, Welch t = {studies.welch_t(acc[name], acc[base]):.1f}) at "
          f"{decoder[name] / decoder[base]:.0%} of the decoder prefill FLOPs and {measured[name] / measured[base]:.0%} of "
          "the sampler's KV bytes."
      )
  before, after = studies.still_falling(results[base])
  findings.append(
      f"- The baseline's train loss over the last two tenths of training: {before:.3f} → {after:.3f} "
      + (
          "(still falling: not converged at this budget)."
          if after < 0.97 * before
          else "(flat, under a cosine learning rate that has decayed by then: converged for this budget, not for longer runs)."
      )
  )
  findings.append(f"- Verdict: {verdict(acc, decoder, base)}")
  chance = studies.mean_chance(results)
  lines = [
      *studies.header(
          "p-MoD: accuracy against FLOPs and KV cache over retention schedules", "study_pmod.py", args, results
      ),
      f"Task `synthetic_vqa/basic` at 64 px (64 image tokens; chance, the blind question prior: {chance:.3f}). Model: "
      "configs/demo.py's 4-layer LLM (width 64) and 2-layer ViT. FLOPs of one prefill of one image and "
      f"{TEXT_TOKENS} text tokens (decoder only: p-MoD does not touch the ViT).",
      "",
      *studies.table(results, cols),
      *findings,
      "",
  ]
  studies.write_report(
      args.out,
      "study_pmod.md",
      lines,
      [("accuracy vs FLOPs", "pmod_accuracy_vs_flops.png"), ("train loss", "pmod_loss.png")],
      results,
  )
  plot(results, decoder, measured, args.out)


def plot(results, decoder, measured, out: str) -> None:
  plt = studies.pyplot()
  n = len(next(iter(results.values())))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  studies.accuracy_points(axes[0], results, STYLES, lambda k: decoder[k] / decoder["baseline"] * 100)
  axes[0].set(xlabel="decoder prefill FLOPs (% of baseline)", ylabel="test accuracy")
  studies.accuracy_points(axes[1], results, STYLES, lambda k: measured[k] / measured["baseline"] * 100)
  axes[1].set(xlabel="KV-cache bytes in the sampler (% of baseline)")
  for ax, x_of in (
      (axes[0], lambda k: decoder[k] / decoder["baseline"] * 100),
      (axes[1], lambda k: measured[k] / measured["baseline"] * 100),
  ):
    # The curve: the schedules from harshest to the dense baseline.
    curve = sorted((x_of(k), studies.accuracies(runs).mean()) for k, runs in results.items())
    ax.plot(*zip(*curve), color="tab:purple", lw=1, alpha=0.5, zorder=0)
    studies.chance_line(ax, results)
    ax.grid(True, alpha=0.3)
  fig.suptitle(f"p-MoD retention schedules: test accuracy, mean ± std over n = {n} seeds")
  axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5))
  studies.save(fig, out, "pmod_accuracy_vs_flops.png")
  plt.close(fig)
  studies.loss_figure(results, STYLES, out, "pmod_loss.png", "train loss, mean ± std over seeds")


def main() -> None:
  args = studies.parser(__doc__, steps=600).parse_args()
  results, root = studies.run_study(args, "study_pmod", variants(args))
  write(results, args, root)
  print(open(os.path.join(args.out, "study_pmod.md")).read())


if __name__ == "__main__":
  main()
