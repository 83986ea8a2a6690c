"""The train-step timings behind `python -m llvm_jax.bench` and experiments/gpu_bench.py.

time_jax: the trainer's own jitted, sharded train step on synthetic batches of the config's shape,
steady-state (median after 3 warm-up steps), optionally alternating with a rival's steps (torch_step:
the same LLaVA model trained with `transformers` PyTorch, the CPU reference), so that load drift on a
shared machine hits both sides of the ratio alike. Against a rival, each timed step follows an untimed
step of its own, as in its own training loop (PyTorch's spinning OpenMP threads would otherwise slow
the llvm_jax step timed right after each PyTorch step).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax import config_utils, convert, flops
from llvm_jax.bench.breakdown import step_breakdown
from llvm_jax.bench.common import time_interleaved
from llvm_jax.data.pipeline import make_global_batch
from llvm_jax.models import deepstack
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import trainer


def synthetic_batch(cfg, batch: int, seq_len: int, seed: int = 0, grid_mode: str = "fixed") -> dict[str, np.ndarray]:
  """A batch shaped like the pipeline's: one image (and its DeepStack crops) per row at the start,
  answer on the last quarter. `grid_mode` 'aspect' (data.deepstack_grid_mode) adds each row's crop
  grid, `hires_grid`, cycling through the candidate grids."""
  rng = np.random.RandomState(seed)
  n_img = cfg.tokens_per_image if cfg.vision is not None else 0
  tokens = rng.randint(5, cfg.decoder.vocab_size, (batch, seq_len)).astype(np.int32)
  tokens[:, 1 : 1 + n_img] = cfg.image_token_id
  out = {
      "tokens": tokens,
      "segment_ids": np.ones_like(tokens),
      "positions": np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1)),
      "targets": np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1),
      "target_mask": (np.arange(seq_len) >= seq_len * 3 // 4).astype(np.float32)[None].repeat(batch, 0),
  }
  if cfg.vision is not None:
    size = cfg.vision.image_size
    out["images"] = rng.uniform(-1, 1, (batch, 1, size, size, 3)).astype(np.float32)
    out["image_mask"] = np.ones((batch, 1), bool)
    if cfg.deepstack is not None:
      out["hires_images"] = rng.uniform(-1, 1, (batch, 1, cfg.deepstack.num_groups, size, size, 3)).astype(np.float32)
      if grid_mode == "aspect":
        grids = deepstack.candidate_grids(cfg.deepstack.num_crops)
        out["hires_grid"] = np.asarray([[grids[r % len(grids)]] for r in range(batch)], np.int32)
  return out


def time_jax(config, steps: int, breakdown: bool = False, rival: Callable[[], Any] | None = None) -> dict[str, Any]:
  """The trainer's step timed over `steps` steps; `breakdown`: also trace a few steps and charge their op
  time to model scopes (`result['breakdown']`, see llvm_jax/bench/breakdown.py). `rival` (one blocking
  step of another implementation) alternates with it two steps at a time, the second of each timed:
  `result['rival_step_time_s']`."""
  model = LLVM(config_utils.model_config(config))
  mesh = trainer.mesh_from_config(config)
  setup, _ = trainer.build_setup(config, model, mesh)
  tick = time.perf_counter()
  params = trainer.initial_params(config, setup)
  with trainer.sharding_context(mesh, setup.rules):
    opt_state = jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)(params)
  jax.block_until_ready(opt_state)
  init_s = time.perf_counter() - tick  # compile and run of the param and optimiser-state init
  b, s = config.data.global_batch_size, config.data.seq_len
  batch = make_global_batch(synthetic_batch(model.config, b, s, grid_mode=config.data.deepstack_grid_mode), mesh)
  tick = time.perf_counter()
  compiled = trainer.compile_step(
      setup, trainer.make_train_step(setup, trainer.loss_function(config), 1), params, opt_state, batch
  )
  compile_s = time.perf_counter() - tick
  state, losses = {"params": params, "opt_state": opt_state}, []

  def one_step():
    state["params"], state["opt_state"], metrics = compiled(
        state["params"], state["opt_state"], batch, jnp.asarray(len(losses), jnp.int32)
    )
    losses.append(float(metrics["loss"]))  # blocks until the step is done

  steps_of = {"jax": one_step, **({"rival": rival} if rival else {})}
  for _ in range(2):  # warm-up, with the one time_interleaved runs: 3 steps each
    for run in steps_of.values():
      run()
  medians_ms = time_interleaved(steps_of, steps, untimed_before_each=1 if rival else 0)
  step_time = medians_ms["jax"] / 1e3
  if breakdown:
    scopes = step_breakdown(compiled.as_text(), one_step)
  step_flops = b * flops.train_flops_per_sample(model.config, s, 1 if model.config.vision else 0)
  result = {
      "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind,
      "devices": jax.device_count(),
      "batch": b,
      "seq_len": s,
      "step_time_s": step_time,
      "tokens_per_second": b * s / step_time,
      "tflops_per_device": step_flops / step_time / jax.device_count() / 1e12,
      "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
      "compile_s": compile_s,
      "init_s": init_s,
      # The same batch every step: the loss must fall (a sanity check on the timed program).
      "first_loss": losses[0],
      "last_loss": losses[-1],
  }
  if rival:
    result["rival_step_time_s"] = medians_ms["rival"] / 1e3
  if breakdown:
    result["breakdown"] = scopes
  memory = compiled.memory_analysis()
  if memory is not None and hasattr(memory, "temp_size_in_bytes"):
    result["step_memory_gib"] = (
        memory.argument_size_in_bytes
        + memory.output_size_in_bytes
        + memory.temp_size_in_bytes
        - getattr(memory, "alias_size_in_bytes", 0)
    ) / 2**30
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  if peak:
    result["mfu"] = step_flops / step_time / (peak * jax.device_count())
  return result


def torch_step(config) -> Callable[[], None]:
  """One train step (blocking) of the same model in transformers PyTorch (fp32, AdamW, CPU)."""
  # torch and transformers: heavy imports, only paid when the PyTorch comparison runs.
  import torch
  import transformers

  cfg = config_utils.model_config(config)
  torch.manual_seed(0)
  hf_config = convert.hf_config_of(cfg)
  model_cls = (
      transformers.LlavaForConditionalGeneration if cfg.vision is not None else transformers.AutoModelForCausalLM
  )
  model = model_cls._from_config(hf_config) if cfg.vision is not None else model_cls.from_config(hf_config)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
  b, s = config.data.global_batch_size, config.data.seq_len
  batch = synthetic_batch(cfg, b, s)
  inputs = {"input_ids": torch.tensor(batch["tokens"], dtype=torch.long)}
  if cfg.vision is not None:
    inputs["pixel_values"] = torch.tensor(batch["images"][:, 0].transpose(0, 3, 1, 2))
  targets = torch.tensor(batch["targets"], dtype=torch.long)
  mask = torch.tensor(batch["target_mask"])

  def step() -> None:
    logits = model(**inputs).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    loss = (nll * mask.reshape(-1)).sum() / mask.sum()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.optim.grad_clip or 1e9)
    opt.step()

  return step
