"""Train-step benchmark: `python -m llvm_jax.bench --config=configs/X.py[:arg] [--steps=20]`.

Times the jitted, sharded train step (the trainer's own) on synthetic batches of the config's
shape on whatever backend jax finds (`--cpu_devices=N` splits a CPU host into N devices):
steady-state step time, tokens/s, TFLOP/s per device and MFU (analytic FLOPs with each technique's
extra work, see llvm_jax/flops.py; MFU only where the chip's peak is known). On CPU it also
trains the same LLaVA configuration with `transformers` PyTorch (AdamW, same batch) and prints the
step-time ratio: the two alternate in this one process (both with `llvm_jax.host`'s malloc setting),
two steps at a time with the second timed, so load drift on a shared machine hits both medians alike and
each timed step follows one of its own, as in its own training loop (PyTorch's OpenMP threads spin for
~10 ms after its ops); a model with a technique (which transformers lacks) is not compared.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from llvm_jax import config_utils, host
from llvm_jax.bench.breakdown import format_breakdown
from llvm_jax.bench.train_step import time_jax, torch_step
from llvm_jax.models.techniques import switched_on

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "Experiment config.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 3 warm-up steps).")
_TORCH = flags.DEFINE_bool("torch", True, "On CPU, also time transformers PyTorch on the same model.")
_BREAKDOWN = flags.DEFINE_bool(
    "breakdown", False, "Also trace a few steps and print where their op time goes, by model scope."
)
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices",
    0,
    "On a CPU host: split it into this many jax devices (the config's mesh spans them; with "
    "--config.sharding.strategy=dp, data parallel). 0: jax's default (one device, whose larger ops XLA "
    "splits over the cores).",
)


def main(argv) -> None:
  del argv
  host.tune_host_process()
  config = _CONFIG.value
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)  # before the backend starts
  techniques = switched_on(config_utils.model_config(config))
  compare = jax.default_backend() == "cpu" and _TORCH.value
  rival = torch_step(config) if compare and not techniques else None
  result = time_jax(config, _STEPS.value, breakdown=_BREAKDOWN.value, rival=rival)
  print(
      f"llvm_jax train step on {result['devices']} x {result['device']}: {result['step_time_s'] * 1e3:.1f} ms, "
      f"{result['tokens_per_second']:.0f} tokens/s, {result['tflops_per_device']:.3f} TFLOP/s per device"
      + (f", MFU {result['mfu']:.1%}" if "mfu" in result else "")
  )
  if _BREAKDOWN.value:
    print(format_breakdown(result.pop("breakdown"), result["step_time_s"]))
  if compare and techniques:
    print(f"PyTorch comparison skipped: transformers has no {', '.join(techniques)}, so it cannot train the same model")
  elif rival:
    result["torch_step_time_s"] = result.pop("rival_step_time_s")
    result["torch_over_jax"] = result["torch_step_time_s"] / result["step_time_s"]
    print(
        f"transformers PyTorch (CPU, same model and batch, alternating with llvm_jax's in pairs of steps): "
        f"{result['torch_step_time_s'] * 1e3:.1f} ms/step; "
        f"PyTorch / llvm_jax step-time ratio = {result['torch_over_jax']:.2f}"
    )
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
