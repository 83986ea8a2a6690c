"""The LLVM: vision tower -> projector -> embeddings spliced at `<image>` tokens -> decoder.

Images arrive as a fixed number of slots per row, `images` (B, N, H, W, C) with `image_mask`
(B, N) marking the used ones. The used slots' projected tokens, in slot order, replace the runs of
`image_token_id` in the row: the k-th image token of a row takes the k-th image feature. Shapes
are static, so any number of images anywhere in a conversation compiles once.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llvm_jax.models import deepstack, techniques
from llvm_jax.models.config import LLVMConfig
from llvm_jax.models.decoder import Cache, Decoder, init_cache
from llvm_jax.models.projector import Projector
from llvm_jax.models.vision import VisionTower

Array = jax.Array


def splice_image_features(
    x: Array, tokens: Array, features: Array, image_mask: Array | None, image_token_id: int
) -> Array:
  """Replaces the image-token positions of x (B, S, D) with features (B, N, T, D) of used slots."""
  b, n, t, d = features.shape
  if image_mask is not None and n > 1:
    # Used slots first, in their original order (stable sort), so a gap in the mask is harmless. One
    # slot needs no reordering (TPUs run this gather as loops: 8 in LLaVA-1.5-7B's prefill).
    order = jnp.argsort(~image_mask.astype(bool), axis=1, stable=True)
    features = jnp.take_along_axis(features, order[:, :, None, None], axis=1)
  flat = features.reshape(b, n * t, d).astype(x.dtype)
  is_image = tokens == image_token_id
  index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, n * t - 1)
  gathered = jnp.take_along_axis(flat, index[..., None], axis=1)
  return jnp.where(is_image[..., None], gathered, x)


def check_image_tokens(
    tokens: Any, image_mask: Any, num_slots: int, tokens_per_image: int, image_token_id: int
) -> None:
  """Raises if a row's image-token count differs from (used slots) x tokens_per_image.

  Runs on concrete (host) arrays only; traced values are skipped (check batches before jit).
  """
  if isinstance(tokens, jax.core.Tracer) or isinstance(image_mask, jax.core.Tracer):
    return
  tokens = np.asarray(tokens)
  used = np.full(tokens.shape[0], num_slots) if image_mask is None else np.asarray(image_mask).sum(axis=1)
  counts = (tokens == image_token_id).sum(axis=1)
  bad = np.nonzero(counts != used * tokens_per_image)[0]
  if bad.size:
    rows = ", ".join(f"row {r}: {counts[r]} image tokens for {used[r]} image(s)" for r in bad[:8])
    raise ValueError(
        f"image placeholders do not match the images ({tokens_per_image} tokens per image "
        f"expected, image_token_id={image_token_id}): {rows}"
    )


class LLVM(nn.Module):
  config: LLVMConfig

  def setup(self):
    cfg = self.config
    self.decoder = Decoder(cfg.decoder)
    if cfg.vision is not None:
      self.vision = VisionTower(cfg.vision)
      self.projector = Projector(cfg.projector, out_dim=cfg.decoder.embed_dim)

  def encode_images(self, images: Array, hires_images: Array | None = None, hires_grid: Array | None = None) -> Array:
    """(B, N, H, W, C) pixels -> (B, N, tokens_per_image, D) projected image tokens.

    With DeepStack-V (deepstack.vit_start set), hires_images (B, N, G, H, W, C) are regrouped (with
    each image's crop grid `hires_grid` (B, N, 2), None = num_crops) into the tower's layers.
    """
    b, n = images.shape[:2]
    pixels = images.reshape((b * n,) + images.shape[2:])
    ds = self.config.deepstack
    if hires_images is not None and ds.vit_start is not None:
      crops = hires_images.reshape((b * n,) + hires_images.shape[2:])
      grids = None if hires_grid is None else hires_grid.reshape((b * n, 2))
      features = self.vision(pixels, deepstack.vit_residuals(self.vision, crops, self.config, grids), ds.vit_start)
    else:
      features = self.vision(pixels)
    tokens = self.projector(features)
    return tokens.reshape((b, n) + tokens.shape[1:])

  def deepstack_residuals(
      self, tokens: Array, hires_images: Array, image_mask: Array | None, like: Array, hires_grid: Array | None = None
  ) -> Array:
    """DeepStack-L: (G, B, T, D) regrouped crop tokens at the image positions (splice's mapping), 0 elsewhere;
    `hires_grid` (B, N, 2): each image's crop grid (None = num_crops)."""
    b, n, g = hires_images.shape[:3]
    crops = self.encode_images(hires_images.reshape((b, n * g) + hires_images.shape[3:]))
    groups = deepstack.regroup_tokens(crops.reshape((b, n, g) + crops.shape[2:]), self.config, hires_grid)
    zeros = jnp.zeros_like(like)
    splice = lambda group: splice_image_features(zeros, tokens, group, image_mask, self.config.image_token_id)
    return nn.with_logical_constraint(jax.vmap(splice, in_axes=2)(groups), (None, "act_batch", "act_len", "act_embed"))

  def __call__(
      self,
      tokens: Array,
      images: Array | None = None,
      image_mask: Array | None = None,
      segment_ids: Array | None = None,
      positions: Array | None = None,
      cache: Cache | None = None,
      decode: bool = False,
      hires_images: Array | None = None,
      hires_grid: Array | None = None,
  ) -> tuple[Array, Cache | None]:
    """Logits (B, T, V) for tokens (B, T); with a cache, also the updated cache (see decoder.py).

    `decode` (static) marks a decode step rather than a prefill (TroL's 'official' decoding needs it).
    `hires_images` (B, N, g_h*g_w, H, W, C): DeepStack's high-resolution crops of each image slot.
    `hires_grid` (B, N, 2) int: each slot's crop grid (a, b), a*b = g_h*g_w (data.deepstack_grid_mode
    'aspect'); None = deepstack.num_crops for every slot.
    """
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    x = self.decoder.embed(tokens)
    vision_mask, num_vision = None, 0
    residuals = None
    if images is None and (hires_images is not None or hires_grid is not None):
      raise ValueError("hires_images / hires_grid were given without images")
    if images is not None:
      if cfg.vision is None:
        raise ValueError("images were given but the model has no vision tower (config.model.vision is None)")
      check_image_tokens(tokens, image_mask, images.shape[1], cfg.tokens_per_image, cfg.image_token_id)
      use_deepstack = deepstack.check_hires_images(cfg, images, hires_images, self.is_initializing(), hires_grid)
      hires = hires_images if use_deepstack else None
      grid = hires_grid if use_deepstack else None
      x = splice_image_features(x, tokens, self.encode_images(images, hires, grid), image_mask, cfg.image_token_id)
      if use_deepstack and cfg.deepstack.llm:
        residuals = self.deepstack_residuals(tokens, hires_images, image_mask, x, grid)
      # The vision tokens are p-MoD's routing targets; the image slots give their static count per row.
      vision_mask, num_vision = tokens == cfg.image_token_id, vision_slots(images, tokens, cfg)
    return self.decoder(
        x,
        segment_ids,
        positions,
        cache,
        decode,
        vision_mask=vision_mask,
        num_vision=num_vision,
        layer_residuals=residuals,
        residual_layers=cfg.deepstack.llm_layers if residuals is not None else (),
    )


def vision_slots(images: Array, tokens: Array, config: LLVMConfig) -> int:
  """The static number of vision tokens a row can hold: its image slots' tokens, but never more than
  the row's length (packed rows have more image slots than room: 3 slots of 64 tokens in 96)."""
  return min(images.shape[1] * config.tokens_per_image, tokens.shape[1])


def check_batch(config: LLVMConfig, batch: dict[str, Any]) -> None:
  """The decoder's host-side input checks (each active technique's `check_call`, e.g. p-MoD's kept
  length) on a concrete host batch: inside a jitted step the inputs are traced and those checks
  cannot run, so the data iterator calls this on every batch before sharding it."""
  # Preference batches are (B, 2, S), chosen and rejected sharing the images: check them as rows.
  tokens = np.asarray(batch["tokens"]).reshape(-1, batch["tokens"].shape[-1])
  segment_ids = np.asarray(batch["segment_ids"]).reshape(tokens.shape)
  images = batch.get("images")
  vision_mask = None if images is None else tokens == config.image_token_id
  slots = 0 if images is None else vision_slots(images, tokens, config)
  for technique in techniques.active(config.decoder):
    technique.check_call(config.decoder, vision_mask, segment_ids, slots)


def prefill(
    model: LLVM,
    params: Any,
    tokens: Array,
    max_len: int,
    images: Array | None = None,
    image_mask: Array | None = None,
    segment_ids: Array | None = None,
    hires_images: Array | None = None,
    hires_grid: Array | None = None,
) -> tuple[Array, Cache]:
  """Runs a (left-padded) prompt into a fresh cache of `max_len` slots; returns logits and cache.

  DeepStack's crops (`hires_images`) are injected here only: they touch prompt positions alone.
  """
  num_vision = 0 if images is None else vision_slots(images, tokens, model.config)
  cache = init_cache(model.config.decoder, tokens.shape[0], max_len, num_vision=num_vision)
  return model.apply(
      {"params": params},
      tokens,
      images=images,
      image_mask=image_mask,
      segment_ids=segment_ids,
      cache=cache,
      hires_images=hires_images,
      hires_grid=hires_grid,
  )


def decode_step(model: LLVM, params: Any, token: Array, cache: Cache) -> tuple[Array, Cache]:
  """One token per row (B, 1) against the cache; returns logits (B, 1, V) and the new cache."""
  return model.apply({"params": params}, token, cache=cache, decode=True)
