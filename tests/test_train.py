"""The train loop: loss falls, exact resume, frozen groups, micro-batches, mesh changes, NaN stop."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llvm_jax import config_utils, convert
from llvm_jax.convert.core import flatten
from llvm_jax.data.pipeline import make_global_batch
from llvm_jax.models.llvm import LLVM
from llvm_jax.train import checkpoint, trainer

SEQ = 24
BATCH = 8


def tiny_config(total_steps=6, mesh_shape=(-1, 1, 1), strategy="fsdp", **train):
  model = config_utils.tiny_llvm(vocab_size=64, image_size=16, patch_size=8, embed_dim=32)
  config = config_utils.experiment(model, task="train", lock=False)
  config.train.update({"total_steps": total_steps, "log_every": 1, "checkpoint_every": 3, **train})
  config.optim.update(lr=3e-3, warmup_steps=1)
  config.sharding.mesh_shape = mesh_shape
  config.sharding.strategy = strategy
  config.lock()
  return config


class SyntheticBatches:
  """Deterministic batches (batch i from seed i) with grain-style get_state/set_state.

  The answer (last 4 tokens) is a function of the first text token, so the loss can fall.
  """

  def __init__(self, mesh, model_cfg, batch=BATCH, sigterm_at=None):
    self.mesh, self.cfg, self.batch, self.index = mesh, model_cfg, batch, 0
    self.sigterm_at = sigterm_at

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.RandomState(self.index)
    self.index += 1
    if self.index == self.sigterm_at:  # as if the scheduler preempted the job during this step
      os.kill(os.getpid(), signal.SIGTERM)
    n_img = self.cfg.tokens_per_image
    key = rng.randint(10, 20, (self.batch, 1))
    tokens = np.concatenate([
        np.full((self.batch, 1), 1), np.full((self.batch, n_img), self.cfg.image_token_id), key,
        rng.randint(20, 60, (self.batch, SEQ - n_img - 6)), np.tile(key + 30, (1, 4)),
    ], axis=1).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((self.batch, 1), np.int32)], axis=1)
    mask = np.zeros((self.batch, SEQ), np.float32)
    mask[:, -5:-1] = 1.0
    local = {
        "tokens": tokens, "targets": targets, "target_mask": mask,
        "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(SEQ, dtype=np.int32), (self.batch, 1)),
        "images": rng.uniform(-1, 1, (self.batch, 1, 16, 16, 3)).astype(np.float32),
        "image_mask": np.ones((self.batch, 1), bool),
    }
    return make_global_batch(local, self.mesh)

  def get_state(self):
    return json.dumps({"index": self.index}).encode()

  def set_state(self, state):
    self.index = json.loads(state)["index"]

  def start_prefetch(self):
    pass


def run(config, workdir, sigterm_at=None):
  mesh = trainer.mesh_from_config(config)
  data = SyntheticBatches(mesh, config_utils.model_config(config), sigterm_at=sigterm_at)
  return trainer.train(config, str(workdir), data), data


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
  stopped, _ = run(tiny_config(total_steps=6, checkpoint_every=100), tmp_path / "split", sigterm_at=3)
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
  params, step = checkpoint.params_only(str(tmp_path), trainer._sharded_abstract(abstract, setup.param_shardings))
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
