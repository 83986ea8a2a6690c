"""Decoder LLMs against transformers (fp32): Llama, Qwen2, Phi-3; KV cache; export round trip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llvm_jax import convert, tree_utils
from llvm_jax.convert import core
from llvm_jax.models import rope as rope_lib
from llvm_jax.models.config import RopeConfig
from llvm_jax.models.llvm import decode_step, prefill

VOCAB = 97
TOL = 1e-4


def _hf_models():
  common = dict(
      vocab_size=VOCAB, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
  )
  return {
      # Llama 3.1-style rope scaling, untied head, GQA.
      "llama": transformers.LlamaForCausalLM(
          transformers.LlamaConfig(
              hidden_size=48,
              rope_parameters=dict(
                  rope_type="llama3",
                  rope_theta=500000.0,
                  factor=8.0,
                  low_freq_factor=1.0,
                  high_freq_factor=4.0,
                  original_max_position_embeddings=8,
              ),
              **common,
          )
      ),
      # Qwen2: q/k/v biases, tied embeddings, yarn scaling.
      "qwen2": transformers.Qwen2ForCausalLM(
          transformers.Qwen2Config(
              hidden_size=48,
              tie_word_embeddings=True,
              rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=8),
              **common,
          )
      ),
      # Phi-3: fused qkv / gate_up, partial rotary, longrope (long factors past 8 positions), sliding window.
      "phi3": transformers.Phi3ForCausalLM(
          transformers.Phi3Config(
              hidden_size=64,
              pad_token_id=0,
              bos_token_id=1,
              eos_token_id=2,
              max_position_embeddings=64,
              original_max_position_embeddings=8,
              sliding_window=6,
              rope_parameters=dict(
                  rope_type="longrope",
                  rope_theta=10000.0,
                  partial_rotary_factor=0.75,
                  short_factor=[1.0, 1.1, 1.2, 1.3, 1.4, 1.5],
                  long_factor=[2.0, 2.1, 2.2, 2.3, 2.4, 2.5],
              ),
              **common,
          )
      ),
  }


@pytest.fixture(scope="module")
def hf_models():
  torch.manual_seed(0)
  models = _hf_models()
  for m in models.values():
    # Random biases/norm scales so that no parameter is a trivial value the mapping could miss.
    with torch.no_grad():
      for name, p in m.named_parameters():
        if "norm" in name or name.endswith("bias"):
          p.add_(0.1 * torch.randn_like(p))
    m.eval()
  return models


@pytest.fixture(scope="module")
def saved_dirs(hf_models, tmp_path_factory):
  dirs = {}
  for name, m in hf_models.items():
    d = tmp_path_factory.mktemp(name)
    m.save_pretrained(d)
    dirs[name] = str(d)
  return dirs


def _tokens(batch=2, length=12, seed=0):
  return np.random.RandomState(seed).randint(3, VOCAB, (batch, length))


def _hf_logits(model, tokens, **kw):
  with torch.no_grad():
    return model(torch.tensor(tokens), **kw).logits.numpy()


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_logits_match_transformers(family, hf_models, saved_dirs):
  model, params = convert.from_hf(saved_dirs[family])
  assert model.config.decoder.family == family
  tokens = _tokens()
  ours, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens))
  diff = np.abs(np.asarray(ours) - _hf_logits(hf_models[family], tokens)).max()
  print(f"{family} logits max|diff| vs transformers: {diff:.2e}")
  assert diff <= TOL


def test_in_memory_model_equals_directory(hf_models, saved_dirs):
  _, from_dir = convert.from_hf(saved_dirs["qwen2"])
  _, from_obj = convert.from_hf(hf_models["qwen2"])
  flat_dir, flat_obj = tree_utils.flatten(from_dir), tree_utils.flatten(from_obj)
  assert flat_dir.keys() == flat_obj.keys()
  for k in flat_dir:
    np.testing.assert_array_equal(flat_dir[k], flat_obj[k])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_prefill_then_decode_equals_full_sequence(family, saved_dirs):
  model, params = convert.from_hf(saved_dirs[family])
  tokens = jnp.asarray(_tokens(length=10))
  full, _ = model.apply({"params": params}, tokens)
  logits, cache = prefill(model, params, tokens[:, :6], max_len=12)
  steps = [logits]
  for t in range(6, 10):
    logits, cache = decode_step(model, params, tokens[:, t : t + 1], cache)
    steps.append(logits)
  diff = np.abs(np.concatenate(steps, axis=1) - np.asarray(full)).max()
  print(f"{family} prefill(6)+4 decode steps vs full: {diff:.2e}")
  assert diff <= 1e-5
  assert int(cache["end"]) == 10


def test_phi3_cache_with_sliding_window_short_context(saved_dirs):
  # Within the original context (8) longrope uses its short factors in both paths.
  model, params = convert.from_hf(saved_dirs["phi3"])
  tokens = jnp.asarray(_tokens(length=8))
  full, _ = model.apply({"params": params}, tokens)
  logits, cache = prefill(model, params, tokens[:, :3], max_len=8)
  steps = [logits]
  for t in range(3, 8):
    logits, cache = decode_step(model, params, tokens[:, t : t + 1], cache)
    steps.append(logits)
  assert np.abs(np.concatenate(steps, axis=1) - np.asarray(full)).max() <= 1e-5


def test_left_padded_rows_match_rows_alone(saved_dirs, hf_models):
  model, params = convert.from_hf(saved_dirs["llama"])
  tokens = _tokens(batch=2, length=9)
  segment_ids = np.ones_like(tokens)
  segment_ids[0, :4] = 0  # row 0 is a 5-token prompt, left-padded
  tokens[0, :4] = 0
  batch_logits, _ = model.apply({"params": params}, jnp.asarray(tokens), segment_ids=jnp.asarray(segment_ids))
  alone, _ = model.apply({"params": params}, jnp.asarray(tokens[:1, 4:]))
  np.testing.assert_allclose(np.asarray(batch_logits)[0, 4:], np.asarray(alone)[0], atol=1e-5)
  # Same with the cache: left-padded prefill, then decode.
  logits, cache = prefill(model, params, jnp.asarray(tokens), max_len=11, segment_ids=jnp.asarray(segment_ids))
  nxt = jnp.asarray([[7], [7]], jnp.int32)
  step, _ = decode_step(model, params, nxt, cache)
  alone_next, _ = model.apply({"params": params}, jnp.concatenate([jnp.asarray(tokens[:1, 4:]), nxt[:1]], axis=1))
  np.testing.assert_allclose(np.asarray(step)[0, 0], np.asarray(alone_next)[0, -1], atol=1e-5)


def test_packed_segments_are_independent(saved_dirs):
  model, params = convert.from_hf(saved_dirs["qwen2"])
  a, b = _tokens(1, 5, seed=1), _tokens(1, 7, seed=2)
  packed = np.concatenate([a, b], axis=1)
  segments = np.asarray([[1] * 5 + [2] * 7])
  logits, _ = model.apply({"params": params}, jnp.asarray(packed), segment_ids=jnp.asarray(segments))
  la, _ = model.apply({"params": params}, jnp.asarray(a))
  lb, _ = model.apply({"params": params}, jnp.asarray(b))
  np.testing.assert_allclose(np.asarray(logits)[0, :5], np.asarray(la)[0], atol=1e-5)
  np.testing.assert_allclose(np.asarray(logits)[0, 5:], np.asarray(lb)[0], atol=1e-5)


def test_scanned_layers_equal_unscanned(saved_dirs):
  model, params = convert.from_hf(saved_dirs["llama"])
  scanned, scanned_params = convert.from_hf(saved_dirs["llama"], scan_layers=True, remat_policy="full")
  assert scanned_params["decoder"]["layers"]["layer"]["attn"]["q"]["kernel"].shape[0] == 2
  tokens = jnp.asarray(_tokens())
  ref, _ = model.apply({"params": params}, tokens)
  out, _ = scanned.apply({"params": scanned_params}, tokens)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
  full, _ = scanned.apply({"params": scanned_params}, tokens[:, :8])
  logits, cache = prefill(scanned, scanned_params, tokens[:, :5], max_len=8)
  steps = [logits]
  for t in range(5, 8):
    logits, cache = decode_step(scanned, scanned_params, tokens[:, t : t + 1], cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), np.asarray(full), atol=1e-5)


def test_bf16_compute_close_to_fp32(saved_dirs):
  model, params = convert.from_hf(saved_dirs["llama"])
  bf16, bf16_params = convert.from_hf(saved_dirs["llama"], dtype="bfloat16", param_dtype="bfloat16")
  assert bf16_params["decoder"]["embedding"].dtype == jnp.bfloat16
  tokens = jnp.asarray(_tokens())
  ref, _ = model.apply({"params": params}, tokens)
  out, _ = bf16.apply({"params": bf16_params}, tokens)
  assert out.dtype == jnp.bfloat16
  rel = np.abs(np.asarray(out, np.float32) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
  assert rel < 5e-2


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_to_hf_round_trip(family, saved_dirs, hf_models, tmp_path):
  model, params = convert.from_hf(saved_dirs[family])
  out = convert.to_hf(model.config, params, str(tmp_path / "export"))
  reloaded = type(hf_models[family]).from_pretrained(out).eval()
  tokens = _tokens()
  ours, _ = model.apply({"params": params}, jnp.asarray(tokens))
  diff = np.abs(_hf_logits(reloaded, tokens) - np.asarray(ours)).max()
  print(f"{family} to_hf round trip max|diff|: {diff:.2e}")
  assert diff <= TOL
  # The exported state equals the original checkpoint tensor for tensor.
  original = {k: v.numpy() for k, v in hf_models[family].state_dict().items()}
  exported = core.read_safetensors_dir(out)
  for k, v in exported.items():
    np.testing.assert_array_equal(v, original[k])


def test_sharded_checkpoint_directory_is_followed(hf_models, tmp_path):
  hf_models["llama"].save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  _, params = convert.from_hf(str(tmp_path))
  np.testing.assert_array_equal(
      params["decoder"]["layers_1"]["mlp"]["down"]["kernel"],
      hf_models["llama"].model.layers[1].mlp.down_proj.weight.detach().numpy().T,
  )


def test_mismatch_lists_every_bad_weight(hf_models):
  model, _ = convert.from_hf(hf_models["llama"])
  state = {convert.canonical_key(k): v.numpy() for k, v in hf_models["llama"].state_dict().items()}
  del state["model.layers.1.mlp.up_proj.weight"]
  state["model.layers.0.self_attn.extra.weight"] = np.zeros(3)
  state["model.norm.weight"] = np.zeros(5, np.float32)
  with pytest.raises(core.WeightMismatchError) as err:
    core.hf_to_ours(state, convert.full_table(model.config), convert.expected_shapes(model))
  message = str(err.value)
  assert "model.layers.1.mlp.up_proj.weight" in message
  assert "model.layers.0.self_attn.extra.weight" in message
  assert "decoder/final_norm/scale: got (5,), model expects (48,)" in message


def test_missing_directory_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing_here"):
    convert.from_hf(str(tmp_path / "nothing_here"))


@pytest.mark.parametrize(
    "rope",
    [
        dict(rope_type="linear", factor=2.0),
        dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=16.0, beta_slow=2.0),
        dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=0.5),
    ],
)
def test_rope_frequencies_match_transformers(rope):
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  hf_config = transformers.LlamaConfig(
      hidden_size=64,
      num_attention_heads=4,
      max_position_embeddings=256,
      rope_parameters=dict(rope_theta=10000.0, **rope),
  )
  inv_ref, attn_ref = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf_config, "cpu")
  ours = convert.hf_config.rope_from_hf(hf_config.rope_parameters)
  inv, attn = rope_lib.inverse_frequencies(ours, 16, 256)
  np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=1e-6)
  assert attn == pytest.approx(attn_ref)


def test_dynamic_rope_is_rejected_by_name():
  with pytest.raises(ValueError, match="dynamic"):
    rope_lib.inverse_frequencies(RopeConfig(type="dynamic", factor=2.0), 16, 128)


def test_config_rejects_unknown_keys_by_name():
  from llvm_jax.models.config import LLVMConfig

  cfg = dataclasses.asdict(LLVMConfig())
  cfg["decoder"]["num_layrs"] = 3
  with pytest.raises(ValueError, match=r"model\.decoder\.num_layrs \(did you mean model\.decoder\.num_layers\?\)"):
    LLVMConfig.from_dict(cfg)
