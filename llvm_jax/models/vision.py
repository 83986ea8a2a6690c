"""Vision towers: CLIP ViT, SigLIP and InternViT, numerically as in `transformers`.

    tower = VisionTower(VisionConfig(kind="clip", ...))
    features = tower.apply({"params": params}, pixels)   # (N, H, W, C) -> (N, num_features, width)

The output is LLaVA's selected feature map: the hidden state `config.feature_layer` (index 0 = the
embedding output, after CLIP's pre-norm; index i = output of layer i; negative indices count from
the end of the full-depth HF tower) with the first token dropped for `feature_select='default'`.
Only the `config.num_layers_used` layers that this needs are built; the HF tower's later layers,
its post-layernorm and SigLIP's pooling head are not (see convert/vision_table.py).

Parameter layout (paths relative to this module):

    patch_embed/kernel (p, p, C, D) [+ bias (D,) for siglip / internvit]
    cls_token (D,)                                     clip, internvit
    pos_embed (num_positions, D)
    pre_norm/{scale,bias}                              clip
    layers_{i}/norm1/{scale[,bias]}, layers_{i}/norm2/{scale[,bias]}   (bias absent for rms_norm)
    layers_{i}/attn/{q,k,v}/kernel (D, H, d) [+ bias (H, d)], attn/o/{kernel (H, d, D), bias (D,)}
    layers_{i}/attn/{q_norm,k_norm}/scale (D,)         internvit with qk_norm
    layers_{i}/mlp/{fc1,fc2}/{kernel,bias}
    layers_{i}/{lambda_1,lambda_2} (D,)                internvit with layer_scale
    post_norm/{scale,bias}                             internvit with post_norm and feature_layer -1
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llvm_jax.models import attention, layers
from llvm_jax.models.config import VisionConfig, resolve_dtype

Array = jax.Array

# transformers' InternVL builds q_norm / k_norm with the RMSNorm default eps, not the config's.
QK_NORM_EPS = 1e-6


def _norm(cfg: VisionConfig, name: str, norm_type: str | None = None) -> nn.Module:
  dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
  if (norm_type or cfg.norm_type) == "rms_norm":
    return layers.RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name=name)
  return layers.LayerNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name=name)


class VisionAttention(nn.Module):
  """Bidirectional multi-head self-attention; InternViT's optional qk-norm spans all heads."""

  config: VisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    h, d = cfg.num_heads, cfg.head_dim

    def proj(name: str) -> Array:
      return layers.DenseGeneral(
          (h, d),
          ("vision_embed",),
          ("vision_heads", "head_dim"),
          use_bias=cfg.qkv_bias,
          dtype=dtype,
          param_dtype=pdtype,
          impl=cfg.dense_impl,
          name=name,
      )(x)

    def qk_norm(y: Array, name: str) -> Array:
      flat = y.reshape(y.shape[:-2] + (h * d,))
      flat = layers.RMSNorm(QK_NORM_EPS, dtype=dtype, param_dtype=pdtype, name=name)(flat)
      return flat.reshape(y.shape)

    q, k, v = proj("q"), proj("k"), proj("v")
    if cfg.qk_norm:
      q, k = qk_norm(q, "q_norm"), qk_norm(k, "k_norm")
    impl = attention.for_call(cfg.attention_impl, cached=False, initializing=self.is_initializing())
    block = cfg.attention_block_size
    out = attention.dot_product_attention(q, k, v, None, d**-0.5, impl, block_q=block, block_kv=block)
    out = nn.with_logical_constraint(out, ("act_batch", "act_len", "act_heads", None))
    return layers.DenseGeneral(
        (cfg.width,),
        ("vision_heads", "head_dim"),
        ("vision_embed",),
        use_bias=True,
        dtype=dtype,
        param_dtype=pdtype,
        impl=cfg.dense_impl,
        name="o",
    )(out)


class VisionMLP(nn.Module):
  config: VisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    if cfg.activation not in layers.ACTIVATIONS:
      raise ValueError(f"vision.act {cfg.activation!r} unknown; expected one of {sorted(layers.ACTIVATIONS)}")
    linear = lambda width, names, name: layers.DenseGeneral(
        (width,), names[:1], names[1:], use_bias=True, dtype=dtype, param_dtype=pdtype, impl=cfg.dense_impl, name=name
    )
    y = linear(cfg.mlp_dim, ("vision_embed", "vision_mlp"), "fc1")(x)
    y = layers.ACTIVATIONS[cfg.activation](y)
    y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_mlp"))
    return linear(cfg.width, ("vision_mlp", "vision_embed"), "fc2")(y)


