"""Whole LLVMs against transformers (fp32) with real pixel inputs: LLaVA and InternVL."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llvm_jax import convert
from llvm_jax.models.llvm import decode_step, prefill

TOL = 1e-4
VOCAB = 80
IMAGE_TOKEN = 79


def _text(hidden=48, family="llama"):
  common = dict(
      vocab_size=VOCAB,
      hidden_size=hidden,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
  )
  if family == "qwen2":
    return transformers.Qwen2Config(**common)
  return transformers.LlamaConfig(**common)


def _llava_clip():
  vision = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=7
  )
  return transformers.LlavaForConditionalGeneration(
      transformers.LlavaConfig(
          vision_config=vision,
          text_config=_text(),
          image_token_id=IMAGE_TOKEN,
          vision_feature_layer=-2,
          vision_feature_select_strategy="default",
          image_seq_length=16,
      )
  )


def _llava_siglip():
  vision = transformers.SiglipVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7
  )
  return transformers.LlavaForConditionalGeneration(
      transformers.LlavaConfig(
          vision_config=vision,
          text_config=_text(family="qwen2"),
          image_token_id=IMAGE_TOKEN,
          vision_feature_layer=-1,
          vision_feature_select_strategy="full",
          image_seq_length=16,
      )
  )


def _internvl():
  vision = transformers.InternVLVisionConfig(
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=[28, 28],
      patch_size=[7, 7],
  )
  return transformers.InternVLForConditionalGeneration(
      transformers.InternVLConfig(
          vision_config=vision,
          text_config=_text(family="qwen2"),
          image_token_id=IMAGE_TOKEN,
          downsample_ratio=0.5,
          image_seq_length=4,
      )
  )


BUILDERS = {"llava_clip": _llava_clip, "llava_siglip": _llava_siglip, "internvl": _internvl}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  torch.manual_seed(0)
  out = {}
  for name, build in BUILDERS.items():
    model = build().eval()
    with torch.no_grad():
      for pname, p in model.named_parameters():
        if "norm" in pname or pname.endswith("bias") or "lambda" in pname:
          p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp(name)
    model.save_pretrained(d)
    out[name] = (model, str(d))
  return out


def _batch(tokens_per_image, rng):
  """Row 0: two images (text between them); row 1: one image and an unused slot."""
  n = tokens_per_image
  row0 = [1, 5] + [IMAGE_TOKEN] * n + [6, 7] + [IMAGE_TOKEN] * n + [8, 9, 10]
  row1 = [1, 11, 12, 13] + [IMAGE_TOKEN] * n + [14, 15, 16] + [17] * n
  tokens = np.asarray([row0, row1])
  images = rng.uniform(-1, 1, (2, 2, 28, 28, 3)).astype(np.float32)
  image_mask = np.asarray([[True, True], [True, False]])
  return tokens, images, image_mask


@pytest.mark.parametrize("name", list(BUILDERS))
def test_llvm_logits_match_transformers(name, hf_dirs):
  hf_model, path = hf_dirs[name]
  model, params = convert.from_hf(path)
  rng = np.random.RandomState(0)
  tokens, images, image_mask = _batch(model.config.tokens_per_image, rng)
  ours, _ = jax.jit(model.apply)({"params": params}, jnp.asarray(tokens), jnp.asarray(images), jnp.asarray(image_mask))
  used = images[image_mask]  # (3, H, W, C) in row-major slot order, as HF consumes them
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(used.transpose(0, 3, 1, 2))).logits.numpy()
  diff = np.abs(np.asarray(ours) - ref).max()
  print(f"{name} logits max|diff| vs transformers: {diff:.2e}")
  assert diff <= TOL


@pytest.mark.parametrize("name", ["llava_clip", "internvl"])
def test_llvm_prefill_decode_equals_full(name, hf_dirs):
  model, params = convert.from_hf(hf_dirs[name][1])
  tokens, images, image_mask = _batch(model.config.tokens_per_image, np.random.RandomState(1))
  tokens, images, image_mask = map(jnp.asarray, (tokens, images, image_mask))
  full, _ = model.apply({"params": params}, tokens, images, image_mask)
  cut = tokens.shape[1] - 3
  logits, cache = prefill(model, params, tokens[:, :cut], tokens.shape[1], images, image_mask)
  steps = [logits]
  for t in range(cut, tokens.shape[1]):
    logits, cache = decode_step(model, params, tokens[:, t : t + 1], cache)
    steps.append(logits)
  assert np.abs(np.concatenate(steps, axis=1) - np.asarray(full)).max() <= 1e-5


@pytest.mark.parametrize("name", list(BUILDERS))
def test_llvm_to_hf_round_trip(name, hf_dirs, tmp_path):
  hf_model, path = hf_dirs[name]
  model, params = convert.from_hf(path)
  out = convert.to_hf(model.config, params, str(tmp_path / name))
  reloaded = type(hf_model).from_pretrained(out).eval()
  tokens, images, image_mask = _batch(model.config.tokens_per_image, np.random.RandomState(2))
  ours, _ = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(images), jnp.asarray(image_mask))
  with torch.no_grad():
    ref = reloaded(
        input_ids=torch.tensor(tokens), pixel_values=torch.tensor(images[image_mask].transpose(0, 3, 1, 2))
    ).logits.numpy()
  diff = np.abs(np.asarray(ours) - ref).max()
  print(f"{name} to_hf round trip max|diff|: {diff:.2e}")
  assert diff <= TOL


def test_placeholder_count_mismatch_is_named(hf_dirs):
  model, params = convert.from_hf(hf_dirs["llava_clip"][1])
  tokens, images, image_mask = _batch(model.config.tokens_per_image, np.random.RandomState(0))
  tokens[1, 4] = 20  # one image token of row 1 lost
  with pytest.raises(ValueError, match=r"row 1: 15 image tokens for 1 image"):
    model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(images), jnp.asarray(image_mask))
