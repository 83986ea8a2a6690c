"""The sharded, resumable train loop.

Params are born sharded (jitted init with out_shardings from the logical-axis rules); the train
step is `jax.jit` with explicit in/out shardings and donation, compiled ahead of time with its
memory analysis logged; checkpoints are Orbax (params, optimiser state, data-iterator state,
config) with automatic resume; SIGTERM saves and exits; a NaN/inf loss stops the run. Batches are
prefetched onto the devices while the previous step runs, and metrics reach the host only at log
steps (window means), so the host never waits on the device between them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llvm_jax import config_utils, convert, flops, sharding, tree_utils
from llvm_jax.data.pipeline import check_data_sharding
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import checkpoint, lora, optim, po_loss
from llvm_jax.train import loss as loss_lib
from llvm_jax.train.metrics import MetricsWriter
from llvm_jax.train.workdir_lock import WorkdirLock, WorkdirLockedError

MODEL_INPUTS = ("tokens", "images", "image_mask", "segment_ids", "positions", "hires_images", "hires_grid")


class NonFiniteLossError(FloatingPointError):
  pass


class OptimizerStateMismatchError(ValueError):
  """The checkpoint's optimiser state does not fit the current optimiser (e.g. changed parameter groups)."""


# `train()`'s result["status"]: trained to total_steps; stopped by SIGTERM after a committed save
# (rerun to resume); or nothing to do, the workdir's checkpoint is already at total_steps.
STATUS_COMPLETED = "completed"
STATUS_PREEMPTED = "preempted"
STATUS_ALREADY_COMPLETE = "already_complete"


def validate_train_config(config: ml_collections.ConfigDict) -> None:
  """Clear errors, naming the field, for train settings that would otherwise fail late or silently."""
  tc = config.train
  for name, low in (
      ("total_steps", 1),
      ("log_every", 1),
      ("checkpoint_every", 1),
      ("microbatches", 1),
      ("eval_every", 0),
  ):
    value = tc[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f"config.train.{name}={value!r}: must be an integer >= {low}")


@dataclasses.dataclass
class TrainSetup:
  """Everything a train step needs, built once per run."""

  model: LLVM
  mesh: Mesh
  rules: tuple
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  param_shardings: Any
  opt_shardings: Any
  abstract_params: Any  # shapes and dtypes of the params (LoRA adapters included), from build_setup


def mesh_from_config(config: ml_collections.ConfigDict) -> Mesh:
  return sharding.make_mesh(tuple(config.sharding.mesh_shape))


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: tuple):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def abstract_boxed_params(model: LLVM) -> Any:
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *convert.dummy_inputs(model.config))["params"])


def init_params_sharded(model: LLVM, rng: jax.Array, mesh: Mesh, rules: tuple, shardings: Any) -> Any:
  """Random params created directly in their shards (never materialised on one device)."""

  def init():
    return nn.unbox(model.init(rng, *convert.dummy_inputs(model.config))["params"])

  with sharding_context(mesh, rules):
    return jax.jit(init, out_shardings=shardings)()


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def sft_loss_sums(model: LLVM, params: Any, batch: dict[str, Any]) -> dict[str, jax.Array]:
  """Sums over answer tokens: `loss_sum` (NLL), `token_accuracy_sum`, and the `count` of tokens."""
  logits, _ = model.apply({"params": params}, **model_inputs(batch))
  sums = loss_lib.cross_entropy_sums(logits, batch["targets"], batch["target_mask"])
  return {"loss_sum": sums["loss_sum"], "token_accuracy_sum": sums["correct"], "count": sums["tokens"]}


def po_loss_sums(
    model: LLVM, params: Any, batch: dict[str, Any], beta: float, gamma: float, lam: float
) -> dict[str, jax.Array]:
  """Phantom Optimization over (B, 2, S) preference pairs, one forward over the 2B rows."""
  rows = po_loss.pair_rows(batch)
  logits, _ = model.apply({"params": params}, **model_inputs(rows))
  sums = dict(po_loss.po_sums(logits, batch, beta, gamma, lam))
  count = sums.pop("pairs")
  sums["preference_accuracy_sum"] = sums.pop("correct_sum")
  return {**sums, "count": count}


