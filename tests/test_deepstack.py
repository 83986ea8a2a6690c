"""DeepStack: regrouping against index-level references, layer-exact injection (LLM and ViT),
prefill + decode parity, scan/remat, config and the analytic cost."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llvm_jax import config_utils, convert, flops
from llvm_jax.models import deepstack
from llvm_jax.models.config import DeepStackConfig, LLVMConfig, ProjectorConfig
from llvm_jax.models.llvm import LLVM, decode_step, prefill, splice_image_features
from llvm_jax.models.vision import VisionLayer, VisionTower
from tests.model_helpers import LM, run_layer

IMAGE = 4
TOL = 1e-5
# 24 px at patch 8: a 3 x 3 grid, 9 tokens per image (CLIP, CLS dropped), 5 decoder layers so the
# default 2 x 2 crops land before layers 1..4.
_TINY = config_utils.tiny_llvm(vocab_size=64, image_token_id=IMAGE, image_size=24, embed_dim=32, num_layers=5)
# 3 ViT layers, so DeepStack-V has a layer before and two after its start.
BASE = dataclasses.replace(_TINY, vision=dataclasses.replace(_TINY.vision, depth=3))
DS = dataclasses.replace(BASE, deepstack=DeepStackConfig())
T = BASE.tokens_per_image


def _coords_crops(lead: int, grid: tuple[int, int], p: int) -> np.ndarray:
  """(lead, g_h*g_w, p*p, 3) crops whose entries are (batch, map row, map column) of the
  (g_h*p, g_w*p) high-resolution map they come from."""
  g_h, g_w = grid
  crops = np.zeros((lead, g_h * g_w, p * p, 3), np.float32)
  for n in range(lead):
    for r in range(g_h):
      for c in range(g_w):
        for a in range(p):
          for b in range(p):
            crops[n, r * g_w + c, a * p + b] = (n, r * p + a, c * p + b)
  return crops


def _reference_groups(lead: int, grid: tuple[int, int], p: int, sampling: str) -> np.ndarray:
  """The expected (lead, G, p*p, 3) groups, entry by entry from the definition of `deepstack.regroup`."""
  g_h, g_w = grid
  g, width = g_h * g_w, g_w * p
  out = np.zeros((lead, g, p * p, 3), np.float32)
  for n in range(lead):
    for k in range(g):
      for q in range(p * p):
        a, b = divmod(q, p)
        if sampling == "2d":  # group (i, j) = map[i::g_h, j::g_w]
          i, j = divmod(k, g_w)
          row, col = a * g_h + i, b * g_w + j
        elif sampling == "1d":  # group k = flat map[k::G]
          row, col = divmod(q * g + k, width)
        else:  # 'grid': group k = crop k
          r, c = divmod(k, g_w)
          row, col = r * p + a, c * p + b
        out[n, k, q] = (n, row, col)
  return out


@pytest.mark.parametrize("sampling", ["2d", "1d", "grid"])
@pytest.mark.parametrize("grid", [(2, 2), (2, 3)])
def test_regroup_matches_index_reference(sampling, grid):
  p = 3
  crops = _coords_crops(2, grid, p)
  got = np.asarray(deepstack.regroup(jnp.asarray(crops), grid, sampling))
  np.testing.assert_array_equal(got, _reference_groups(2, grid, p, sampling))
  if sampling == "2d":
    # Each group is a P x P view of the whole image: group token (a, b) lies in the global view's
    # patch (a, b), i.e. map row // g_h == a and column // g_w == b.
    a, b = np.divmod(np.arange(p * p), p)
    np.testing.assert_array_equal(got[..., 1] // grid[0], np.broadcast_to(a, got.shape[:-1]))
    np.testing.assert_array_equal(got[..., 2] // grid[1], np.broadcast_to(b, got.shape[:-1]))


def test_token_layout_cls_and_pixel_shuffle():
  grid = (2, 2)
  ds = DeepStackConfig(num_crops=grid)
  # CLIP with the CLS kept ('full'): the CLS position gets a zero residual, the patches are regrouped.
  full = dataclasses.replace(DS, vision=dataclasses.replace(BASE.vision, feature_select="full"), deepstack=ds)
  assert deepstack.token_layout(full) == (1, 3)
  coords = _coords_crops(1, grid, 3)
  with_cls = np.concatenate([np.full((1, 4, 1, 3), 7.0, np.float32), coords], axis=2)
  got = np.asarray(deepstack.regroup_tokens(jnp.asarray(with_cls), full))
  np.testing.assert_array_equal(got[:, :, 0], 0.0)
  np.testing.assert_array_equal(got[:, :, 1:], _reference_groups(1, grid, 3, "2d"))
  # InternVL pixel shuffle: a (grid / 2)^2 row-major grid after the projector.
  vision = dataclasses.replace(BASE.vision, kind="internvit", image_size=32, feature_select="default")
  shuffle = LLVMConfig(BASE.decoder, vision, ProjectorConfig(kind="pixel_shuffle_mlp"), IMAGE, ds)
  assert deepstack.token_layout(shuffle) == (0, 2)
  siglip = dataclasses.replace(BASE.vision, kind="siglip", feature_select="default")
  with pytest.raises(ValueError, match="no square grid"):
    deepstack.token_layout(dataclasses.replace(DS, vision=siglip))


# --- Decoder level: the injection itself. ---------------------------------------------------------

DEC = BASE.decoder
LAYERS = (1, 3)  # two groups, interval 2


@pytest.fixture(scope="module")
def lm_setup():
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 5, DEC.vocab_size)
  tokens = tokens.at[:, 4:8].set(IMAGE)
  params = nn.unbox(jax.jit(LM(DEC).init)(jax.random.key(0), tokens)["params"])
  image = np.asarray(tokens == IMAGE)
  residuals = jax.random.normal(jax.random.key(2), (2,) + tokens.shape + (DEC.embed_dim,))
  residuals = residuals * image[None, :, :, None]  # zero outside image positions, as LLVM builds them
  return tokens, params, residuals, image


def _reference_logits(params, tokens, residuals):
  """The injection written out: group k added before layer LAYERS[k], layer by layer."""
  dec = params["decoder"]
  seg = jnp.ones(tokens.shape, jnp.int32)
  h = dec["embedding"][tokens]
  for i in range(DEC.num_layers):
    if i in LAYERS:
      h = h + residuals[LAYERS.index(i)]
    h = run_layer(DEC, dec[f"layers_{i}"], h, seg)
  h = h / jnp.sqrt(jnp.mean(h * h, -1, keepdims=True) + DEC.norm_eps) * dec["final_norm"]["scale"]
  return h @ dec["lm_head"]["kernel"]


def test_decoder_zero_groups_equal_base_and_one_group_hits_its_layer_only(lm_setup):
  tokens, params, residuals, image = lm_setup
  apply = jax.jit(lambda p, t, r: LM(DEC).apply({"params": p}, t, residuals=r, residual_layers=LAYERS)[0])
  base_logits = apply(params, tokens, jnp.zeros_like(residuals))
  plain = jax.jit(lambda p, t: LM(DEC).apply({"params": p}, t)[0])(params, tokens)
  assert np.abs(np.asarray(base_logits) - np.asarray(plain)).max() == 0.0

  one_group = residuals.at[0].set(0.0)  # only group 1, before layer 3
  logits = apply(params, tokens, one_group)
  assert np.abs(np.asarray(logits) - np.asarray(_reference_logits(params, tokens, one_group))).max() <= TOL
  delta = np.abs(np.asarray(logits) - np.asarray(base_logits)).max(axis=-1)
  assert delta[image].min() > 1e-3  # every image position moved ...
  assert delta[:, :4].max() == 0.0  # ... and no position before the first one (causal)
  both = apply(params, tokens, residuals)
  assert np.abs(np.asarray(both) - np.asarray(_reference_logits(params, tokens, residuals))).max() <= TOL


def test_decoder_scan_and_remat_match_unscanned(lm_setup):
  tokens, params, residuals, _ = lm_setup
  ref = jax.jit(lambda p, t, r: LM(DEC).apply({"params": p}, t, residuals=r, residual_layers=LAYERS)[0])(
      params, tokens, residuals
  )
  scanned = dataclasses.replace(DEC, scan_layers=True, remat_policy="full")
  stacked = dict(params, decoder=convert.stack_layers(params["decoder"], DEC.num_layers))
  got = jax.jit(lambda p, t, r: LM(scanned).apply({"params": p}, t, residuals=r, residual_layers=LAYERS)[0])(
      stacked, tokens, residuals
  )
  assert np.abs(np.asarray(got) - np.asarray(ref)).max() <= TOL
  # Gradients reach the residuals through the scan (a training step updates the crop path).
  loss = lambda cfg, p: lambda r: jnp.sum(
      LM(cfg).apply({"params": p}, tokens, residuals=r, residual_layers=LAYERS)[0] ** 2
  )
  g_ref = jax.jit(jax.grad(loss(DEC, params)))(residuals)
  g_scan = jax.jit(jax.grad(loss(scanned, stacked)))(residuals)
  assert np.abs(np.asarray(g_scan) - np.asarray(g_ref)).max() <= 1e-4 * np.abs(np.asarray(g_ref)).max()


# --- LLVM level: crops through the tower, regrouping, splicing, generation. ------------------------

SEQ = 26


def _llvm_batch(rng):
  """Row 0: two images; row 1: one image in slot 1 (slot 0 unused); row 2: no image."""
  row0 = [1, 5] + [IMAGE] * T + [6] + [IMAGE] * T + [7, 8, 9, 10, 11]
  row1 = [1, 12, 13] + [IMAGE] * T + list(range(14, 14 + SEQ - 3 - T))
  row2 = list(range(20, 20 + SEQ))
  tokens = np.asarray([row0, row1, row2], np.int32)
  images = rng.uniform(-1, 1, (3, 2, 24, 24, 3)).astype(np.float32)
  hires = rng.uniform(-1, 1, (3, 2, 4, 24, 24, 3)).astype(np.float32)
  image_mask = np.asarray([[True, True], [False, True], [False, False]])
  return tuple(map(jnp.asarray, (tokens, images, image_mask, hires)))


@pytest.fixture(scope="module")
def params():
  """One initialisation for every LLVM test (DeepStack has no parameters of its own)."""
  return convert.init_params(LLVM(DS), jax.random.key(3))


@pytest.fixture(scope="module")
def llvm_setup(params):
  batch = _llvm_batch(np.random.RandomState(0))
  full = jax.jit(lambda p, t, i, m, h: LLVM(DS).apply({"params": p}, t, i, m, hires_images=h)[0])(params, *batch)
  return batch, params, full


def test_llvm_matches_manual_injection(llvm_setup):
  (tokens, images, image_mask, hires), params, full = llvm_setup
  model = LLVM(DS)

  def manual(m, tokens, images, image_mask, hires):
    x = splice_image_features(m.decoder.embed(tokens), tokens, m.encode_images(images), image_mask, IMAGE)
    crops = m.encode_images(hires.reshape((3, 8) + hires.shape[3:])).reshape(3, 2, 4, T, -1)
    return x, crops

  x, crops = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=manual))(
      params, tokens, images, image_mask, hires
  )
  x, crops = np.asarray(x), np.asarray(crops)
  # Reference: 2D dilated groups by index (`deepstack.regroup`), placed at the image positions in order of
  # the used slots (row 1's image is in slot 1).
  residuals = np.zeros((4,) + x.shape, np.float32)
  for b in range(3):
    feats = [crops[b, n] for n in range(2) if image_mask[b, n]]
    positions = np.nonzero(np.asarray(tokens[b]) == IMAGE)[0]
    for idx, c in enumerate(feats):
      the_map = c.reshape(2, 2, 3, 3, -1).transpose(0, 2, 1, 3, 4).reshape(6, 6, -1)
      for k in range(4):
        i, j = divmod(k, 2)
        residuals[k, b, positions[idx * T : (idx + 1) * T]] = the_map[i::2, j::2].reshape(T, -1)
  ref = jax.jit(
      lambda p, x, r: model.apply(
          {"params": p},
          x,
          r,
          method=lambda m, x, r: m.decoder(
              x, jnp.ones(x.shape[:2], jnp.int32), layer_residuals=r, residual_layers=(1, 2, 3, 4)
          )[0],
      )
  )(params, jnp.asarray(x), jnp.asarray(residuals))
  assert np.abs(np.asarray(full) - np.asarray(ref)).max() <= TOL


def test_llvm_rows_without_images_untouched(llvm_setup):
  (tokens, images, image_mask, _), params, full = llvm_setup
  base = jax.jit(lambda p, t, i, m: LLVM(BASE).apply({"params": p}, t, i, m)[0])(params, tokens, images, image_mask)
  diff = np.abs(np.asarray(full) - np.asarray(base)).max(axis=(1, 2))
  assert diff[2] <= 1e-6 and min(diff[0], diff[1]) > 1e-3
  # Row 1: positions before its image are untouched too (causal attention).
  assert np.abs(np.asarray(full)[1, :3] - np.asarray(base)[1, :3]).max() <= 1e-6


def test_llvm_prefill_decode_equals_full(llvm_setup):
  # With TroL, Phantom and p-MoD too (pass-2 caches of injected layers): tests/test_sampler.py, all four.
  (tokens, images, image_mask, hires), params, full = llvm_setup
  model = LLVM(DS)
  cut = SEQ - 3  # every image token is in the prompt
  logits, cache = jax.jit(lambda p, t, i, m, h: prefill(model, p, t, SEQ, i, m, hires_images=h))(
      params, tokens[:, :cut], images, image_mask, hires
  )
  step = jax.jit(lambda p, t, c: decode_step(model, p, t, c))
  steps = [logits]
  for t in range(cut, SEQ):
    logits, cache = step(params, tokens[:, t : t + 1], cache)
    steps.append(logits)
  assert np.abs(np.concatenate(steps, axis=1) - np.asarray(full)).max() <= TOL


def test_llvm_hires_images_are_checked(llvm_setup):
  (tokens, images, image_mask, hires), params, _ = llvm_setup
  with pytest.raises(ValueError, match="pass hires_images"):
    LLVM(DS).apply({"params": params}, tokens, images, image_mask)
  with pytest.raises(ValueError, match="no deepstack block"):
    LLVM(BASE).apply({"params": params}, tokens, images, image_mask, hires_images=hires)
  with pytest.raises(ValueError, match="hires_images shape"):
    LLVM(DS).apply({"params": params}, tokens, images, image_mask, hires_images=hires[:, :, :2])


# --- Per-image crop grids (data.deepstack_grid_mode='aspect'). -----------------------------------


def test_regroup_per_image_picks_each_images_grid():
  assert deepstack.candidate_grids((2, 2)) == ((2, 2), (1, 4), (4, 1))
  p = 3
  wide, square = _coords_crops(1, (1, 4), p), _coords_crops(1, (2, 2), p)
  crops = jnp.asarray(np.concatenate([wide, square, square]))
  grids = jnp.asarray([[1, 4], [2, 2], [0, 0]], jnp.int32)  # (0, 0): an unused slot -> the fixed grid
  got = np.asarray(jax.jit(lambda c, g: deepstack.regroup_per_image(c, (2, 2), "2d", g))(crops, grids))
  np.testing.assert_array_equal(got[0], np.asarray(deepstack.regroup(crops[:1], (1, 4), "2d"))[0])
  np.testing.assert_array_equal(got[1:], np.asarray(deepstack.regroup(crops[1:], (2, 2), "2d")))
  np.testing.assert_array_equal(got[:1], _reference_groups(1, (1, 4), p, "2d"))
  fixed = deepstack.regroup_per_image(crops, (2, 2), "2d", None)
  np.testing.assert_array_equal(np.asarray(fixed), np.asarray(deepstack.regroup(crops, (2, 2), "2d")))


def test_llvm_per_image_grid_matches_fixed_grid_models(llvm_setup):
  (tokens, images, image_mask, hires), params, full = llvm_setup
  # Row 0's images were cut 1 x 4, row 1's 2 x 2 (row 2 has none): each row must equal the model
  # whose fixed grid is that row's.
  grids = jnp.asarray([[[1, 4], [1, 4]], [[2, 2], [2, 2]], [[0, 0], [0, 0]]], jnp.int32)
  run = lambda cfg, g: np.asarray(
      jax.jit(lambda p, t, i, m, h, g: LLVM(cfg).apply({"params": p}, t, i, m, hires_images=h, hires_grid=g)[0])(
          params, tokens, images, image_mask, hires, g
      )
  )
  got = run(DS, grids)
  wide = run(dataclasses.replace(DS, deepstack=DeepStackConfig(num_crops=(1, 4))), None)
  np.testing.assert_allclose(got[0], wide[0], atol=TOL, rtol=0)
  np.testing.assert_allclose(got[1:], np.asarray(full)[1:], atol=TOL, rtol=0)
  assert np.abs(wide[0] - np.asarray(full)[0]).max() > 1e-4  # the grid matters
  with pytest.raises(ValueError, match="hires_grid"):
    LLVM(DS).apply({"params": params}, tokens, images, image_mask, hires_images=hires, hires_grid=grids[:, :1])


def test_vit_per_image_grid(params):
  cfg = _vit_cfg(None)  # (1, 2) crops; (2, 1) is the other candidate
  rng = np.random.RandomState(7)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 1, 24, 24, 3)).astype(np.float32))
  hires = jnp.asarray(rng.uniform(-1, 1, (2, 1, 2, 24, 24, 3)).astype(np.float32))
  encode = lambda cfg, g: np.asarray(
      LLVM(cfg).apply({"params": params}, images, hires, g, method=lambda m, i, h, g: m.encode_images(i, h, g))
  )
  got = encode(cfg, jnp.asarray([[[2, 1]], [[1, 2]]], jnp.int32))
  tall = encode(dataclasses.replace(cfg, deepstack=dataclasses.replace(cfg.deepstack, num_crops=(2, 1))), None)
  np.testing.assert_allclose(got[0], tall[0], atol=TOL, rtol=0)
  np.testing.assert_allclose(got[1], encode(cfg, None)[1], atol=TOL, rtol=0)


# --- DeepStack-V. ----------------------------------------------------------------------------------

VIT_GRID = (1, 2)


def _vit_cfg(crop_layer):
  ds = DeepStackConfig(num_crops=VIT_GRID, llm=False, vit_start=1, vit_crop_layer=crop_layer)
  return dataclasses.replace(BASE, deepstack=ds)


@pytest.mark.parametrize("crop_layer", [0, 1])  # 1 = vit_start, the default (None)
def test_vit_injection_adds_to_patches_from_start_layer(params, crop_layer):
  cfg = _vit_cfg(crop_layer)
  base_cfg = dataclasses.replace(cfg, deepstack=None)
  rng = np.random.RandomState(5)
  images = jnp.asarray(rng.uniform(-1, 1, (2, 1, 24, 24, 3)).astype(np.float32))
  hires = jnp.asarray(rng.uniform(-1, 1, (2, 1, 2, 24, 24, 3)).astype(np.float32))
  vparams = {"params": params["vision"]}

  @jax.jit
  def hidden(h):
    encode = lambda m, i, h: m.encode_images(i, h)
    _, state = LLVM(base_cfg if h is None else cfg).apply(
        {"params": params}, images, h, method=encode, capture_intermediates=True, mutable=["intermediates"]
    )
    return [state["intermediates"]["vision"][f"layers_{i}"]["__call__"][-1] for i in range(3)]

  got, base = [list(map(np.asarray, hidden(h))) for h in (hires, None)]
  np.testing.assert_array_equal(got[0], base[0])  # layer 0 runs before vit_start
  # Independent reference: the crops' hidden state `crop_layer`, CLS dropped, 2D-regrouped by index.
  crops = VisionTower(cfg.vision).apply(vparams, hires.reshape(4, 24, 24, 3), method="embed")
  for i in range(crop_layer):
    crops = VisionLayer(cfg.vision).apply({"params": params["vision"][f"layers_{i}"]}, crops)
  crops = np.asarray(crops)[:, 1:].reshape(2, 2, 3, 3, -1)  # (image, crop, a, b, D); map 3 x 6
  the_map = np.concatenate([crops[:, 0], crops[:, 1]], axis=2)
  groups = [the_map[:, :, j::2].reshape(2, 9, -1) for j in range(2)]
  expected_in = base[0].copy()
  expected_in[:, 1:] += groups[0]  # non-CLS tokens only
  expected_1 = VisionLayer(cfg.vision).apply({"params": params["vision"]["layers_1"]}, jnp.asarray(expected_in))
  assert np.abs(got[1] - np.asarray(expected_1)).max() <= TOL
  # Group 1 lands before layer 2, on top of DeepStack's own layer-1 output.
  expected_in = got[1].copy()
  expected_in[:, 1:] += groups[1]
  expected_2 = VisionLayer(cfg.vision).apply({"params": params["vision"]["layers_2"]}, jnp.asarray(expected_in))
  assert np.abs(got[2] - np.asarray(expected_2)).max() <= TOL


def test_vit_crop_layer_default_is_vit_start(params):
  # None (the default) = vit_start, the official path; 0 (the patch embeddings) is a different option.
  assert DeepStackConfig(llm=False, vit_start=1).crop_layer == 1 and _vit_cfg(0).deepstack.crop_layer == 0
  assert DeepStackConfig().crop_layer == 0  # DeepStack-L only: no crop layer is run
  rng = np.random.RandomState(6)
  images = jnp.asarray(rng.uniform(-1, 1, (1, 1, 24, 24, 3)).astype(np.float32))
  hires = jnp.asarray(rng.uniform(-1, 1, (1, 1, 2, 24, 24, 3)).astype(np.float32))
  encode = lambda cfg: np.asarray(
      LLVM(cfg).apply({"params": params}, images, hires, method=lambda m, i, h: m.encode_images(i, h))
  )
  default, official, embeddings = encode(_vit_cfg(None)), encode(_vit_cfg(1)), encode(_vit_cfg(0))
  np.testing.assert_array_equal(default, official)
  assert np.abs(default - embeddings).max() > 1e-4
  with pytest.raises(ValueError, match="vit_crop_layer=2 must be <= deepstack.vit_start=1"):
    DeepStackConfig(llm=False, vit_start=1, vit_crop_layer=2)
  with pytest.raises(ValueError, match="vit_crop_layer=0 is set but vit_start=None"):
    DeepStackConfig(vit_crop_layer=0)


# --- Config and accounting. ------------------------------------------------------------------------


def test_config_round_trip_and_validation():
  cfg = dataclasses.replace(DS, deepstack=DeepStackConfig(num_crops=(1, 3), sampling="1d", start=0, interval=2))
  assert LLVMConfig.from_dict(cfg.to_dict()) == cfg
  values = cfg.to_dict()
  values["deepstack"] = {"num_crops": [1, 2], "interval": 2}
  assert LLVMConfig.from_dict(values).deepstack.llm_layers == (1, 3)
  with pytest.raises(ValueError, match="exceed num_layers=5"):
    dataclasses.replace(BASE, deepstack=DeepStackConfig(start=2))
  with pytest.raises(ValueError, match="exceed the 3 ViT layers"):
    dataclasses.replace(BASE, deepstack=DeepStackConfig(num_crops=(1, 2), llm=False, vit_start=2))
  with pytest.raises(ValueError, match="sampling"):
    DeepStackConfig(sampling="3d")
  with pytest.raises(ValueError, match="unknown config key"):
    LLVMConfig.from_dict(dict(values, deepstack={"num_crop": [2, 2]}))


def test_deepstack_cost_numbers():
  cost = flops.deepstack_cost(DS, text_tokens=10)
  view = flops.vision_forward_flops(DS.vision) + flops.projector_forward_flops(DS)
  assert cost["context_tokens"] == 10 + T and cost["context_tokens_plain_hires"] == 10 + 5 * T
  assert cost["vision_flops_per_image"] == view and cost["vision_flops_ratio"] == 5.0
  assert cost["injection_flops"] == 4 * T * DS.decoder.embed_dim and cost["extra_params"] == 0
  assert cost["llm_flops"] == flops.decoder_forward_flops(DS.decoder, 10 + T, T)
  assert cost["llm_layers"] == (1, 2, 3, 4)
  # DeepStack-V only: the crops cost just the patch embedding (vit_crop_layer 0).
  vit = flops.deepstack_cost(_vit_cfg(0))
  patch = 2 * (8 * 8 * 3) * 48 * 9  # (p*p*C) x width per patch, 3 x 3 patches
  assert vit["vision_flops_per_image_deepstack"] - vit["vision_flops_per_image"] == 2 * patch
  assert vit["vit_layers"] == (1, 2) and vit["llm_layers"] == ()
  # The default (crop layer = vit_start = 1) adds one ViT layer per crop.
  official = flops.deepstack_cost(_vit_cfg(None))
  layer = flops.vision_forward_flops(dataclasses.replace(DS.vision, feature_layer=1)) - flops.vision_forward_flops(
      dataclasses.replace(DS.vision, feature_layer=0)
  )
  assert official["vision_flops_per_image_deepstack"] - vit["vision_flops_per_image_deepstack"] == 2 * layer
