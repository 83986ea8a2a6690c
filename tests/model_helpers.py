"""Helpers shared by the model tests: one decoder layer applied on its own, the scanned param layout."""

import jax
import jax.numpy as jnp

from llvm_jax.models import hooks, masks
from llvm_jax.models.decoder import DecoderLayer
from llvm_jax.models.rope import rope_cos_sin


def run_layer(cfg, layer_params, h, segment_ids, positions=None, mlp_weight=None):
  """One DecoderLayer (no technique wrapped around it) over h (B, T, D), causal within segments.

  `positions` (default: restarting in each segment) set RoPE; the mask follows the segments.
  """
  segment_ids = jnp.asarray(segment_ids, jnp.int32)
  mask_positions = masks.default_positions(segment_ids)
  positions = mask_positions if positions is None else jnp.asarray(positions, jnp.int32)
  cos, sin = rope_cos_sin(positions, cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
  ctx = hooks.LayerContext(cos, sin, masks.self_attention(segment_ids, positions, cfg.sliding_window), 0,
                           mlp_weight=mlp_weight)
  return DecoderLayer(cfg).apply({"params": layer_params}, jnp.asarray(h), ctx, None)[0]


def stacked(params, num_layers):
  """Unscanned parameters -> the scanned layout (layers stacked under decoder/layers/layer)."""
  decoder = dict(params["decoder"])
  per_layer = [decoder.pop(f"layers_{i}") for i in range(num_layers)]
  decoder["layers"] = {"layer": jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)}
  return dict(params, decoder=decoder)