def loss_function(config: ml_collections.ConfigDict) -> Callable:
  """(model, params, batch) -> sums with `loss_sum` and `count` (the denominator).

  With LoRA on, the model sees the kernels with the adapters folded in.
  """
  name = config.train.loss
  if name == "sft":
    fn = sft_loss_sums
  elif name == "po":
    po = config.train.po
    fn = functools.partial(po_loss_sums, beta=po.beta, gamma=po.gamma, lam=po.lam)
  else:
    raise ValueError(f"train.loss={name!r} unknown; expected 'sft' or 'po'")
  if not config.lora.rank:
    return fn
  return lambda model, params, batch: fn(model, lora.merge(params, lora.scale(config.lora)), batch)


def _split_microbatches(batch: dict[str, Any], k: int) -> dict[str, Any]:
  def split(x):
    if x.shape[0] % k:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
    return x.reshape((k, x.shape[0] // k) + x.shape[1:])

  return jax.tree.map(split, batch)


def make_train_step(setup: TrainSetup, sum_fn: Callable, microbatches: int) -> Callable:
  """(params, opt_state, batch, step) -> (params, opt_state, metrics).

  Losses are sums divided by the whole batch's `count` (answer tokens, or pairs for PO), and
  gradients are summed over micro-batches, so k micro-batches give the same update as one batch k
  times larger.
  """
  model, tx, schedule = setup.model, setup.tx, setup.schedule

  def loss_sum(p, b):
    sums = sum_fn(model, p, b)
    return sums["loss_sum"], sums

  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def step_fn(params, opt_state, batch, step):
    if microbatches == 1:
      (_, sums), grads = grad_fn(params, batch)
    else:
      micro = _split_microbatches(batch, microbatches)
      (_, sums), grads = grad_fn(params, jax.tree.map(lambda x: x[0], micro))

      def accumulate(carry, one):
        (_, more_sums), more_grads = grad_fn(params, one)
        return jax.tree.map(jnp.add, carry, (more_sums, more_grads)), None

      (sums, grads), _ = jax.lax.scan(accumulate, (sums, grads), jax.tree.map(lambda x: x[1:], micro))
    denominator = jnp.maximum(sums["count"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {k[: -len("_sum")]: v / denominator for k, v in sums.items() if k.endswith("_sum")}
    metrics.update(
        count=sums["count"],
        grad_norm=optax.global_norm(grads),
        learning_rate=schedule(step),
        param_norm=optax.global_norm(params),
    )
    return params, opt_state, metrics

  return step_fn


def numeric_batch(batch: dict[str, Any]) -> dict[str, Any]:
  """Drops the string fields (ids, answers) that only evaluators read."""
  return {k: v for k, v in batch.items() if isinstance(v, jax.Array) or np.asarray(v).dtype.kind not in "OUS"}


def build_setup(config: ml_collections.ConfigDict, model: LLVM, mesh: Mesh) -> tuple[TrainSetup, Any]:
  """Shardings, optimiser and abstract params for `model` on `mesh` (nothing allocated)."""
  rules = sharding.logical_rules(config.sharding.strategy)
  abstract_params, param_shardings = abstract_params_and_shardings(config, model, mesh)
  tx, schedule = optim.make_optimizer(config.optim, abstract_params, config.train.total_steps)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  # Each optimiser leaf that mirrors a parameter (Adam's mu/nu, also inside multi_transform / masked
  # groups) is sharded like it; counts are replicated. (Propagation through a compiled tx.init left
  # the moments replicated, so FSDP kept a full copy of them on every device.)
  opt_shardings = sharding.mirrored_shardings(
      abstract_opt, abstract_params, param_shardings, NamedSharding(mesh, PartitionSpec())
  )
  setup = TrainSetup(model, mesh, rules, tx, schedule, param_shardings, opt_shardings, abstract_params)
  return setup, abstract_params


def jit_train_step(setup: TrainSetup, step_fn: Callable, batch_shardings: Any) -> Callable:
  """`step_fn` jitted with explicit in/out shardings and the params and optimiser state donated."""
  replicated = NamedSharding(setup.mesh, PartitionSpec())
  return jax.jit(
      step_fn,
      in_shardings=(setup.param_shardings, setup.opt_shardings, batch_shardings, replicated),
      out_shardings=(setup.param_shardings, setup.opt_shardings, replicated),
      donate_argnums=(0, 1),
  )


def lower_step(setup: TrainSetup, step_fn: Callable, params: Any, opt_state: Any, batch: dict[str, Any]):
  """Lowers the train step for these (concrete or abstract, sharded) arguments; nothing is allocated."""
  batch_shardings = jax.tree.map(lambda x: x.sharding, batch)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(setup.mesh, PartitionSpec()))
  with sharding_context(setup.mesh, setup.rules):
    return jit_train_step(setup, step_fn, batch_shardings).lower(params, opt_state, batch, step)


def compile_step(setup: TrainSetup, step_fn: Callable, params: Any, opt_state: Any, batch: dict[str, Any]):
  """Ahead-of-time compile with explicit shardings and donation; logs the memory analysis."""
  with sharding_context(setup.mesh, setup.rules):
    compiled = lower_step(setup, step_fn, params, opt_state, batch).compile()
  memory = compiled.memory_analysis()
  if memory is not None:
    logging.info(
        "train step memory (bytes/device): arguments %s, outputs %s, temporaries %s, generated code %s",
        getattr(memory, "argument_size_in_bytes", "?"),
        getattr(memory, "output_size_in_bytes", "?"),
        getattr(memory, "temp_size_in_bytes", "?"),
        getattr(memory, "generated_code_size_in_bytes", "?"),
    )
  return compiled


# Batches kept produced (and placed on their devices) ahead of the train step.
PREFETCH_BATCHES = 2
# Dispatched steps the host may run ahead of the devices between log steps: it waits for step N-2
# (step N-1 still queued, so the devices stay busy), bounding the batches held in device memory.
STEPS_IN_FLIGHT = 2


class DevicePrefetch:
  """Keeps the next `size` batches of `iterator` built and on their devices ahead of the train step.

  It runs in the training thread: the loop calls `fill()` right after dispatching a step (JAX
  dispatch is asynchronous), so the host builds and transfers the next batches while the devices
  compute. Every batch is stored with the iterator's state right after it was produced, and
  `get_state()` is the state after the last batch handed out by `pop()`: a checkpoint records the
  batches training steps consumed, not the prefetched ones, so a resume continues at the next
  unconsumed batch. At most `limit` batches are drawn (the steps left), so none is read needlessly.
  """

  def __init__(self, iterator: Iterator[dict[str, Any]], size: int, limit: int):
    self._it, self._size, self._left = iterator, size, limit
    self._buffer: collections.deque = collections.deque()
    self._state = iterator.get_state()
    self._exhausted = False

  def fill(self) -> None:
    while len(self._buffer) < self._size and self._left > 0 and not self._exhausted:
      try:
        batch = numeric_batch(next(self._it))
      except StopIteration:  # raised from pop() once the buffered batches are used up
        self._exhausted = True
        return
      self._left -= 1
      self._buffer.append((batch, self._it.get_state()))

  def pop(self) -> dict[str, Any]:
    self.fill()
    if not self._buffer:
      raise StopIteration
    batch, self._state = self._buffer.popleft()
    return batch

  def get_state(self) -> bytes:
    return self._state


# Reported as at the log step (state, not per-step quantities); the other metrics are window means.
_LAST_VALUE_METRICS = ("learning_rate", "param_norm")


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (save, then exit)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def sharded_abstract(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_params_and_shardings(config: ml_collections.ConfigDict, model: LLVM, mesh: Mesh) -> tuple[Any, Any]:
  """Abstract params (plus LoRA adapters if enabled) and their shardings on `mesh`."""
  boxed = abstract_boxed_params(model)
  shardings = sharding.param_shardings(boxed, mesh, config.sharding.strategy)
  abstract = nn.unbox(boxed)
  if config.lora.rank:
    abstract[lora.LORA_KEY] = jax.eval_shape(lambda: lora.init(abstract, config.lora, jax.random.key(0)))
    shardings[lora.LORA_KEY] = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec()), abstract[lora.LORA_KEY])
  return abstract, shardings


def param_targets(config: ml_collections.ConfigDict, model: LLVM, mesh: Mesh) -> Any:
  """Restore targets of a params-only read (e.g. inference on another mesh): shapes + shardings."""
  return sharded_abstract(*abstract_params_and_shardings(config, model, mesh))


def restore_for_inference(
    config: ml_collections.ConfigDict, model: LLVM, mesh: Mesh, checkpoint_dir: str, step: int | None = None
) -> tuple[Any, int]:
  """A run's params only (no optimiser state) onto `mesh`, LoRA adapters merged; -> (params, step)."""
  params, step = checkpoint.params_only(checkpoint_dir, param_targets(config, model, mesh), step)
  if config.lora.rank:
    params = lora.merge(params, lora.scale(config.lora))
  return params, step


def initial_params(config: ml_collections.ConfigDict, setup: TrainSetup) -> Any:
  """Base weights (`init_hf`, or random and born sharded) plus fresh LoRA adapters if enabled."""
  params = _initial_base_params(config, setup)
  if config.lora.rank:
    adapters = jax.jit(lambda p: lora.init(p, config.lora, jax.random.key(config.seed + 1)))(params)
    params[lora.LORA_KEY] = jax.device_put(adapters, setup.param_shardings[lora.LORA_KEY])
  return params


# Parameters a technique adds on top of a pretrained backbone: absent from an HF checkpoint.
TECHNIQUE_PARAMS = re.compile(r"(^|.*/)(trol_gate|phantom|pmod_router)(/.*|$)")


def _initial_base_params(config: ml_collections.ConfigDict, setup: TrainSetup) -> Any:
  base_shardings = {k: v for k, v in setup.param_shardings.items() if k != lora.LORA_KEY}
  base_abstract = {k: v for k, v in setup.abstract_params.items() if k != lora.LORA_KEY}
  if config.init_checkpoint:
    if config.init_hf:
      raise ValueError("set one of init_hf and init_checkpoint, not both")
    targets = sharded_abstract(base_abstract, base_shardings)
    params, step = checkpoint.params_only(config.init_checkpoint, targets)
    logging.info("init_checkpoint: params of step %d of %s", step, config.init_checkpoint)
    return params
  if not config.init_hf:
    return init_params_sharded(setup.model, jax.random.key(config.seed), setup.mesh, setup.rules, base_shardings)
  model_cfg = setup.model.config
  # Overrides that contradict the checkpoint, field by field (they explain any mismatch error below).
  differences = convert.checkpoint_differences(model_cfg, config.init_hf)
  if differences and jax.process_index() == 0:
    print(f"config.model differs from init_hf={config.init_hf}:\n  " + "\n  ".join(differences), flush=True)
  _, pretrained = convert.from_hf(
      config.init_hf,
      dtype=model_cfg.decoder.dtype,
      param_dtype=model_cfg.decoder.param_dtype,
      scan_layers=model_cfg.decoder.scan_layers,
      remat_policy=model_cfg.decoder.remat_policy,
  )
  # Checked against the abstract params, so a mismatch fails before any compile.
  ours = tree_utils.flatten(base_abstract)
  theirs = tree_utils.flatten(pretrained)
  missing = [k for k in ours if k not in theirs and not TECHNIQUE_PARAMS.match(k)]
  unexpected = [k for k in theirs if k not in ours]
  misshaped = [
      f"{k}: checkpoint {theirs[k].shape}, model {ours[k].shape}"
      for k in ours
      if k in theirs and theirs[k].shape != ours[k].shape
  ]
  if missing or unexpected or misshaped:
    context = f"init_hf={config.init_hf}" + (f"; config.model differs: {'; '.join(differences)}" if differences else "")
    raise convert.WeightMismatchError(missing, unexpected, misshaped, context=context)
  fresh = [k for k in ours if k not in theirs]
  random = {}
  if fresh:  # only a technique's own parameters need the random init (and its compile)
    logging.info("init_hf: %d technique parameters start from their init: %s", len(fresh), ", ".join(fresh))
    random = tree_utils.flatten(
        init_params_sharded(setup.model, jax.random.key(config.seed), setup.mesh, setup.rules, base_shardings)
    )
  flat_shardings = tree_utils.flatten(base_shardings)
  merged = {k: jax.device_put(theirs[k], flat_shardings[k]) if k in theirs else random[k] for k in ours}
  return tree_utils.unflatten(merged)


def train(
    config: ml_collections.ConfigDict,
    workdir: str,
    data_iterator: Iterator[dict[str, Any]],
    evaluators: dict[str, Any] | None = None,
    model: LLVM | None = None,
) -> dict[str, Any]:
  """Trains for `config.train.total_steps` (resuming from the workdir's latest checkpoint).

  `data_iterator` yields global batches (dicts of jax Arrays sharded over the data axes) and has
  get_state/set_state; PREFETCH_BATCHES of them are drawn ahead (DevicePrefetch), checkpoints
  record the consumed ones. `evaluators`: name -> object with `run(params, step) -> dict`, run every
  `config.train.eval_every` steps and at the end.

  Step metrics stay on device until a log step (every `log_every`, the last step, a SIGTERM): the
  record written there averages the steps since the previous log (`window_steps` of them; learning
  rate and parameter norm are the log step's), and step_time / tokens_per_second / MFU come from
  the wall time of that window (evaluations excluded). Loss and parameter norm of every step are
  checked for NaN/inf at log, eval and checkpoint steps, before anything is saved. Returns the last
  log record (+ evals), with `params`, `status` (STATUS_*) and `step` (the last step trained or saved).

  The workdir is locked for the run (WorkdirLock, held by process 0): a second run on it raises
  WorkdirLockedError. On resume, metrics.jsonl records after the restored step (those of steps that
  will be replayed) are dropped. SIGTERM: the current step is saved, the save committed, then
  `status` is STATUS_PREEMPTED.
  """
  validate_train_config(config)
  lock = _lock_workdir(workdir)
  try:
    return _train(config, workdir, data_iterator, evaluators, model)
  finally:
    if lock is not None:
      lock.release()


def _lock_workdir(workdir: str) -> WorkdirLock | None:
  """Process 0 takes the workdir lock; every process raises WorkdirLockedError if it could not."""
  lock, error = None, ""
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir)
      lock.acquire()
    except WorkdirLockedError as e:
      lock, error = None, str(e)
  if jax.process_count() > 1:  # the other processes must not start training (and block in collectives)
    from jax.experimental import multihost_utils

    if int(multihost_utils.broadcast_one_to_all(np.int32(bool(error)))) and not error:
      error = f"process 0 could not lock workdir {workdir} (its log says why)"
  if error:
    raise WorkdirLockedError(error)
  return lock


def _truncate_metrics(workdir: str, step: int) -> None:
  """Drops metrics.jsonl records after `step` (steps a resume replays) and torn lines; atomic rewrite."""
  path = os.path.join(workdir, "metrics.jsonl")
  if jax.process_index() != 0 or not os.path.exists(path):
    return
  kept, dropped = [], 0
  with open(path, "rb") as f:
    for line in f:
      try:
        record = json.loads(line)
        keep = int(record["step"]) <= step
      except (ValueError, KeyError, TypeError):  # a line torn by a kill
        keep = False
      if keep:
        kept.append(line if line.endswith(b"\n") else line + b"\n")
      else:
        dropped += 1
  if dropped:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    logging.info("metrics.jsonl: dropped %d records after step %d (replayed on resume)", dropped, step)


def _last_logged_metrics(workdir: str) -> dict[str, Any]:
  """The last train record of metrics.jsonl (keys without 'train/') and the evals of its step."""
  path = os.path.join(workdir, "metrics.jsonl")
  out: dict[str, Any] = {}
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue
      if not isinstance(record, dict):
        continue
      if any(k.startswith("train/") for k in record):
        out = {k[len("train/") :]: v for k, v in record.items() if k.startswith("train/")}
      out.update({k: v for k, v in record.items() if k.startswith("eval/")})
  return out


def _restore(
    config: ml_collections.ConfigDict,
    setup: TrainSetup,
    mngr: Any,
    step: int,
    abstract_params: Any,
    abstract_opt: Any,
    data_iterator: Any,
    workdir: str,
) -> tuple[Any, Any]:
  """(params, opt_state) of checkpoint `step`; with train.resume_params_only a fresh optimiser state."""
  params_target = sharded_abstract(abstract_params, setup.param_shardings)
  if config.train.resume_params_only:
    params = checkpoint.restore(mngr, step, params_target, None, data_iterator)["params"]
    with sharding_context(setup.mesh, setup.rules):
      opt_state = jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)(params)
    logging.warning(
        "resumed params and data position of step %d from %s with a fresh optimiser state "
        "(train.resume_params_only)",
        step,
        workdir,
    )
    return params, opt_state
  checkpoint.check_structure(mngr, step, "params", params_target)  # the params' own error names weights
  try:
    restored = checkpoint.restore(
        mngr, step, params_target, sharded_abstract(abstract_opt, setup.opt_shardings), data_iterator
    )
  except Exception as e:  # Orbax raises assorted types (ValueError, KeyError...) for a tree mismatch
    raise OptimizerStateMismatchError(
        f"the optimiser state of checkpoint step {step} in {workdir}/checkpoints does not match the current "
        f"optimiser (were optim.trainable groups, their lr multipliers or the optimiser changed?): "
        f"{type(e).__name__}: {str(e)[:500]}. To resume the params and data position with a fresh optimiser "
        "state, rerun with --config.train.resume_params_only=True"
    ) from e
  logging.info("resumed from %s at step %d", workdir, step)
  return restored["params"], restored["opt_state"]