class VisionLayer(nn.Module):
  """Pre-norm ViT block: x + [lambda_1 *] Attn(norm1(x)), then + [lambda_2 *] MLP(norm2(.))."""

  config: VisionConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)

    def layer_scale(y: Array, name: str) -> Array:
      if not cfg.layer_scale:
        return y
      init = layers.logical_init(nn.initializers.constant(0.1), ("vision_embed",))
      return y * self.param(name, init, (cfg.width,), pdtype).astype(dtype)

    x = x + layer_scale(VisionAttention(cfg, name="attn")(_norm(cfg, "norm1")(x)), "lambda_1")
    x = x + layer_scale(VisionMLP(cfg, name="mlp")(_norm(cfg, "norm2")(x)), "lambda_2")
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))


class VisionTower(nn.Module):
  """CLIP / SigLIP / InternViT tower returning LLaVA's selected features (see module docstring)."""

  config: VisionConfig

  def setup(self):
    cfg = self.config
    self.dtype = resolve_dtype(cfg.dtype)
    pdtype = resolve_dtype(cfg.param_dtype)
    # The patch conv (stride = kernel = p) as a dense over each flattened (p, p, C) patch.
    self.patch_embed = layers.DenseGeneral(
        (cfg.width,),
        ("vision_patch_h", "vision_patch_w", "vision_channels"),
        ("vision_embed",),
        use_bias=cfg.kind != "clip",
        dtype=self.dtype,
        param_dtype=pdtype,
        impl=cfg.dense_impl,
    )
    embed_init = nn.initializers.normal(stddev=0.02)
    if cfg.has_cls:
      self.cls_token = self.param("cls_token", layers.logical_init(embed_init, ("vision_embed",)), (cfg.width,), pdtype)
    self.pos_embed = self.param(
        "pos_embed",
        layers.logical_init(embed_init, ("vision_pos", "vision_embed")),
        (cfg.num_positions, cfg.width),
        pdtype,
    )
    if cfg.kind == "clip":
      self.pre_norm = _norm(cfg, "pre_norm")
    layer_cls = layers.maybe_remat(VisionLayer, cfg.remat_policy)
    # An explicit list of `layers_{i}` (not nn.scan) so per-layer inputs (DeepStack-V) can be added.
    self.layers = [layer_cls(cfg, name=f"layers_{i}") for i in range(cfg.num_layers_used)]
    if self.uses_post_norm:
      # transformers' InternVLVisionModel.layernorm is a LayerNorm whatever norm_type says.
      self.post_norm = _norm(cfg, "post_norm", norm_type="layer_norm")

  @property
  def uses_post_norm(self) -> bool:
    cfg = self.config
    return cfg.kind == "internvit" and cfg.post_norm and cfg.feature_layer == -1

  def embed(self, pixels: Array) -> Array:
    """(N, H, W, C) pixels -> (N, num_positions, D): patches [+ CLS] + positions [-> CLIP pre-norm].

    This is hidden state 0 (what DeepStack-V regroups from the high-resolution view).
    """
    cfg = self.config
    if pixels.ndim != 4:
      raise ValueError(f"VisionTower expects (N, H, W, C) pixels, got shape {pixels.shape}")
    n, height, width, channels = pixels.shape
    if (height, width) != (cfg.image_size, cfg.image_size):
      raise ValueError(
          f"image size {height}x{width} differs from vision.image_size={cfg.image_size}: position "
          "embeddings are not interpolated; resize the images to the tower's resolution"
      )
    if channels != cfg.num_channels:
      raise ValueError(f"images have {channels} channels, vision.num_channels={cfg.num_channels} (NHWC expected)")
    p, g = cfg.patch_size, cfg.grid
    # Like the strided conv, drop trailing pixels when image_size is not a multiple of the patch.
    pixels = pixels[:, : g * p, : g * p]
    patches = pixels.reshape(n, g, p, g, p, channels).transpose(0, 1, 3, 2, 4, 5)
    x = self.patch_embed(patches).reshape(n, g * g, cfg.width)
    if cfg.has_cls:
      cls = jnp.broadcast_to(self.cls_token.astype(self.dtype), (n, 1, cfg.width))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.pos_embed.astype(self.dtype)[None]
    if cfg.kind == "clip":
      x = self.pre_norm(x)
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_embed"))

  def __call__(self, pixels: Array, layer_residuals: Array | None = None, residual_start: int = 0) -> Array:
    """(N, H, W, C) float pixels (normalised as the HF processor does) -> (N, num_features, D).

    DeepStack-V: `layer_residuals` (G, N, grid*grid, D) are added to the patch (non-CLS) tokens,
    group k before layer `residual_start + k` (static).
    """
    cfg = self.config
    x = self.embed(pixels)
    for i, layer in enumerate(self.layers):
      group = i - residual_start
      if layer_residuals is not None and 0 <= group < layer_residuals.shape[0]:
        residual = layer_residuals[group].astype(x.dtype)
        x = x.at[:, x.shape[1] - residual.shape[1] :].add(residual)
      x = layer(x)
    if self.uses_post_norm:
      x = self.post_norm(x)
    if cfg.feature_select == "default":
      x = x[:, 1:]
    return x
