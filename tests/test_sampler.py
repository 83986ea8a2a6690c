"""The while_loop sampler: greedy == argmax of full-sequence logits for every technique, bucketing,
EOS, top-k / top-p / temperature, streaming."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llvm_jax import config_utils, convert, sampler
from llvm_jax.models.config import DeepStackConfig, PhantomConfig, PmodConfig, TrolConfig
from llvm_jax.models.llvm import LLVM

IMAGE = 4
NEW = 5
# 16 px at patch 8: 4 image tokens; 3 layers: DeepStack's two crop groups (1 x 2 crops) land before
# layers 1 and 2, p-MoD routes in layers 1 and 2.
BASE = config_utils.tiny_llvm(vocab_size=64, image_token_id=IMAGE, image_size=16, embed_dim=32, num_layers=3)
PMOD = PmodConfig(schedule="explicit", layers=(1, 2), ratios=(0.5, 0.25))
DEEPSTACK = DeepStackConfig(num_crops=(1, 2))


def _with(trol=None, phantom=None, pmod=None, deepstack=None):
  decoder = dataclasses.replace(BASE.decoder, trol=trol, phantom=phantom, pmod=pmod)
  return dataclasses.replace(BASE, decoder=decoder, deepstack=deepstack)


# Each technique's own tests check its cache against full-sequence logits; here the sampler runs
# their cache modes together (TroL pass-2 caches, Phantom sos entries, p-MoD's shorter MoD-layer
# caches, DeepStack's prefill-only injection).
TECHNIQUES = {
    "baseline": _with(),
    "all_four": _with(trol=TrolConfig(), phantom=PhantomConfig(), pmod=PMOD, deepstack=DEEPSTACK),
}


@functools.cache
def _params(cfg, seed=0):
  """Random init, every leaf perturbed so zero-initialised technique weights (gates, routers) act.

  The perturbation is drawn on the host: a jitted one is another compile as large as the init."""
  rng = np.random.RandomState(seed + 1)
  params = convert.init_params(LLVM(cfg), jax.random.key(seed))
  return jax.device_put(
      jax.tree.map(lambda x: np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), params)
  )


def _prompts():
  n = BASE.tokens_per_image
  return [[1, 7] + [IMAGE] * n + [9, 10, 11], [1] + [IMAGE] * n + list(range(20, 28))]


# Every sampler call here is 4 rows of the 16 bucket: one compiled program per model and sampling mode.
ROWS = 4


def _batch(cfg, prompts):
  batch = sampler.pad_prompts(prompts, ROWS, buckets=(16,))
  rng = np.random.RandomState(0)
  rows = batch["tokens"].shape[0]
  batch["images"] = rng.uniform(-1, 1, (rows, 1, 16, 16, 3)).astype(np.float32)
  batch["image_mask"] = (batch["segment_ids"].sum(axis=1) > 0)[:, None]
  if cfg.deepstack is not None:
    batch["hires_images"] = rng.uniform(-1, 1, (rows, 1, 2, 16, 16, 3)).astype(np.float32)
  return batch


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_greedy_equals_argmax_of_full_sequence_logits(name):
  cfg = TECHNIQUES[name]
  model, params = LLVM(cfg), _params(cfg)
  batch = _batch(cfg, _prompts())
  out = sampler.sample(model, params, batch, sampler.SamplingConfig(max_new_tokens=NEW), return_logits=True)
  tokens = np.asarray(out.tokens)
  full_tokens = np.concatenate([batch["tokens"], tokens[:, :-1]], axis=1)
  segment_ids = np.concatenate([batch["segment_ids"], np.ones_like(tokens[:, :-1])], axis=1)
  real = len(_prompts())  # the rows past it are padding
  logits, _ = jax.jit(model.apply)(
      {"params": params},
      full_tokens,
      batch["images"],
      batch["image_mask"],
      segment_ids,
      hires_images=batch.get("hires_images"),
  )
  step_logits = np.asarray(logits[:real, batch["tokens"].shape[1] - 1 :])
  np.testing.assert_array_equal(tokens[:real], step_logits.argmax(-1))
  np.testing.assert_allclose(np.asarray(out.logits)[:real], step_logits, atol=2e-4, rtol=2e-4)
  assert np.asarray(out.lengths)[:real].tolist() == [NEW, NEW]
  # The output is not degenerate: the rows differ, so images and prompts matter.
  assert not np.array_equal(tokens[0], tokens[1])


@pytest.mark.parametrize("name", ["all_four"])
def test_bucketed_batch_rows_equal_prompts_run_alone(name):
  cfg = TECHNIQUES[name]
  model, params = LLVM(cfg), _params(cfg)
  prompts = _prompts() + [[1, 30] + [IMAGE] * cfg.tokens_per_image + [31, 32, 33, 34, 35, 36, 37, 38]]
  rng = np.random.RandomState(5)
  images = rng.uniform(-1, 1, (len(prompts), 1, 16, 16, 3)).astype(np.float32)
  sampling = sampler.SamplingConfig(max_new_tokens=NEW)
  hires = rng.uniform(-1, 1, (len(prompts), 1, 2, 16, 16, 3)).astype(np.float32)
  batch = sampler.pad_prompts(prompts, batch_size=ROWS, buckets=(16, 32))
  assert batch["tokens"].shape == (ROWS, 16)
  batch["images"] = np.concatenate([images, images[:1]])
  batch["hires_images"] = np.concatenate([hires, hires[:1]])
  batch["image_mask"] = np.asarray([[True]] * 3 + [[False]])
  together = sampler.sample(model, params, batch, sampling, return_logits=True)
  for row, prompt in enumerate(prompts):
    # Alone: the only prompt among padding rows (the same shape as `together`: no second compile).
    alone_batch = sampler.pad_prompts([prompt], batch_size=ROWS, buckets=(16, 32))
    alone_batch.update(
        images=np.roll(batch["images"], -row, axis=0),
        hires_images=np.roll(batch["hires_images"], -row, axis=0),
        image_mask=np.asarray([[True]] + [[False]] * (ROWS - 1)),
    )
    alone = sampler.sample(model, params, alone_batch, sampling, return_logits=True)
    np.testing.assert_array_equal(np.asarray(together.tokens)[row], np.asarray(alone.tokens)[0])
    np.testing.assert_allclose(np.asarray(together.logits)[row], np.asarray(alone.logits)[0], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def baseline():
  cfg = TECHNIQUES["baseline"]
  return LLVM(cfg), _params(cfg), _batch(cfg, _prompts())


def test_eos_stops_a_row_and_pads_after_it(baseline):
  model, params, batch = baseline
  greedy = np.asarray(sampler.sample(model, params, batch, sampler.SamplingConfig(max_new_tokens=NEW)).tokens)
  # EOS := the first token of row 0 that is new after its first step, so row 0 stops mid-way.
  stop = next(j for j in range(1, NEW) if greedy[0, j] not in greedy[0, :j]) + 1
  eos = int(greedy[0, stop - 1])
  out = sampler.sample(model, params, batch, sampler.SamplingConfig(max_new_tokens=NEW, eos_id=eos, pad_id=63))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  assert lengths[0] == stop and tokens[0, :stop].tolist() == greedy[0, :stop].tolist()
  assert (tokens[0, stop:] == 63).all()
  row1_stop = list(greedy[1]).index(eos) + 1 if eos in greedy[1] else NEW
  assert lengths[1] == row1_stop and tokens[1, :row1_stop].tolist() == greedy[1, :row1_stop].tolist()


def test_top_k_one_and_tiny_top_p_are_greedy(baseline):
  model, params, batch = baseline
  greedy = sampler.sample(model, params, batch, sampler.SamplingConfig(max_new_tokens=NEW)).tokens
  key = jax.random.key(3)
  for sampling in (
      sampler.SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_k=1),
      sampler.SamplingConfig(max_new_tokens=NEW, temperature=1.0, top_p=1e-6),
  ):
    np.testing.assert_array_equal(sampler.sample(model, params, batch, sampling, key).tokens, greedy)


def test_temperature_sampling_follows_the_key(baseline):
  model, params, batch = baseline
  sampling = sampler.SamplingConfig(max_new_tokens=NEW, temperature=5.0)
  a = sampler.sample(model, params, batch, sampling, jax.random.key(1)).tokens
  b = sampler.sample(model, params, batch, sampling, jax.random.key(1)).tokens
  c = sampler.sample(model, params, batch, sampling, jax.random.key(2)).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  with pytest.raises(ValueError, match="PRNG key"):
    sampler.sample(model, params, batch, sampling)


def test_choose_tokens_respects_top_k_and_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 2000)
  draw = jax.jit(jax.vmap(lambda k, knobs: sampler.choose_tokens(logits, knobs, k)[0], in_axes=(0, None)))
  top2 = np.asarray(draw(keys, sampler.SamplingConfig(temperature=1.0, top_k=2).knobs()))
  assert set(top2.tolist()) == {0, 1}
  assert abs((top2 == 0).mean() - 0.5 / 0.8) < 0.04
  # top_p=0.7: 0.5 alone is < 0.7, so {0, 1} (mass 0.8) is the nucleus.
  nucleus = np.asarray(draw(keys, sampler.SamplingConfig(temperature=1.0, top_p=0.7).knobs()))
  assert set(nucleus.tolist()) == {0, 1}
  full = np.asarray(draw(keys, sampler.SamplingConfig(temperature=1.0).knobs()))
  assert abs((full == 3).mean() - 0.05) < 0.02


def test_stream_receives_every_step_in_order(baseline):
  model, params, batch = baseline
  seen = []
  out = sampler.sample(
      model,
      params,
      batch,
      sampler.SamplingConfig(max_new_tokens=NEW),
      stream=lambda step, tokens: seen.append((int(step), np.asarray(tokens).tolist())),
  )
  jax.effects_barrier()
  assert [s for s, _ in seen] == list(range(NEW))
  np.testing.assert_array_equal(np.asarray([t for _, t in seen]).T, out.tokens)


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match="top_p"):
    sampler.SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="largest bucket 16"):
    sampler.pad_prompts([[1] * 17], buckets=(16,))
  with pytest.raises(ValueError, match="3 prompts > batch_size=2"):
    sampler.pad_prompts([[1], [2], [3]], batch_size=2)
