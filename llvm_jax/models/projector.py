"""Vision -> LLM projectors, numerically as in `transformers`.

    'mlp2x_gelu'         linear_1 -> act -> linear_2                  (LlavaMultiModalProjector)
    'linear'             linear_1                                      (no transformers equivalent)
    'pixel_shuffle_mlp'  pixel_shuffle -> norm -> linear_1 -> act -> linear_2
                                                                       (InternVL: InternVLModel.pixel_shuffle
                                                                        + InternVLMultiModalProjector)

Parameter layout (relative to this module): linear_1/{kernel (Din, out_dim), bias}, linear_2/{kernel
(out_dim, out_dim), bias} (no linear_2 for 'linear'; no biases if config.bias is False), and
norm/{scale, bias} (Din = Dv * factor^2) for 'pixel_shuffle_mlp'.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax

from llvm_jax.models import layers
from llvm_jax.models.config import ProjectorConfig, resolve_dtype

Array = jax.Array


def pixel_shuffle(features: Array, factor: int) -> Array:
  """(N, s*s, C) row-major tokens -> (N, (s/f)^2, f*f*C), as transformers' InternVL pixel shuffle.

  Output token (i, j) (row-major over the (s/f, s/f) grid) is the concatenation, in channel order
  (di, dj, c), of input tokens (f*i + di, f*j + dj): transformers' view/permute/view/permute chain
  (`InternVLModel.pixel_shuffle` with scale_factor 1/f) comes to exactly this order.
  """
  n, t, c = features.shape
  s = math.isqrt(t)
  if s * s != t:
    raise ValueError(
        f"pixel shuffle needs a square token grid, got {t} tokens (a CLS token kept by "
        "feature_select='full', or a SigLIP patch dropped by 'default'?)"
    )
  if s % factor:
    raise ValueError(f"pixel shuffle: grid side {s} is not divisible by the shuffle factor {factor}")
  m = s // factor
  x = features.reshape(n, m, factor, m, factor, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, m * m, factor * factor * c)


class Projector(nn.Module):
  config: ProjectorConfig
  out_dim: int

  @nn.compact
  def __call__(self, features: Array) -> Array:
    """(N, T, Dv) tower features -> (N, T', out_dim); T' = T, or T / factor^2 after pixel shuffle."""
    cfg = self.config
    dtype, pdtype = resolve_dtype(cfg.dtype), resolve_dtype(cfg.param_dtype)
    x = features
    if cfg.kind == "pixel_shuffle_mlp":
      x = pixel_shuffle(x, cfg.shuffle_factor)
      x = layers.LayerNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="norm")(x)
    linear = lambda names, name: layers.DenseGeneral(
        (self.out_dim,),
        names[:1],
        names[1:],
        use_bias=cfg.bias,
        dtype=dtype,
        param_dtype=pdtype,
        impl=cfg.dense_impl,
        name=name,
    )
    if cfg.kind == "linear":
      return linear(("vision_embed", "embed"), "linear_1")(x)
    if cfg.act not in layers.ACTIVATIONS:
      raise ValueError(f"projector.act {cfg.act!r} unknown; expected one of {sorted(layers.ACTIVATIONS)}")
    y = linear(("vision_embed", "mlp"), "linear_1")(x)
    y = layers.ACTIVATIONS[cfg.act](y)
    y = nn.with_logical_constraint(y, ("act_batch", "act_len", "act_mlp"))
    y = linear(("mlp", "embed"), "linear_2")(y)
    return nn.with_logical_constraint(y, ("act_batch", "act_len", "act_embed"))
