"""The decoder layer loop's one extension point: what a layer sees, and how a technique wraps it.

Every decoder layer, scanned or not, is one `LayerFn`: (hidden, context, layer cache) -> (hidden,
new layer cache). A technique is a `Technique` whose `wrap` turns the layer function into another
(DeepStack adds its residual first, p-MoD routes and runs the layer on the kept tokens, TroL applies
it twice); `llvm_jax.models.techniques` lists them in the fixed order they nest. The core loop
(`decoder.py`) only composes the active ones; it names none of them.

A leaf module: it imports nothing of the model but the mask.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import flax.linen as nn
import jax
from flax import struct

from llvm_jax.models.masks import MaskInfo

Array = jax.Array
Cache = dict[str, Any]


@struct.dataclass
class LayerContext:
  """Everything a layer needs besides its hidden state and cache (MaxText bundles it the same way).

  cos, sin: RoPE tables of the layer's tokens; mask: which keys each token attends to;
  write_index: the cache slot of the first token of this call; vision_mask (B, T) and num_vision
  (static): the vision tokens and the vision slots per row; layer_residuals (G, B, T, D): per-layer
  additions of this call (DeepStack); mlp_weight (B, T, 1): a per-token scale of the MLP update
  (p-MoD's STRing); extras: what an outer technique hands an inner one (p-MoD's routing); decode
  (static): a decode step rather than a prefill or a training call; attention_impl (static): the
  attention kernel of this call (`attention.for_call`).
  """

  cos: Array
  sin: Array
  mask: MaskInfo
  write_index: Any
  vision_mask: Array | None = None
  layer_residuals: Array | None = None
  mlp_weight: Array | None = None
  extras: dict[str, Any] = struct.field(default_factory=dict)
  num_vision: int = struct.field(pytree_node=False, default=0)
  decode: bool = struct.field(pytree_node=False, default=False)
  attention_impl: str = struct.field(pytree_node=False, default="xla")


LayerFn = Callable[[Array, LayerContext, "Cache | None"], tuple[Array, "Cache | None"]]


class Technique:
  """A technique's hooks into the layer loop; every default does nothing.

  `signature(config, layer, scanned)` is the layer's static shape under this technique (config
  only): consecutive layers with equal signatures form one scanned stage. `layer_inputs` are the
  technique's per-layer arrays (leading axis: layer), which a scanned stage slices; `wrap` receives
  one layer's slice.
  """

  name: str = ""
  # Attribute name of the decoder-level parameter module (`param_module`), e.g. 'trol_gate'.
  param_name: str | None = None

  def enabled(self, config: Any) -> bool:
    return False

  def param_module(self, config: Any) -> nn.Module | None:
    return None

  def signature(self, config: Any, layer: int, scanned: bool) -> Hashable:
    return None

  def layer_inputs(self, config: Any, params: Any, num_vision: int, residual_layers: tuple[int, ...]) -> Any:
    return None

  def wrap(self, fn: LayerFn, config: Any, signature: Hashable, inputs: Any) -> LayerFn:
    return fn

  def cache_length(self, config: Any, signature: Hashable, max_len: int, num_vision: int) -> int:
    return max_len

  def cache_entries(
      self, config: Any, signature: Hashable, layer_cache: Cache, batch: int, max_len: int, dtype: Any
  ) -> Cache:
    return layer_cache

  def check_call(self, config: Any, vision_mask: Any, segment_ids: Any, num_vision: int) -> None:
    """Host-side checks of a call's inputs (concrete arrays only)."""
