"""Helpers shared by the model tests: the decoder on token ids, one decoder layer on its own, the
scanned param layout."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from llvm_jax.models import hooks, masks
from llvm_jax.models.config import DecoderConfig
from llvm_jax.models.decoder import Decoder, DecoderLayer
from llvm_jax.models.rope import rope_cos_sin

# The tiny decoder the technique tests share (each picks its depth with dataclasses.replace).
TINY_DECODER = DecoderConfig(
    vocab_size=61,
    embed_dim=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    max_position_embeddings=64,
)


def run_layer(cfg, layer_params, h, segment_ids, positions=None, mlp_weight=None):
  """One DecoderLayer (no technique wrapped around it) over h (B, T, D), causal within segments.

  `positions` (default: restarting in each segment) set RoPE; the mask follows the segments.
  """
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  mask_positions = masks.default_positions(segment_ids)
  positions = mask_positions if positions is None else jnp.asarray(positions, jnp.int32)
  cos, sin = rope_cos_sin(positions, cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
  ctx = hooks.LayerContext(
      cos, sin, masks.self_attention(segment_ids, positions, cfg.sliding_window), 0, mlp_weight=mlp_weight
  )
  return DecoderLayer(cfg).apply({"params": layer_params}, jnp.asarray(h), ctx, None)[0]


def stacked(params, num_layers):
  """Unscanned parameters -> the scanned layout (layers stacked under decoder/layers/layer)."""
  decoder = dict(params["decoder"])
  per_layer = [decoder.pop(f"layers_{i}") for i in range(num_layers)]
  decoder["layers"] = {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}
  return dict(params, decoder=decoder)


class LM(nn.Module):
  """The decoder on token ids, so a technique is tested at the decoder level.

  Tokens equal to `image_token` are the vision tokens (p-MoD's routing targets) when the call has
  `num_vision` vision slots per row (default: the module's). Returns (logits, cache).
  """

  config: DecoderConfig
  image_token: int | None = None
  num_vision: int = 0

  def setup(self):
    self.decoder = Decoder(self.config)

  def __call__(
      self, tokens, segment_ids=None, cache=None, decode=False, num_vision=None, residuals=None, residual_layers=()
  ):
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    num_vision = self.num_vision if num_vision is None else num_vision
    vision_mask = tokens == self.image_token if num_vision else None
    return self.decoder(
        self.decoder.embed(tokens),
        segment_ids,
        None,
        cache,
        decode,
        vision_mask=vision_mask,
        num_vision=num_vision,
        layer_residuals=residuals,
        residual_layers=residual_layers,
    )
