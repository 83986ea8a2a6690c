"""The train loop: loss falls, exact resume, frozen groups, micro-batches, mesh changes, NaN stop."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multiprocess_helpers import REPO, free_port, run_workers, worker_env
from train_helpers import SyntheticBatches, run, tiny_config

from llvm_jax import config_utils, convert
from llvm_jax.data.pipeline import make_global_batch
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import checkpoint, lora, trainer
from llvm_jax.tree_utils import flatten

WORKER = os.path.join(REPO, "tests", "train_multihost_worker.py")


def test_loss_falls_and_metrics_are_written(tmp_path):
  config = tiny_config(total_steps=30, checkpoint_every=100)
  last, _ = run(config, tmp_path)
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses = [l["train/loss"] for l in lines]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
  for key in ("train/grad_norm", "train/learning_rate", "train/tokens_per_second", "train/step_time"):
    assert key in lines[-1]
  assert os.listdir(tmp_path / "tensorboard")


def test_sigterm_saves_and_resume_is_exact(tmp_path):
  straight, _ = run(tiny_config(total_steps=6, checkpoint_every=100), tmp_path / "straight")
  # The trainer draws batch i + 1 + PREFETCH_BATCHES (1-based) while step i runs: the SIGTERM comes during step 3.
  stopped, _ = run(
      tiny_config(total_steps=6, checkpoint_every=100), tmp_path / "split", sigterm_at=3 + trainer.PREFETCH_BATCHES
  )
  assert checkpoint.latest_step(str(tmp_path / "split")) == 3  # saved on SIGTERM, off the interval
  resumed, data = run(tiny_config(total_steps=6, checkpoint_every=100), tmp_path / "split")
  assert data.index == 6  # the data iterator resumed at batch 3, not 0
  a, b = flatten(straight["params"]), flatten(resumed["params"])
  assert max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in a) <= 1e-6


def test_restore_on_a_different_mesh(tmp_path):
  run(tiny_config(total_steps=3, mesh_shape=(8, 1, 1), strategy="dp"), tmp_path)
  config = tiny_config(total_steps=3, mesh_shape=(2, 2, 2), strategy="fsdp_tp")
  model = LLVM(config_utils.model_config(config))
  setup, abstract = trainer.build_setup(config, model, trainer.mesh_from_config(config))
  params, step = checkpoint.params_only(str(tmp_path), trainer.sharded_abstract(abstract, setup.param_shardings))
  assert step == 3
  kernel = params["decoder"]["layers_0"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_pretrain_stage_keeps_frozen_groups_bit_identical(tmp_path):
  config = tiny_config(total_steps=2, checkpoint_every=100)
  config.unlock()
  config.optim.trainable = [("projector/.*", 1.0), (".*", None)]
  config.lock()
  model = LLVM(config_utils.model_config(config))
  before = flatten(convert.init_params(model, jax.random.key(config.seed)))
  last, _ = run(config, tmp_path)
  after = flatten(last["params"])
  changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
  assert changed and all(k.startswith("projector/") for k in changed)
  assert len(changed) == len([k for k in before if k.startswith("projector/")])


def test_microbatches_equal_one_big_batch(tmp_path):
  one, _ = run(tiny_config(total_steps=2, checkpoint_every=100), tmp_path / "one")
  four, _ = run(tiny_config(total_steps=2, checkpoint_every=100, microbatches=4), tmp_path / "four")
  a, b = flatten(one["params"]), flatten(four["params"])
  assert max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in a) <= 1e-5


def test_unmatched_trainable_rule_is_an_error(tmp_path):
  config = tiny_config(total_steps=1)
  config.unlock()
  config.optim.trainable = [("projector/.*", 1.0)]
  config.lock()
  with pytest.raises(ValueError, match="no rule in optim.trainable matches parameter 'decoder/"):
    run(config, tmp_path)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  run(tiny_config(total_steps=3), tmp_path)
  config = tiny_config(total_steps=6)
  config.unlock()
  config.optim.lr = float("nan")
  config.lock()
  with pytest.raises(trainer.NonFiniteLossError, match="Last good checkpoint: step 3"):
    run(config, tmp_path)
  assert checkpoint.latest_step(str(tmp_path)) == 3


def test_lora_trains_only_adapters_and_merges(tmp_path):
  config = tiny_config(total_steps=3, checkpoint_every=100)
  config.unlock()
  config.lora.rank = 4
  config.optim.trainable = [("lora/.*", 1.0), (".*", None)]
  config.lock()
  model = LLVM(config_utils.model_config(config))
  base = flatten(convert.init_params(model, jax.random.key(config.seed)))
  last, _ = run(config, tmp_path)
  params = last["params"]
  after = flatten({k: v for k, v in params.items() if k != "lora"})
  assert all(np.array_equal(np.asarray(base[k]), np.asarray(after[k])) for k in base)
  assert len(params["lora"]) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
  assert float(jnp.abs(params["lora"]["decoder.layers_0.attn.o.kernel"]["b"]).max()) > 0
  merged = lora.merge(params, lora.scale(config.lora))
  delta = merged["decoder"]["layers_0"]["attn"]["o"]["kernel"] - params["decoder"]["layers_0"]["attn"]["o"]["kernel"]
  ab = params["lora"]["decoder.layers_0.attn.o.kernel"]
  np.testing.assert_allclose(
      np.asarray(delta).reshape(-1, 32), lora.scale(config.lora) * np.asarray(ab["a"] @ ab["b"]), atol=1e-6
  )
  assert "lora" not in merged


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  single, _ = run(tiny_config(total_steps=3, checkpoint_every=3), tmp_path / "single")
  single_losses = [json.loads(l)["train/loss"] for l in open(tmp_path / "single" / "metrics.jsonl")]
  port = free_port()
  env = worker_env(devices=4)
  workdir = tmp_path / "pair"
  run_workers(WORKER, [[str(i), str(port), str(workdir)] for i in range(2)], env, timeout=240)
  pair_losses = [json.loads(l)["train/loss"] for l in open(workdir / "metrics.jsonl")]
  np.testing.assert_allclose(pair_losses, single_losses, atol=1e-5)
  # The pair's checkpoint restores in this single process (8 devices).
  config = tiny_config(total_steps=3)
  model = LLVM(config_utils.model_config(config))
  setup, abstract = trainer.build_setup(config, model, trainer.mesh_from_config(config))
  params, step = checkpoint.params_only(str(workdir), trainer.sharded_abstract(abstract, setup.param_shardings))
  assert step == 3
  a, b = flatten(single["params"]), flatten(params)
  assert max(float(jnp.max(jnp.abs(a[k] - b[k]))) for k in a) <= 1e-5


class PreferencePairs(SyntheticBatches):
  """(B, 2, S) pairs: chosen = the synthetic answer, rejected = the same prompt with a wrong one."""

  def __next__(self):
    rows = super().__next__()
    local = {k: np.asarray(v) for k, v in rows.items()}
    rejected_tokens = local["tokens"].copy()
    rejected_tokens[:, -4:] = (rejected_tokens[:, -4:] + 7) % 60 + 2
    rejected_targets = np.concatenate([rejected_tokens[:, 1:], np.zeros((len(rejected_tokens), 1), np.int32)], axis=1)
    pair = lambda a, b: np.stack([a, b], axis=1)
    return make_global_batch(
        {
            "tokens": pair(local["tokens"], rejected_tokens),
            "targets": pair(local["targets"], rejected_targets),
            "target_mask": pair(local["target_mask"], local["target_mask"]),
            "segment_ids": pair(local["segment_ids"], local["segment_ids"]),
            "positions": pair(local["positions"], local["positions"]),
            "images": local["images"],
            "image_mask": local["image_mask"],
        },
        self.mesh,
    )


def test_po_stage_trains_on_preference_pairs(tmp_path):
  config = tiny_config(total_steps=12, checkpoint_every=100)
  config.unlock()
  config_utils.set_stage(config, "po2")
  config.lock()
  assert config.train.loss == "po"
  mesh = trainer.mesh_from_config(config)
  last = trainer.train(config, str(tmp_path), PreferencePairs(mesh, config_utils.model_config(config)))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  margins = [l["train/margin"] for l in lines]
  assert np.mean(margins[-3:]) > np.mean(margins[:3]) + 0.5
  assert last["preference_accuracy"] == 1.0
  assert {"train/chosen_logp", "train/rejected_logp", "train/sft", "train/pref"} <= set(lines[-1])


def test_checkpoint_of_another_model_is_named(tmp_path):
  run(tiny_config(total_steps=3), tmp_path)
  config = tiny_config(total_steps=3)
  config.unlock()
  config.model.decoder.num_layers = 3
  config.lock()
  model = LLVM(config_utils.model_config(config))
  setup, abstract = trainer.build_setup(config, model, trainer.mesh_from_config(config))
  with pytest.raises(convert.WeightMismatchError, match=r"missing \(9\): decoder/layers_2/"):
    checkpoint.params_only(str(tmp_path), trainer.sharded_abstract(abstract, setup.param_shardings))


def test_log_windows_keep_params_and_average_the_loss(tmp_path):
  # Metrics reach the host only at log steps; the updates must not depend on when that happens.
  runs = {
      n: run(tiny_config(total_steps=6, checkpoint_every=100, log_every=n), tmp_path / str(n))[0] for n in (1, 4, 100)
  }
  lines = {n: [json.loads(l) for l in open(tmp_path / str(n) / "metrics.jsonl")] for n in runs}
  a = flatten(runs[1]["params"])
  for n in (4, 100):
    b = flatten(runs[n]["params"])
    assert all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in a), n
  per_step = lines[1]
  assert [l["step"] for l in lines[4]] == [4, 6] and [l["step"] for l in lines[100]] == [6]
  for line, window in [(lines[4][0], per_step[:4]), (lines[4][1], per_step[4:]), (lines[100][0], per_step)]:
    assert line["train/window_steps"] == len(window)
    assert line["train/loss"] == pytest.approx(np.mean([l["train/loss"] for l in window]), rel=1e-6)
    assert line["train/token_accuracy"] == pytest.approx(np.mean([l["train/token_accuracy"] for l in window]), rel=1e-6)
    for key in ("train/learning_rate", "train/param_norm"):  # the state at the log step
      assert line[key] == window[-1][key]
    assert line["train/step_time"] > 0 and line["train/tokens_per_second"] > 0


class NaNImagesAt(SyntheticBatches):
  """SyntheticBatches whose batch `nan_at` (1-based) has NaN pixels."""

  def __init__(self, *args, nan_at, **kwargs):
    super().__init__(*args, **kwargs)
    self.nan_at = nan_at

  def __next__(self):
    batch = super().__next__()
    if self.index == self.nan_at:
      batch["images"] = make_global_batch({"images": np.full(batch["images"].shape, np.nan, np.float32)}, self.mesh)[
          "images"
      ]
    return batch


def test_nan_between_log_steps_is_caught_before_the_next_save(tmp_path):
  # NaN at step 3 (no log until 100): the save at step 4 checks steps 3-4 first and stops.
  config = tiny_config(total_steps=8, checkpoint_every=2, log_every=100)
  data = NaNImagesAt(trainer.mesh_from_config(config), config_utils.model_config(config), nan_at=3)
  with pytest.raises(trainer.NonFiniteLossError, match="at step 3; .*Last good checkpoint: step 2"):
    trainer.train(config, str(tmp_path), data)
  assert checkpoint.latest_step(str(tmp_path)) == 2


class _Counter:

  def __init__(self, n):
    self.index, self.n = 0, n

  def __next__(self):
    if self.index == self.n:
      raise StopIteration
    self.index += 1
    return {"x": np.full((2,), self.index), "id": np.array(["a", "b"])}

  def get_state(self):
    return str(self.index).encode()


def test_device_prefetch_state_is_the_consumed_batches():
  it = _Counter(n=5)
  prefetch = trainer.DevicePrefetch(it, size=2, limit=4)
  assert prefetch.get_state() == b"0"
  first = prefetch.pop()
  assert int(first["x"][0]) == 1 and "id" not in first  # numeric fields only
  assert it.index == 2 and prefetch.get_state() == b"1"  # one ahead after pop, ...
  prefetch.fill()
  assert it.index == 3 and prefetch.get_state() == b"1"  # ... two after fill; the state is still batch 1's
  assert [int(prefetch.pop()["x"][0]) for _ in range(3)] == [2, 3, 4]
  assert it.index == 4 and prefetch.get_state() == b"4"  # never past `limit`
  with pytest.raises(StopIteration):
    prefetch.pop()
  short = trainer.DevicePrefetch(_Counter(n=1), size=2, limit=10)
  short.pop()
  with pytest.raises(StopIteration):  # the end of the data surfaces when a step needs a batch
    short.pop()


def test_decay_steps_sets_the_schedule_length_apart_from_the_run_length():
  from llvm_jax.train import optim

  config = optim.default_optim_config()
  config.update(lr=1.0, warmup_steps=2)
  by_run = optim.lr_schedule(config, 10)
  assert float(by_run(2)) == pytest.approx(1.0) and float(by_run(10)) == pytest.approx(0.0)
  config.decay_steps = 20
  by_decay = optim.lr_schedule(config, 10)
  assert float(by_decay(10)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 8 / 18)))  # mid-decay at step 10
  assert float(by_decay(20)) == pytest.approx(0.0)
  config.decay_steps = -1
  with pytest.raises(ValueError, match="optim.decay_steps=-1"):
    optim.lr_schedule(config, 10)


def test_init_checkpoint_starts_from_another_runs_params(tmp_path):
  first, _ = run(tiny_config(total_steps=3), tmp_path / "first")
  config = tiny_config(total_steps=3)
  with config.unlocked():
    config.init_checkpoint = str(tmp_path / "first")
  model = LLVM(config_utils.model_config(config))
  setup, _ = trainer.build_setup(config, model, trainer.mesh_from_config(config))
  start = flatten(trainer.initial_params(config, setup))
  expected = flatten(first["params"])
  assert set(start) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(np.asarray(start[key]), np.asarray(value), err_msg=key)