def _train(
    config: ml_collections.ConfigDict,
    workdir: str,
    data_iterator: Iterator[dict[str, Any]],
    evaluators: dict[str, Any] | None,
    model: LLVM | None,
) -> dict[str, Any]:
  model = model or LLVM(config_utils.model_config(config))
  mesh = mesh_from_config(config)
  try:  # before anything is built: a mesh replicating batch rows over processes trains on wrong batches
    check_data_sharding(mesh)
  except ValueError as e:
    raise ValueError(
        f"sharding.strategy={config.sharding.strategy!r}, sharding.mesh_shape="
        f"{tuple(config.sharding.mesh_shape)}: {e}"
    ) from None
  setup, abstract_params = build_setup(config, model, mesh)
  tc = config.train
  mngr = checkpoint.manager(workdir, tc.checkpoint_every, tc.keep_checkpoints, tc.async_checkpoints)
  config_json = config.to_json_best_effort()
  start = mngr.latest_step()
  abstract_opt = jax.eval_shape(setup.tx.init, abstract_params)
  if start is not None:
    try:
      params, opt_state = _restore(config, setup, mngr, start, abstract_params, abstract_opt, data_iterator, workdir)
    except BaseException:
      mngr.close()
      raise
    if start >= tc.total_steps:
      mngr.close()
      last = _last_logged_metrics(workdir)
      logging.info(
          "%s is already complete at step %d (train.total_steps=%d): nothing to train", workdir, start, tc.total_steps
      )
      return {**last, "params": params, "status": STATUS_ALREADY_COMPLETE, "step": start}
  else:
    start = 0
    params = initial_params(config, setup)
    with sharding_context(mesh, setup.rules):
      opt_state = jax.jit(setup.tx.init, out_shardings=setup.opt_shardings)(params)
  _truncate_metrics(workdir, start)
  if jax.process_index() == 0:  # the run's config, written only under the workdir lock
    tmp = os.path.join(workdir, f"config.json.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, "config.json"))

  step_fn = make_train_step(setup, loss_function(config), tc.microbatches)
  writer = MetricsWriter(workdir, tc.total_steps)
  compiled = None
  model_cfg = model.config
  peak = flops.peak_flops(jax.devices()[0].device_kind)
  replicated = NamedSharding(mesh, PartitionSpec())
  # jnp (not np): the batch is a global array that may span processes; the mean stays on device.
  images_per_row = jax.jit(lambda mask: jnp.mean(jnp.sum(mask, axis=-1)), out_shardings=replicated)
  batches = DevicePrefetch(data_iterator, PREFETCH_BATCHES, tc.total_steps - start)
  # The steps since the last log: device metrics (host copies once checked), images per row.
  window: list[dict[str, Any]] = []
  window_images: list[Any] = []
  checked = 0
  in_flight: collections.deque = collections.deque()
  window_start = 0.0
  last: dict[str, Any] = {}
  step = done = start
  status = STATUS_COMPLETED
  try:
    with _Preemption() as preemption:
      for step in range(start, tc.total_steps):
        batch = batches.pop()
        if compiled is None:
          compiled = compile_step(setup, step_fn, params, opt_state, batch)
          window_start = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, batch, jnp.asarray(step, jnp.int32))
        window.append(metrics)
        window_images.append(images_per_row(batch["image_mask"]) if "image_mask" in batch else 0.0)
        batches.fill()  # the next batches are built and transferred while this step runs
        in_flight.append(metrics["loss"])
        if len(in_flight) > STEPS_IN_FLIGHT:
          in_flight.popleft().block_until_ready()
        done = step + 1
        preempted = preemption.requested
        is_log = done % tc.log_every == 0 or done == tc.total_steps or preempted
        is_eval = bool(evaluators and tc.eval_every and done % tc.eval_every == 0 and done != tc.total_steps)
        will_save = preempted or done == tc.total_steps or mngr.should_save(done)
        if is_log or is_eval or will_save:
          # Metrics reach the host only here; every step of the window is checked before its params
          # are saved or evaluated, so no checkpoint holds a state after a non-finite step.
          window[checked:] = jax.device_get(window[checked:])
          _check_finite(window, checked, done - len(window) + 1, mngr, workdir)
          checked = len(window)
        if is_log:
          elapsed = time.perf_counter() - window_start
          last = _window_metrics(window, jax.device_get(window_images), elapsed, batch, model_cfg, peak)
          writer.write(done, last)
          writer.progress(
              done,
              {
                  k: last[k]
                  for k in ("loss", "token_accuracy", "preference_accuracy", "tokens_per_second", "step_time")
                  if k in last
              },
          )
          window, window_images, checked = [], [], 0
          window_start = time.perf_counter()
        if is_eval:
          eval_start = time.perf_counter()
          _run_evals(evaluators, params, done, writer, last, config.lora)
          window_start += time.perf_counter() - eval_start  # evaluation time is not step time
        if will_save:
          checkpoint.save(mngr, done, params, opt_state, batches, config_json, force=True)
        if preempted or preemption.requested:
          if not preempted:
            # The signal landed after this step's flag read: check and log the window before the save.
            window[checked:] = jax.device_get(window[checked:])
            _check_finite(window, checked, done - len(window) + 1, mngr, workdir)
            checked = len(window)
            if window:
              last = _window_metrics(
                  window, jax.device_get(window_images), time.perf_counter() - window_start, batch, model_cfg, peak
              )
              writer.write(done, last)
          _save_committed(mngr, done, params, opt_state, batches, config_json)
          logging.warning("SIGTERM: saved step %d (committed), exiting; rerun to resume", done)
          status = STATUS_PREEMPTED
          break
      else:
        if evaluators:
          _run_evals(evaluators, params, tc.total_steps, writer, last, config.lora)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  last.update(params=params, status=status, step=done)
  return last


