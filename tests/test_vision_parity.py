"""Vision towers and projectors against transformers (fp32, tiny random models, no downloads).

Every HF parameter (biases, CLS / position embeddings, layer scales, norms included) is perturbed
after construction, so a mapping error cannot hide behind a zero / one / constant initialisation.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llvm_jax import tree_utils
from llvm_jax.convert import core
from llvm_jax.convert.core import WeightMismatchError
from llvm_jax.convert.vision_table import (
    projector_config_from_hf,
    projector_table,
    vision_config_from_hf,
    vision_config_to_hf,
    vision_table,
)
from llvm_jax.models import attention
from llvm_jax.models.config import LLVMConfig, ProjectorConfig, VisionConfig
from llvm_jax.models.projector import Projector, pixel_shuffle
from llvm_jax.models.vision import VisionTower

TOL = 1e-4
IMAGE, PATCH, WIDTH, TEXT = 32, 8, 32, 48  # 4x4 patch grid


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
  with torch.no_grad():
    for _, p in model.named_parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _state(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def _pixels(n: int = 2, seed: int = 0, size: int = IMAGE) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def _torch_pixels(pixels: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW


def _vision_kwargs(depth: int = 3) -> dict:
  return dict(
      hidden_size=WIDTH,
      intermediate_size=64,
      num_hidden_layers=depth,
      num_attention_heads=4,
      image_size=IMAGE,
      patch_size=PATCH,
  )


def _text_config():
  return transformers.Qwen2Config(
      vocab_size=64,
      hidden_size=TEXT,
      intermediate_size=64,
      num_hidden_layers=1,
      num_attention_heads=4,
      num_key_value_heads=2,
  )


def _expected_shapes(module: nn.Module, example: np.ndarray) -> dict[str, tuple[int, ...]]:
  abstract = jax.eval_shape(module.init, jax.random.key(0), jnp.asarray(example))
  return {k: tuple(v.shape) for k, v in tree_utils.flatten(nn.unbox(abstract["params"])).items()}


class Case:
  """One HF reference model, converted once: our tower (+ projector), params and jitted apply."""

  def __init__(self, hf_model, vision_cfg, vision_prefix, projector_cfg=None, projector_prefix=None):
    self.hf = hf_model
    self.state = _state(hf_model)
    self.vision_cfg, self.projector_cfg = vision_cfg, projector_cfg
    self.vision_table = vision_table(vision_cfg, prefix=vision_prefix)
    self.tower = VisionTower(vision_cfg)
    self.vision_params = core.hf_to_ours(
        self.state,
        self._subset_table(vision_prefix, self.vision_table),
        _expected_shapes(self.tower, _pixels(1, size=vision_cfg.image_size)),
        context="vision",
    )
    tower_fn = jax.jit(lambda p, x: self.tower.apply({"params": p}, x))
    if projector_cfg is None:
      self.forward = lambda x: tower_fn(self.vision_params, x)
      return
    self.projector_table = projector_table(projector_cfg, prefix=projector_prefix)
    self.projector = Projector(projector_cfg, out_dim=TEXT)
    feats = np.zeros((1, vision_cfg.num_features, vision_cfg.width), np.float32)
    self.projector_params = core.hf_to_ours(
        self.state,
        self._subset_table(projector_prefix, self.projector_table),
        _expected_shapes(self.projector, feats),
        context="projector",
    )

    @jax.jit
    def forward(vp, pp, x):
      return self.projector.apply({"params": pp}, self.tower.apply({"params": vp}, x))

    self.forward = lambda x: forward(self.vision_params, self.projector_params, x)

  def _subset_table(self, prefix: str, table: core.Table) -> core.Table:
    """`table` plus 'ignore everything outside `prefix`' (the other parts of a multimodal model)."""
    if not prefix:
      return table
    return core.Table(table.rules, table.ignore + (f"(?!{re.escape(prefix)})",))

  def subset_state(self, prefix: str) -> dict[str, np.ndarray]:
    return {k: v for k, v in self.state.items() if k.startswith(prefix)}


# ---------------------------------------------------------------------------------------------
# Fixtures: one HF model and one compiled forward each.


@pytest.fixture(scope="module")
def clip_case():
  torch.manual_seed(0)
  hf = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_vision_kwargs(depth=3))))
  cfg = vision_config_from_hf(hf.config, feature_layer=-2, feature_select="default")
  return Case(hf, cfg, vision_prefix="")


@pytest.fixture(scope="module")
def siglip_case():
  """Also an image size that is not a multiple of the patch (as SigLIP so400m: 384 px, patch 14)."""
  torch.manual_seed(1)
  config = transformers.SiglipVisionConfig(**{**_vision_kwargs(depth=2), "image_size": IMAGE + 3})
  hf = _perturb(transformers.SiglipVisionModel(config))
  cfg = vision_config_from_hf(hf.config, feature_layer=-1, feature_select="full")
  return Case(hf, cfg, vision_prefix="")


def _llava_case(seed: int, vision_config_class: type) -> Case:
  """A LLaVA whose projector reads the penultimate vision layer with select 'default'."""
  torch.manual_seed(seed)
  config = transformers.LlavaConfig(
      vision_config=vision_config_class(**_vision_kwargs(depth=3)),
      text_config=_text_config(),
      image_token_id=63,
      vision_feature_layer=-2,
      vision_feature_select_strategy="default",
  )
  hf = _perturb(transformers.LlavaForConditionalGeneration(config))
  cfg = vision_config_from_hf(config.vision_config, config.vision_feature_layer, config.vision_feature_select_strategy)
  return Case(hf, cfg, "model.vision_tower.", projector_config_from_hf(config), "model.multi_modal_projector.")


@pytest.fixture(scope="module")
def llava_case():
  """LLaVA with a CLIP tower: penultimate layer, CLS dropped, mlp2x_gelu projector."""
  return _llava_case(2, transformers.CLIPVisionConfig)


@pytest.fixture(scope="module")
def llava_siglip_case():
  """LLaVA with a SigLIP tower and select 'default', which drops the first *patch* token in HF."""
  return _llava_case(3, transformers.SiglipVisionConfig)


def _internvl(seed: int, **vision_overrides):
  torch.manual_seed(seed)
  vision = transformers.InternVLVisionConfig(
      **{**_vision_kwargs(depth=2), "image_size": [IMAGE, IMAGE], "patch_size": [PATCH, PATCH]}, **vision_overrides
  )
  config = transformers.InternVLConfig(vision_config=vision, text_config=_text_config(), image_token_id=63)
  hf = _perturb(transformers.InternVLForConditionalGeneration(config))
  cfg = vision_config_from_hf(config.vision_config, config.vision_feature_layer, config.vision_feature_select_strategy)
  return Case(hf, cfg, "model.vision_tower.", projector_config_from_hf(config), "model.multi_modal_projector.")


@pytest.fixture(scope="module")
def internvl_case():
  """InternViT-300M-like: LayerNorm, no qkv bias, no qk-norm, mean pooling (no final norm)."""
  return _internvl(4)


@pytest.fixture(scope="module")
def internvl_6b_case():
  """InternViT-6B-like: RMSNorm, qkv bias, qk-norm, final LayerNorm (use_mean_pooling=False)."""
  return _internvl(
      5,
      norm_type="rms_norm",
      attention_bias=True,
      use_qk_norm=True,
      use_mean_pooling=False,
      hidden_act="gelu_pytorch_tanh",
  )


ALL_CASES = ["clip_case", "siglip_case", "llava_case", "llava_siglip_case", "internvl_case", "internvl_6b_case"]


def _report(name: str, ours, ref) -> float:
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, f"{name}: shape {ours.shape} vs HF {ref.shape}"
  diff = float(np.max(np.abs(ours - ref)))
  print(f"{name}: max abs diff {diff:.3g} (max |ref| {np.max(np.abs(ref)):.3g}, shape {ref.shape})")
  assert diff <= TOL, f"{name}: max abs diff {diff}"
  return diff


# ---------------------------------------------------------------------------------------------
# Parity.


def test_clip_vision_model_parity(clip_case):
  pixels = _pixels()
  with torch.no_grad():
    out = clip_case.hf(_torch_pixels(pixels), output_hidden_states=True)
  ref = out.hidden_states[-2][:, 1:]
  assert clip_case.vision_cfg.num_layers_used == 2 and clip_case.vision_cfg.num_features == 16
  _report("CLIPVisionModel layer -2 default", clip_case.forward(pixels), ref)


@pytest.mark.parametrize("impl, block", [("blocked", 8), ("splash", 128)])
def test_vision_attention_kernels_match_hf(clip_case, impl, block, monkeypatch):
  """The tower with the memory-efficient kernels at 17 tokens: blocked in tiles of 8 (padded to 24),
  splash (its Pallas kernel in the interpreter: no TPU here) padded to one 128-token tile, the padding
  keys masked by segment ids."""
  if impl == "splash":
    monkeypatch.setattr(attention, "splash_attention", functools.partial(attention.splash_attention, interpret=True))
  cfg = dataclasses.replace(clip_case.vision_cfg, attention_impl=impl, attention_block_size=block)
  pixels = _pixels()
  out = jax.jit(lambda p, x: VisionTower(cfg).apply({"params": p}, x))(clip_case.vision_params, pixels)
  with torch.no_grad():
    ref = clip_case.hf(_torch_pixels(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
  _report(f"CLIP tower, {impl} attention", out, ref)


def test_vision_attention_impl_is_checked():
  with pytest.raises(ValueError, match="vision.attention_impl must be one of"):
    VisionConfig(attention_impl="flash")


def test_siglip_vision_model_parity(siglip_case):
  pixels = _pixels(size=IMAGE + 3)
  assert siglip_case.vision_cfg.grid == 4
  with torch.no_grad():
    out = siglip_case.hf(_torch_pixels(pixels), output_hidden_states=True)
  # LLaVA takes hidden_states[-1], the encoder output *before* post_layernorm.
  assert not torch.allclose(out.hidden_states[-1], out.last_hidden_state)
  _report("SiglipVisionModel layer -1 full", siglip_case.forward(pixels), out.hidden_states[-1])


@pytest.mark.parametrize("case_name", ["llava_case", "llava_siglip_case"])
def test_llava_image_features_parity(case_name, request):
  case = request.getfixturevalue(case_name)
  pixels = _pixels()
  with torch.no_grad():
    ref = case.hf.model.get_image_features(pixel_values=_torch_pixels(pixels)).pooler_output
  ref = torch.stack(list(ref))
  tokens = LLVMConfig(vision=case.vision_cfg, projector=case.projector_cfg).tokens_per_image
  assert ref.shape[1] == tokens == case.vision_cfg.num_features
  _report(f"Llava get_image_features ({case.vision_cfg.kind}, tower + projector)", case.forward(pixels), ref)


@pytest.mark.parametrize("case_name", ["internvl_case", "internvl_6b_case"])
def test_internvl_image_features_parity(case_name, request):
  case = request.getfixturevalue(case_name)
  pixels = _pixels()
  with torch.no_grad():
    ref = case.hf.model.get_image_features(pixel_values=_torch_pixels(pixels)).pooler_output
  tokens = LLVMConfig(vision=case.vision_cfg, projector=case.projector_cfg).tokens_per_image
  assert ref.shape[1] == tokens == 4
  _report(f"InternVL get_image_features ({case_name}, pixel shuffle + projector)", case.forward(pixels), ref)


@pytest.mark.parametrize("ratio", [0.5, 0.25])
def test_pixel_shuffle_matches_hf(ratio):
  x = torch.randn(2, 8, 8, 6)
  ref = transformers.InternVLModel.pixel_shuffle(None, x, scale_factor=ratio)
  ref = ref.reshape(2, -1, ref.shape[-1]).numpy()
  ours = np.asarray(pixel_shuffle(jnp.asarray(x.reshape(2, 64, 6).numpy()), int(round(1 / ratio))))
  np.testing.assert_array_equal(ours, ref)


def test_pixel_shuffle_rejects_cls():
  with pytest.raises(ValueError, match="square"):
    pixel_shuffle(jnp.zeros((1, 17, 4)), 2)


# ---------------------------------------------------------------------------------------------
# Tables: round trips, ignored keys, mismatch reporting.


@pytest.mark.parametrize("case_name", ALL_CASES)
def test_round_trip_reproduces_state(case_name, request):
  case = request.getfixturevalue(case_name)
  parts = [(case.vision_table, case.vision_params, "model.vision_tower." if case.projector_cfg else "")]
  if case.projector_cfg is not None:
    parts.append((case.projector_table, case.projector_params, "model.multi_modal_projector."))
  for table, params, prefix in parts:
    back = core.ours_to_hf(params, table)
    ignore = [re.compile(p) for p in table.ignore]
    kept = {k: v for k, v in case.subset_state(prefix).items() if not any(p.match(k) for p in ignore)}
    assert sorted(back) == sorted(kept)
    for k in kept:
      assert back[k].shape == kept[k].shape and back[k].dtype == kept[k].dtype, k
      np.testing.assert_array_equal(back[k], kept[k], err_msg=k)


def _ignored(case, prefix):
  ignore = [re.compile(p) for p in case.vision_table.ignore]
  return sorted(k[len(prefix) :] for k in case.subset_state(prefix) if any(p.match(k) for p in ignore))


def test_ignored_keys_are_the_unused_ones(clip_case, siglip_case, llava_siglip_case, internvl_case, internvl_6b_case):
  assert _ignored(clip_case, "") == sorted(
      [k for k in clip_case.state if k.startswith("encoder.layers.2.")]
      + ["post_layernorm.bias", "post_layernorm.weight"]
  )
  assert all(k.startswith(("post_layernorm.", "head.")) for k in _ignored(siglip_case, ""))
  assert "head.probe" in _ignored(siglip_case, "")
  assert any(k.startswith("encoder.layers.2.") for k in _ignored(llava_siglip_case, "model.vision_tower."))
  assert _ignored(internvl_case, "model.vision_tower.") == []
  assert _ignored(internvl_6b_case, "model.vision_tower.") == []  # final layernorm is used at layer -1
  assert "post_norm" in internvl_6b_case.vision_params


def test_mismatch_names_all_problems(llava_case):
  table = llava_case.vision_table
  state = llava_case.subset_state("model.vision_tower.")
  state.pop("model.vision_tower.encoder.layers.1.mlp.fc2.bias")
  state["model.vision_tower.encoder.extra.weight"] = np.zeros(3, np.float32)
  state["model.vision_tower.embeddings.position_embedding.weight"] = np.zeros((5, WIDTH), np.float32)
  with pytest.raises(WeightMismatchError) as err:
    core.hf_to_ours(state, table, _expected_shapes(llava_case.tower, _pixels(1)))
  msg = str(err.value)
  print(msg)
  assert "encoder.layers.1.mlp.fc2.bias" in msg
  assert "encoder.extra.weight" in msg
  assert "pos_embed: got (5, 32), model expects (17, 32)" in msg
  assert len(err.value.missing) == 1 and len(err.value.unexpected) == 1 and len(err.value.misshaped) == 1


def test_saved_checkpoint_prefixes(tmp_path, llava_case):
  """save_pretrained writes `vision_tower.` / `multi_modal_projector.` (no `model.`), transformers 5.23."""
  llava_case.hf.save_pretrained(tmp_path)
  saved = core.read_safetensors_dir(str(tmp_path))
  table = vision_table(llava_case.vision_cfg, prefix="vision_tower.")
  table += projector_table(llava_case.projector_cfg, prefix="multi_modal_projector.")
  hf_keys = {r.hf for r in table.rules}
  assert hf_keys <= set(saved)
  assert all(
      k.startswith(("vision_tower.", "multi_modal_projector.", "model.language_model.", "language_model.", "lm_head."))
      for k in saved
  ), sorted(saved)[:5]


# ---------------------------------------------------------------------------------------------
# Configs, logical names, errors.


@pytest.mark.parametrize("case_name", ["clip_case", "siglip_case", "llava_siglip_case", "internvl_6b_case"])
def test_vision_config_round_trip(case_name, request):
  case = request.getfixturevalue(case_name)
  hf_vision = vision_config_to_hf(case.vision_cfg)
  back = vision_config_from_hf(hf_vision, case.vision_cfg.feature_layer, case.vision_cfg.feature_select)
  assert back == case.vision_cfg
  assert type(hf_vision) is type(getattr(case.hf.config, "vision_config", case.hf.config))


def test_exported_tower_loads_in_transformers(clip_case):
  """Our export + vision_config_to_hf rebuilds an HF tower with the same selected features."""
  hf = transformers.CLIPVisionModel(vision_config_to_hf(clip_case.vision_cfg)).eval()
  missing, unexpected = [], []
  result = hf.load_state_dict(
      {k: torch.from_numpy(v) for k, v in core.ours_to_hf(clip_case.vision_params, clip_case.vision_table).items()},
      strict=False,
  )
  missing, unexpected = result.missing_keys, result.unexpected_keys
  assert unexpected == []
  assert all(k.startswith(("encoder.layers.2.", "post_layernorm.")) for k in missing)
  pixels = _pixels()
  with torch.no_grad():
    ref = hf(_torch_pixels(pixels), output_hidden_states=True).hidden_states[-2][:, 1:]
  _report("exported CLIP tower reloaded in transformers", clip_case.forward(pixels), ref)


@pytest.mark.parametrize("kind", ["clip", "siglip", "internvit"])
def test_logical_names_and_bf16(kind):
  extra = (
      dict(qk_norm=True, layer_scale=True, post_norm=True, feature_layer=-1, norm_type="rms_norm")
      if kind == "internvit"
      else {}
  )
  select = "full" if kind == "siglip" else "default"
  cfg = VisionConfig(
      kind=kind,
      image_size=IMAGE,
      patch_size=PATCH,
      width=WIDTH,
      depth=2,
      num_heads=4,
      mlp_dim=64,
      feature_select=select,
      dtype="bfloat16",
      **extra,
  )
  tower = VisionTower(cfg)
  variables = jax.eval_shape(tower.init, jax.random.key(0), jnp.zeros((1, IMAGE, IMAGE, 3)))
  boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert boxed and all(isinstance(b, nn.Partitioned) for b in boxed)
  for b in boxed:
    assert len(b.names) == b.value.ndim and len(set(b.names)) == len(b.names), b.names
  out = jax.eval_shape(tower.apply, variables, jnp.zeros((2, IMAGE, IMAGE, 3)))
  assert out.shape == (2, cfg.num_features, WIDTH) and out.dtype == jnp.bfloat16
  proj = Projector(ProjectorConfig(kind="pixel_shuffle_mlp", dtype="bfloat16"), out_dim=TEXT)
  pv = jax.eval_shape(proj.init, jax.random.key(0), out)
  for b in jax.tree.leaves(pv["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned)):
    assert isinstance(b, nn.Partitioned) and len(b.names) == b.value.ndim
  assert jax.eval_shape(proj.apply, pv, out).shape == (2, 4, TEXT)


def test_wrong_resolution_raises(clip_case):
  with pytest.raises(ValueError, match="not interpolated"):
    clip_case.tower.apply({"params": clip_case.vision_params}, jnp.zeros((1, IMAGE + PATCH, IMAGE + PATCH, 3)))


def test_feature_layer_bounds():
  assert VisionConfig(depth=24, feature_layer=-2).num_layers_used == 23
  assert VisionConfig(depth=24, feature_layer=-25).num_layers_used == 0
  assert VisionConfig(depth=24, feature_layer=24).num_layers_used == 24
  with pytest.raises(ValueError, match="feature_layer"):
    VisionConfig(depth=24, feature_layer=-26)
  with pytest.raises(ValueError, match="InternViT-only"):
    VisionConfig(kind="clip", qk_norm=True)


def test_tokens_per_image_real_sizes():
  assert LLVMConfig(vision=VisionConfig(image_size=336, patch_size=14)).tokens_per_image == 576
  internvl = LLVMConfig(
      vision=VisionConfig(kind="internvit", image_size=448, patch_size=14, feature_layer=-1, layer_scale=True),
      projector=ProjectorConfig(kind="pixel_shuffle_mlp"),
  )
  assert internvl.tokens_per_image == 256
  siglip = VisionConfig(kind="siglip", image_size=384, patch_size=14, depth=27, feature_layer=-1, feature_select="full")
  assert LLVMConfig(vision=siglip).tokens_per_image == 729


def test_hub_clip_model_prefix(tmp_path, clip_case):
  """Hub CLIP files (CLIPModel, and transformers-4 CLIPVisionModel saves) use `vision_model.`."""
  torch.manual_seed(6)
  config = transformers.CLIPConfig(
      vision_config=_vision_kwargs(depth=3),
      text_config=dict(
          hidden_size=WIDTH,
          intermediate_size=64,
          num_hidden_layers=1,
          num_attention_heads=4,
          vocab_size=50,
          max_position_embeddings=16,
      ),
  )
  transformers.CLIPModel(config).save_pretrained(tmp_path)
  saved = core.read_safetensors_dir(str(tmp_path))
  table = vision_table(clip_case.vision_cfg, prefix="vision_model.")
  table = core.Table(table.rules, table.ignore + (r"(?!vision_model\.)",))
  params = core.hf_to_ours(saved, table, _expected_shapes(clip_case.tower, _pixels(1)))
  # transformers maps the same file onto CLIPVisionModel's prefix-free in-memory keys.
  reloaded = _state(transformers.CLIPVisionModel.from_pretrained(tmp_path))
  np.testing.assert_array_equal(params["pos_embed"], reloaded["embeddings.position_embedding.weight"])


def test_internvit_final_norm_only_at_last_layer():
  cfg = VisionConfig(kind="internvit", width=WIDTH, num_heads=4, depth=2, layer_scale=True, post_norm=True)
  assert cfg.feature_layer == -2 and r"layernorm\." in vision_table(cfg).ignore
  last = VisionConfig(
      kind="internvit", width=WIDTH, num_heads=4, depth=2, layer_scale=True, post_norm=True, feature_layer=-1
  )
  assert "layernorm.weight" in {r.hf for r in vision_table(last).rules}
