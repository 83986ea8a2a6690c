"""Entry point: `python -m llvm_jax.main --config=configs/X.py[:arg] --workdir=DIR [--config.k=v]`.

The config's `task` picks what runs (see TASKS). Overrides of keys that do not exist fail at once,
naming the key; so do unknown keys inside the model block.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from llvm_jax import config_utils, convert, evaluators, host, sampler
from llvm_jax.data import pipeline, vision
from llvm_jax.data.config import validate_data_config
from llvm_jax.data.pipeline import make_iterator
from llvm_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer
from llvm_jax.models import llvm
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import trainer
from llvm_jax.train.metrics import console
from llvm_jax.train.workdir_lock import WorkdirLockedError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs (created if missing).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "jax.distributed.initialize() with auto-detection (TPU pods, SLURM)."
)

# Exit codes (README "What a kill, a preemption and a bad record cost"). 0: trained to total_steps, or
# the run was already complete. Any other failure: 1 (a Python exception).
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM, the current step's checkpoint is committed; rerun to resume.
EXIT_NONFINITE = 65  # EX_DATAERR: NaN/inf loss; stopped, the last good checkpoint kept; fix the config first.
EXIT_WORKDIR_LOCKED = 73  # EX_CANTCREAT: another run holds the workdir's lock; nothing was written.


def build_model(config) -> tuple[LLVM, dict]:
  """The model and its params: from `config.init_hf` if set, else random init from `config.seed`."""
  model_cfg = config_utils.model_config(config)
  if config.init_hf:
    model, params = convert.from_hf(
        config.init_hf, dtype=model_cfg.decoder.dtype, param_dtype=model_cfg.decoder.param_dtype
    )
    if model.config != model_cfg:
      logging.warning("init_hf checkpoint config differs from config.model; using the checkpoint's")
    return model, params
  model = LLVM(model_cfg)
  return model, convert.init_params(model, jax.random.key(config.seed))


def demo_image(size: int) -> np.ndarray:
  """A deterministic drawing (a red disc on a blue square) as float pixels in [-1, 1]."""
  yy, xx = np.mgrid[:size, :size] / size
  image = np.zeros((size, size, 3), np.float32)
  image[..., 2] = 0.8
  disc = (yy - 0.5) ** 2 + (xx - 0.4) ** 2 < 0.08
  image[disc] = (0.9, 0.1, 0.1)
  return image * 2 - 1


def run_demo(config, workdir: str) -> dict:
  """Random (or imported) LLVM: one forward pass and greedy generation on a drawn image."""
  model, params = build_model(config)
  cfg = model.config
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  prompt = [1] + [cfg.image_token_id] * cfg.tokens_per_image + [5, 6, 7]
  batch = {"tokens": jnp.asarray([prompt], jnp.int32)}
  if cfg.vision is not None:
    batch["images"] = jnp.asarray(demo_image(cfg.vision.image_size))[None, None]
    batch["image_mask"] = jnp.ones((1, 1), bool)
  start = time.perf_counter()
  out = sampler.sample(
      model, params, batch, sampler.SamplingConfig(max_new_tokens=config.max_new_tokens), return_logits=True
  )
  new_tokens, step_logits = out.tokens, out.logits
  elapsed = time.perf_counter() - start
  # The same function without a cache: the full sequence's logits at the generated positions.
  full = jnp.concatenate([batch["tokens"], new_tokens[:, :-1]], axis=1)
  full_logits, _ = jax.jit(model.apply)({"params": params}, full, batch.get("images"), batch.get("image_mask"))
  cache_gap = float(jnp.max(jnp.abs(full_logits[:, len(prompt) - 1 :] - step_logits)))
  result = {
      "parameters": n_params,
      "prompt_tokens": len(prompt),
      "image_tokens": cfg.tokens_per_image,
      "generated": np.asarray(new_tokens)[0].tolist(),
      "generate_seconds_incl_compile": round(elapsed, 3),
      "max_abs_diff_cached_vs_full_logits": cache_gap,
      "backend": jax.default_backend(),
  }
  print(
      f"llvm_jax demo: {n_params:,} parameters ({cfg.decoder.family} LLM, "
      f"{cfg.vision.kind if cfg.vision else 'no'} vision tower) on {jax.default_backend()}"
  )
  print(f"  prompt: {len(prompt)} tokens, {cfg.tokens_per_image} of them image placeholders")
  print(f"  greedy tokens: {result['generated']} ({elapsed:.2f}s incl. compile)")
  print(f"  KV-cache decoding vs full-sequence logits: max |diff| = {cache_gap:.2e}")
  with open(os.path.join(workdir, "demo.json"), "w") as f:
    json.dump(result, f, indent=2)
  return result


def resolve_tokenizer(config, workdir: str):
  """The tokenizer of `config.tokenizer` ('tiny' builds the synthetic_vqa one into the workdir)."""
  path = config.tokenizer
  if path == "tiny":
    path = os.path.join(workdir, "tokenizer")
    if jax.process_index() == 0 or not os.path.exists(path):
      build_tiny_tokenizer(path)
  tokenizer = load_tokenizer(path)
  model_cfg = config_utils.model_config(config)
  image_id = tokenizer.convert_tokens_to_ids(config.image_token)
  if image_id != model_cfg.image_token_id:
    raise ValueError(
        f"tokenizer {path!r} maps image_token {config.image_token!r} to id {image_id}, but "
        f"config.model.image_token_id={model_cfg.image_token_id}"
    )
  if len(tokenizer) > model_cfg.decoder.vocab_size:
    raise ValueError(
        f"tokenizer {path!r} has {len(tokenizer)} tokens > config.model.decoder.vocab_size="
        f"{model_cfg.decoder.vocab_size}"
    )
  return tokenizer


class _Reported:
  """An evaluator whose every `run` prints its result line (process 0), so intermediate evals show too."""

  def __init__(self, name: str, evaluator):
    self.name, self.evaluator = name, evaluator

  def run(self, params, step: int) -> dict:
    metrics = self.evaluator.run(params, step)
    if jax.process_index() == 0:
      report_eval(self.name, step, metrics)
    return metrics

  def __getattr__(self, attr):
    if attr == "evaluator":  # not set yet (copy, pickle): no recursion
      raise AttributeError(attr)
    return getattr(self.evaluator, attr)


def make_evaluators(config, workdir: str, model: LLVM, tokenizer, report: bool = True) -> dict:
  """`config.evals` as evaluators; with `report`, each prints its result whenever it runs."""
  made = {
      name: evaluators.make(
          name,
          spec,
          model=model,
          tokenizer=tokenizer,
          data_config=config.data,
          workdir=workdir,
          image_token=config.image_token,
      )
      for name, spec in config.evals.items()
  }
  return {name: _Reported(name, e) for name, e in made.items()} if report else made


def report_eval(name: str, step: int, metrics: dict) -> None:
  """One console line per evaluator; accuracy next to the chance level when it was measured."""
  line = f"  eval {name} at step {step}: accuracy {metrics['accuracy']:.4f} on {metrics['examples']} examples"
  if "chance" in metrics:
    line += f" (chance level, blind question prior: {metrics['chance']:.4f})"
  if metrics.get("skipped"):
    line += f", {metrics['skipped']} not scored"
  console(line)  # ends an open progress bar line first


def train_iterator(config, model: LLVM, tokenizer, source=None):
  """The training data of `config` on its mesh (`source`: records to read instead of config.data's)."""
  return make_iterator(
      config.data,
      tokenizer,
      num_image_tokens=model.config.tokens_per_image,
      image_token=config.image_token,
      mesh=trainer.mesh_from_config(config),
      mode="train",
      source=source,
      batch_check=functools.partial(llvm.check_batch, model.config),
  )


def run_train(config, workdir: str) -> dict:
  """Trains (resuming from the workdir), evaluating on schedule; see llvm_jax/train/trainer.py."""
  model = LLVM(config_utils.model_config(config))
  tokenizer = resolve_tokenizer(config, workdir)
  data = train_iterator(config, model, tokenizer)
  last = trainer.train(config, workdir, data, make_evaluators(config, workdir, model, tokenizer), model)
  last.pop("params")
  if jax.process_index() == 0:
    shown = {k: round(v, 4) for k, v in last.items() if isinstance(v, float) and not k.startswith("eval/")}
    if last["status"] == trainer.STATUS_PREEMPTED:
      print(
          f"llvm_jax train: preempted (SIGTERM) at step {last['step']}/{config.train.total_steps}; "
          f"checkpoint committed, rerun the same command to resume (exit code {EXIT_PREEMPTED})"
      )
      return last
    if last["status"] == trainer.STATUS_ALREADY_COMPLETE:
      print(
          f"llvm_jax train: {workdir} is already complete at step {last['step']} "
          f"(train.total_steps={config.train.total_steps}), nothing trained; last logged: {shown}"
      )
      return last
    print(f"llvm_jax train: finished {config.train.total_steps} steps: {shown}")
    print(f"  data: {data.report()}")  # eval results were printed as they ran
  return last


def run_eval(config, workdir: str) -> dict:
  """Evaluates a checkpoint's params (`config.eval_checkpoint`, default the workdir's latest) with
  `config.evals`, on a mesh from `config.sharding` over the devices present."""
  if not config.evals:
    raise ValueError("task=eval needs at least one entry in config.evals")
  model = LLVM(config_utils.model_config(config))
  tokenizer = resolve_tokenizer(config, workdir)
  mesh = trainer.mesh_from_config(config)
  params, step = trainer.restore_for_inference(config, model, mesh, config.eval_checkpoint or workdir)
  results = {}
  for name, evaluator in make_evaluators(config, workdir, model, tokenizer).items():
    results[name] = evaluator.run(params, step)  # prints its line
  return results


TASKS = {"demo": run_demo, "train": run_train, "eval": run_eval}


def main(argv) -> None:
  del argv
  # Library INFO (absl, Orbax, JAX: most of a run's lines) is off unless --verbosity is given (absl's
  # app.run raises an unset verbosity to INFO); --verbosity=0 shows it. The run's own progress, eval
  # results and summary are printed, so they show at any verbosity.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  host.tune_host_process()
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required")
  config = config_utils.finalize(config)  # eval_specs, data settings that follow the model
  if config.task not in TASKS:
    raise app.UsageError(f"config.task={config.task!r} unknown; expected one of {sorted(TASKS)}")
  model_cfg = config_utils.model_config(config)  # validates the model block before anything heavy runs
  if model_cfg.vision is not None and config.task in ("train", "eval"):
    # A tower fed another tower's preprocessing (SigLIP with CLIP mean/std) trains silently wrong.
    vision.check_matches_tower(pipeline.vision_spec_from_config(config.data), model_cfg.vision.kind)
  if config.task == "train":  # bad values fail here, naming the field, before any data or model is built
    trainer.validate_train_config(config)
    validate_data_config(config.data)
  if _NUM_PROCESSES.value and _NUM_PROCESSES.value > 1:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  workdir = os.path.abspath(_WORKDIR.value or os.path.join("workdirs", config.task))
  os.makedirs(workdir, exist_ok=True)
  if config.task != "train":  # training writes it under the workdir lock (never over a running run's)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  code = run_task(config, workdir)
  if code:
    sys.exit(code)


def run_task(config, workdir: str) -> int:
  """Runs `config.task`; returns the exit code (EXIT_*), printing why when it is not 0."""
  try:
    result = TASKS[config.task](config, workdir)
  except trainer.NonFiniteLossError as e:
    logging.error("%s", e)
    print(f"llvm_jax {config.task}: stopped on a non-finite loss: {e} (exit code {EXIT_NONFINITE})", flush=True)
    return EXIT_NONFINITE
  except WorkdirLockedError as e:
    print(f"llvm_jax {config.task}: {e} (exit code {EXIT_WORKDIR_LOCKED})", flush=True)
    return EXIT_WORKDIR_LOCKED
  return exit_code(result)


def exit_code(result) -> int:
  """The process exit code of a task's result: EXIT_PREEMPTED for a preempted training, else 0."""
  return EXIT_PREEMPTED if isinstance(result, dict) and result.get("status") == trainer.STATUS_PREEMPTED else 0


if __name__ == "__main__":
  app.run(main)