def _save_committed(mngr: Any, step: int, params: Any, opt_state: Any, data: Any, config_json: str) -> None:
  """Saves `step` unless it is already committed, waits for the commit and verifies it (SIGTERM path)."""
  mngr.wait_until_finished()
  if mngr.latest_step() != step:
    checkpoint.save(mngr, step, params, opt_state, data, config_json, force=True)
    mngr.wait_until_finished()
  if mngr.latest_step() != step:
    raise RuntimeError(f"SIGTERM: the save of step {step} did not commit (latest checkpoint: {mngr.latest_step()})")


def _check_finite(window: list[dict[str, Any]], start: int, first_step: int, mngr: Any, workdir: str) -> None:
  """Raises NonFiniteLossError at the first step of `window[start:]` with a non-finite loss or norm."""
  for i in range(start, len(window)):
    loss, param_norm = float(window[i]["loss"]), float(window[i]["param_norm"])
    if not (np.isfinite(loss) and np.isfinite(param_norm)):
      mngr.wait_until_finished()
      raise NonFiniteLossError(
          f"loss {loss}, parameter norm {param_norm} at step {first_step + i}; stopped without saving it. "
          "Last good checkpoint: "
          f"step {mngr.latest_step()} in {workdir}/checkpoints"
      )


def _window_metrics(
    window: list[dict[str, Any]],
    images: list[Any],
    elapsed: float,
    batch: dict[str, Any],
    model_cfg: Any,
    peak: float | None,
) -> dict[str, Any]:
  """The log record of the steps since the last log: means over the window (`window_steps` of them),
  the state metrics (`_LAST_VALUE_METRICS`) of the last step, and throughput from the wall time."""
  out = {k: float(np.mean([m[k] for m in window])) for k in window[-1]}
  out.update({k: float(window[-1][k]) for k in _LAST_VALUE_METRICS if k in window[-1]})
  n = len(window)
  step_time = elapsed / n
  s = batch["tokens"].shape[-1]
  b = int(np.prod(batch["tokens"].shape[:-1]))  # rows (2 per preference pair)
  images_per_sample = float(np.mean(images))
  step_flops = b * flops.train_flops_per_sample(model_cfg, s, images_per_sample)
  out.update(
      window_steps=n,
      step_time=step_time,
      tokens_per_second=b * s / step_time,
      tflops_per_device=step_flops / step_time / jax.device_count() / 1e12,
  )
  if peak:
    out["mfu"] = step_flops / step_time / (peak * jax.device_count())
  return out


def _run_evals(
    evaluators: dict[str, Any],
    params: Any,
    step: int,
    writer: MetricsWriter,
    into: dict,
    lora_config: ml_collections.ConfigDict,
) -> None:
  if lora_config.rank:
    params = lora.merge(params, lora.scale(lora_config))
  for name, evaluator in evaluators.items():
    results = evaluator.run(params, step)
    writer.write(step, results, prefix=f"eval/{name}")
    into.update({f"eval/{name}/{k}": v for k, v in results.items()})
