"""DeepStack: high-resolution visual tokens stacked into layers instead of the context, following
the official code (MengLcool/DeepStack-VL: llava/model/deepstack_arch.py, language_model/custom_llama.py,
multimodal_encoder/clip_encoder.py).

DeepStack-L. The global low-resolution view is spliced at the image positions as usual. The
high-resolution crops (`hires_images` (B, N, g_h*g_w, S, S, C), row-major, each the size of the
global view) go through the same vision tower and projector, are laid out as one (g_h*P, g_w*P) map
of projected tokens and regrouped into G = g_h*g_w groups of P*P tokens (`regroup`); group k is
added to the hidden states at the image positions before decoder layer `start + k*interval`. No
parameters, no extra context; the injection touches prompt positions only, so it happens at
prefill and decode steps use the ordinary KV cache.

DeepStack-V. As in the official code, the crops run through ViT layers 0..vit_start-1 like the global
view; their hidden states at vit_start (`DeepStackConfig.crop_layer`; `vit_crop_layer` may pick an
earlier one, 0 = the patch embeddings) are regrouped the same way and added to the global view's
non-CLS hidden states before ViT layers vit_start + k.

Per-image grids (data.deepstack_grid_mode='aspect'): each image's crops may come from another grid
(a, b) with a*b = G (`candidate_grids`), carried as `hires_grid` (B, N, 2); the regrouping then uses
each image's own grid (`regroup_per_image`). Without `hires_grid` every image uses num_crops.

Shapes: `LLVM` turns the groups into `layer_residuals` (G, B, T, D), zero outside image positions,
which `Decoder.__call__` adds before `DeepStackConfig.llm_layers`; the ViT gets (G, B*N, P*P, Dv).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax.models import hooks
from llvm_jax.models.config import LLVMConfig

Array = jax.Array


def regroup(crops: Array, grid: tuple[int, int], sampling: str) -> Array:
  """(..., g_h*g_w, P*P, C) row-major crops of row-major P x P tokens -> (..., g_h*g_w, P*P, C) groups.

  The crops form one (g_h*P, g_w*P) map, map[r*P + a, c*P + b] = crops[r*g_w + c, a*P + b];
  '2d': group i*g_w + j = map[i::g_h, j::g_w] (each group a dilated P x P view of the whole image,
  aligned with the global tokens); '1d': group k = map.flatten()[k::g_h*g_w]; 'grid': group k = crop k.
  """
  g_h, g_w = grid
  *lead, g, t, c = crops.shape
  p = math.isqrt(t)
  if g != g_h * g_w or p * p != t:
    raise ValueError(f"regroup: crops {crops.shape} are not g_h*g_w={g_h * g_w} crops of a square token grid")
  if sampling == "grid":
    return crops
  n = len(lead)
  lead_axes = tuple(range(n))
  # (..., g_h, g_w, P, P, C) -> (..., g_h, P, g_w, P, C): the map, row-major.
  the_map = crops.reshape(*lead, g_h, g_w, p, p, c).transpose(*lead_axes, n, n + 2, n + 1, n + 3, n + 4)
  if sampling == "2d":
    # Map row a*g_h + i, column b*g_w + j -> group (i, j), token (a, b).
    split = the_map.reshape(*lead, p, g_h, p, g_w, c)
    return split.transpose(*lead_axes, n + 1, n + 3, n, n + 2, n + 4).reshape(*lead, g, t, c)
  if sampling == "1d":
    # Flat index q*G + k -> group k, token q.
    return jnp.swapaxes(the_map.reshape(*lead, t, g, c), -3, -2)
  raise ValueError(f"unknown deepstack sampling {sampling!r}")


def candidate_grids(grid: tuple[int, int]) -> tuple[tuple[int, int], ...]:
  """The grids (a, b) with a*b = g_h*g_w, the fixed `grid` first, then by a."""
  g = grid[0] * grid[1]
  others = tuple((a, g // a) for a in range(1, g + 1) if g % a == 0 and (a, g // a) != tuple(grid))
  return (tuple(grid),) + others


def regroup_per_image(crops: Array, grid: tuple[int, int], sampling: str, grids: Array | None) -> Array:
  """`regroup` with each image's own crop grid: crops (..., G, P*P, C), grids int (..., 2) or None.

  None: every image uses `grid` (exactly `regroup`). Otherwise each candidate grid's regrouping is
  computed (G is small) and each image takes the one its grid names; a grid that is no candidate
  (e.g. an unused image slot's zeros) falls back to `grid`. Static shapes, jit-friendly.
  """
  out = regroup(crops, grid, sampling)
  if grids is None or sampling == "grid":
    return out
  if grids.shape != crops.shape[:-3] + (2,):
    raise ValueError(f"deepstack: hires_grid {grids.shape} does not match the crops {crops.shape} (want (..., 2))")
  for cand in candidate_grids(grid)[1:]:
    match = jnp.all(grids == jnp.asarray(cand, grids.dtype), axis=-1)[..., None, None, None]
    out = jnp.where(match, regroup(crops, cand, sampling), out)
  return out


def token_layout(config: LLVMConfig) -> tuple[int, int]:
  """(leading, side): a projected image is `leading` non-spatial tokens (a kept CLS) followed by a
  row-major side x side token grid; raises for layouts with no grid to regroup."""
  vision, projector = config.vision, config.projector
  if projector.kind == "pixel_shuffle_mlp":
    return 0, vision.grid // projector.shuffle_factor
  if not vision.has_cls and vision.feature_select == "default":
    raise ValueError(
        "deepstack: feature_select='default' on a tower without CLS (SigLIP) drops a patch, so the "
        "tokens form no square grid to regroup; use feature_select='full'"
    )
  return int(vision.has_cls and vision.feature_select == "full"), vision.grid


def regroup_tokens(features: Array, config: LLVMConfig, grids: Array | None = None) -> Array:
  """(..., G, T, D) projected crop tokens -> (..., G, T, D) groups aligned with the global view's
  T tokens; a kept CLS position gets a zero residual (it has no place in the spatial map).
  `grids` (..., 2): each image's crop grid (None: num_crops for all)."""
  leading, _ = token_layout(config)
  ds = config.deepstack
  groups = regroup_per_image(features[..., leading:, :], ds.num_crops, ds.sampling, grids)
  pad = [(0, 0)] * (groups.ndim - 2) + [(leading, 0), (0, 0)]
  return jnp.pad(groups, pad)


def vit_residuals(tower: Any, crops: Array, config: LLVMConfig, grids: Array | None = None) -> Array:
  """DeepStack-V: crops (M, G, S, S, C) through the bound `tower`'s embedding and its first
  `crop_layer` layers -> (G, M, grid*grid, Dv) regrouped patch states, CLS dropped; `grids` (M, 2):
  each image's crop grid (None: num_crops for all)."""
  m, g = crops.shape[:2]
  hidden = tower.embed(crops.reshape((m * g,) + crops.shape[2:]))
  for layer in tower.layers[: config.deepstack.crop_layer]:
    hidden = layer(hidden)
  patches = hidden[:, int(config.vision.has_cls) :]
  patches = patches.reshape((m, g) + patches.shape[1:])
  ds = config.deepstack
  return jnp.moveaxis(regroup_per_image(patches, ds.num_crops, ds.sampling, grids), 1, 0)


def check_hires_images(
    config: LLVMConfig, images: Array, hires_images: Array | None, initializing: bool, hires_grid: Array | None = None
) -> bool:
  """Whether DeepStack runs on this call; raises on missing or misshaped crops (or crop grids).

  Crops may be left out only while initialising (DeepStack adds no parameters), so a caller that
  forgets them fails instead of silently running the base model.
  """
  ds = config.deepstack
  if ds is None:
    if hires_images is not None or hires_grid is not None:
      raise ValueError(
          "hires_images / hires_grid were given but the model has no deepstack block (config.model.deepstack)"
      )
    return False
  if hires_grid is not None and (hires_images is None or hires_grid.shape != images.shape[:2] + (2,)):
    raise ValueError(
        f"hires_grid {hires_grid.shape} must come with hires_images and be (B, N, 2) = {images.shape[:2] + (2,)}"
    )
  if hires_images is None:
    if initializing:
      return False
    raise ValueError("the model has a deepstack block: pass hires_images (B, N, g_h*g_w, S, S, C) with the images")
  expected = images.shape[:2] + (ds.num_groups,) + images.shape[2:]
  if hires_images.shape != expected:
    raise ValueError(
        f"hires_images shape {hires_images.shape} != {expected} (images {images.shape}, "
        f"deepstack.num_crops={ds.num_crops})"
    )
  return True


class Injection(hooks.Technique):
  """DeepStack-L's hook: group k of the call's `layer_residuals` is added before its layer.

  Active in every model (a call without residuals passes through); the layer's group index is a
  per-layer input (-1: none), so injecting layers need no stage of their own in a scanned stack.
  """

  name = "deepstack"

  def enabled(self, config: Any) -> bool:
    return True

  def layer_inputs(self, config: Any, params: Any, num_vision: int, residual_layers: tuple[int, ...]) -> np.ndarray:
    index = np.full((config.num_layers,), -1, np.int32)
    for group, layer in enumerate(residual_layers):
      index[layer] = group
    return index

  def wrap(self, fn: hooks.LayerFn, config: Any, signature: Any, inputs: Any) -> hooks.LayerFn:
    def injected(x: Array, ctx: hooks.LayerContext, layer_cache: Any) -> tuple[Array, Any]:
      residuals = ctx.layer_residuals
      # A static index (unrolled stack) skips the layers without a group outright.
      if residuals is not None and not (isinstance(inputs, (int, np.integer)) and inputs < 0):
        group = jax.lax.dynamic_index_in_dim(residuals, jnp.maximum(inputs, 0), keepdims=False)
        x = x + jnp.where(inputs >= 0, group, 0).astype(x.dtype)
      return fn(x, ctx, layer_cache)

    return injected


INJECTION = Injection()
