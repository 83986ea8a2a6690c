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
  if image_mask is not None:
    # Used slots first, in their original order (stable sort), so a gap in the mask is harmless.
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

  def encode_images(self, images: Array) -> Array:
    """(B, N, H, W, C) pixels -> (B, N, tokens_per_image, D) projected image tokens."""
    b, n = images.shape[:2]
    features = self.vision(images.reshape((b * n,) + images.shape[2:]))
    tokens = self.projector(features)
    return tokens.reshape((b, n) + tokens.shape[1:])

  def __call__(
      self,
      tokens: Array,
      images: Array | None = None,
      image_mask: Array | None = None,
      segment_ids: Array | None = None,
      positions: Array | None = None,
      cache: Cache | None = None,
      decode: bool = False,
  ) -> tuple[Array, Cache | None]:
    """Logits (B, T, V) for tokens (B, T); with a cache, also the updated cache (see decoder.py).

    `decode` (static) marks a decode step rather than a prefill (TroL's 'official' decoding needs it).
    """
    cfg = self.config
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    x = self.decoder.embed(tokens)
    if images is not None:
      if cfg.vision is None:
        raise ValueError("images were given but the model has no vision tower (config.model.vision is None)")
      check_image_tokens(tokens, image_mask, images.shape[1], cfg.tokens_per_image, cfg.image_token_id)
      x = splice_image_features(x, tokens, self.encode_images(images), image_mask, cfg.image_token_id)
    return self.decoder(x, segment_ids, positions, cache, decode)


def prefill(
    model: LLVM,
    params: Any,
    tokens: Array,
    max_len: int,
    images: Array | None = None,
    image_mask: Array | None = None,
    segment_ids: Array | None = None,
) -> tuple[Array, Cache]:
  """Runs a (left-padded) prompt into a fresh cache of `max_len` slots; returns logits and cache."""
  cache = init_cache(model.config.decoder, tokens.shape[0], max_len)
  return model.apply(
      {"params": params}, tokens, images=images, image_mask=image_mask, segment_ids=segment_ids, cache=cache
  )


def decode_step(model: LLVM, params: Any, token: Array, cache: Cache) -> tuple[Array, Cache]:
  """One token per row (B, 1) against the cache; returns logits (B, 1, V) and the new cache."""
  return model.apply({"params": params}, token, cache=cache, decode=True)
