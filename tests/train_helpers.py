"""Shared by the train tests and the multi-process worker: tiny configs and synthetic batches."""

import json
import os
import signal

import jax
import numpy as np

from llvm_jax import config_utils
from llvm_jax.data.pipeline import make_global_batch
from llvm_jax.train import trainer

SEQ = 24
BATCH = 8


def tiny_config(total_steps=6, mesh_shape=(-1, 1, 1), strategy="fsdp", **train):
  model = config_utils.tiny_llvm(vocab_size=64, image_size=16, patch_size=8, embed_dim=32)
  config = config_utils.experiment(model, task="train", lock=False)
  config.train.update({"total_steps": total_steps, "log_every": 1, "checkpoint_every": 3, **train})
  # One schedule for every run length: the train tests then share their compiled steps.
  config.optim.update(lr=3e-3, warmup_steps=1, decay_steps=30)
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
    # Each process feeds the rows of the global batch that live on its devices.
    per_process = batch // jax.process_count()
    self.rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)

  def __iter__(self):
    return self

  def __next__(self):
    rng = np.random.RandomState(self.index)
    self.index += 1
    if self.index == self.sigterm_at:  # as if the scheduler preempted the job while this batch is drawn
      os.kill(os.getpid(), signal.SIGTERM)
    n_img = self.cfg.tokens_per_image
    key = rng.randint(10, 20, (self.batch, 1))
    tokens = np.concatenate(
        [
            np.full((self.batch, 1), 1),
            np.full((self.batch, n_img), self.cfg.image_token_id),
            key,
            rng.randint(20, 60, (self.batch, SEQ - n_img - 6)),
            np.tile(key + 30, (1, 4)),
        ],
        axis=1,
    ).astype(np.int32)
    targets = np.concatenate([tokens[:, 1:], np.zeros((self.batch, 1), np.int32)], axis=1)
    mask = np.zeros((self.batch, SEQ), np.float32)
    mask[:, -5:-1] = 1.0
    local = {
        "tokens": tokens,
        "targets": targets,
        "target_mask": mask,
        "segment_ids": np.ones_like(tokens),
        "positions": np.tile(np.arange(SEQ, dtype=np.int32), (self.batch, 1)),
        "images": rng.uniform(-1, 1, (self.batch, 1, 16, 16, 3)).astype(np.float32),
        "image_mask": np.ones((self.batch, 1), bool),
    }
    return make_global_batch({k: v[self.rows] for k, v in local.items()}, self.mesh)

  def get_state(self):
    return json.dumps({"index": self.index}).encode()

  def set_state(self, state):
    self.index = json.loads(state)["index"]

  def start_prefetch(self):
    pass


def run(config, workdir, sigterm_at=None):
  """Trains `config` in `workdir` on SyntheticBatches; returns (train()'s result, the data)."""
  mesh = trainer.mesh_from_config(config)
  data = SyntheticBatches(mesh, config_utils.model_config(config), sigterm_at=sigterm_at)
  return trainer.train(config, str(workdir), data), data
