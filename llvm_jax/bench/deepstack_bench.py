"""DeepStack cost on a tiny LLVM: prefill time and FLOPs against plain LLaVA, in one run.

    python -m llvm_jax.bench.deepstack_bench [--image_size=64 --text_len=32 --batch=4 --steps=10]

Three prefills of the same prompt batch (one image per row plus text), jitted into a fresh cache:
  - base: plain LLaVA with the global view only (N = text + T context tokens);
  - deepstack: the same N tokens, the g_h*g_w crops stacked into decoder layers;
  - plain hires: plain LLaVA with the global view and every crop in the context as images of their
    own (text + T*(1 + g_h*g_w) tokens), i.e. the same high-resolution tokens at full context cost.
Per variant: the median wall time (variants interleaved), XLA `cost_analysis()` FLOPs of the compiled
prefill, and their ratios; beside them the analytic `flops.deepstack_cost` (causal attention
counted at one half, which XLA's dense masked attention does not do).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from llvm_jax import config_utils, convert, flops, host
from llvm_jax.bench.common import time_interleaved, xla_flops
from llvm_jax.models.config import DeepStackConfig, LLVMConfig
from llvm_jax.models.llvm import LLVM, prefill

_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Global view (and crop) size in pixels; patch 8.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 32, "Text tokens per row besides the image tokens.")
_BATCH = flags.DEFINE_integer("batch", 4, "Rows per prefill.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed prefills per variant (after one warm-up).")
_EMBED_DIM = flags.DEFINE_integer("embed_dim", 64, "Decoder width of the tiny config.")
_NUM_LAYERS = flags.DEFINE_integer("num_layers", 6, "Decoder depth (DeepStack needs start + groups layers).")
_GRID = flags.DEFINE_list("num_crops", ["2", "2"], "DeepStack crop grid g_h,g_w.")


def _prompt(config: LLVMConfig, batch: int, text_len: int, images_per_row: int) -> np.ndarray:
  """Rows of [text/2, <image> x T per image, text/2]."""
  rng = np.random.RandomState(0)
  half = text_len // 2
  image = [config.image_token_id] * (config.tokens_per_image * images_per_row)
  text = lambda n: list(rng.randint(5, config.decoder.vocab_size, n))
  return np.asarray([text(half) + image + text(text_len - half) for _ in range(batch)], np.int32)


def compile_prefill(config: LLVMConfig, params: Any, inputs: dict[str, jax.Array]) -> tuple[Callable[[], Any], float]:
  """A thunk running the compiled prefill of `inputs`, and its XLA FLOPs."""
  model = LLVM(config)
  max_len = inputs["tokens"].shape[1]
  run = lambda p, x: prefill(
      model, p, x["tokens"], max_len, x["images"], x["image_mask"], hires_images=x.get("hires_images")
  )
  compiled = jax.jit(run).lower(params, inputs).compile()
  return lambda: jax.block_until_ready(compiled(params, inputs)), xla_flops(compiled)


def main(argv):
  del argv
  host.tune_host_process()
  grid = tuple(int(g) for g in _GRID.value)
  tiny = config_utils.tiny_llvm(image_size=_IMAGE_SIZE.value, embed_dim=_EMBED_DIM.value, num_layers=_NUM_LAYERS.value)
  base = dataclasses.replace(tiny, decoder=dataclasses.replace(tiny.decoder, max_position_embeddings=4096))
  stacked = dataclasses.replace(base, deepstack=DeepStackConfig(num_crops=grid))
  groups = stacked.deepstack.num_groups
  b, size = _BATCH.value, _IMAGE_SIZE.value
  rng = np.random.RandomState(1)
  images = rng.uniform(-1, 1, (b, 1, size, size, 3)).astype(np.float32)
  hires = rng.uniform(-1, 1, (b, 1, groups, size, size, 3)).astype(np.float32)
  one = np.ones((b, 1), bool)
  inputs = {
      "base": (base, dict(tokens=_prompt(base, b, _TEXT_LEN.value, 1), images=images, image_mask=one)),
      "deepstack": (
          stacked,
          dict(tokens=_prompt(base, b, _TEXT_LEN.value, 1), images=images, image_mask=one, hires_images=hires),
      ),
      "plain hires": (
          base,
          dict(
              tokens=_prompt(base, b, _TEXT_LEN.value, 1 + groups),
              images=np.concatenate([images, hires[:, 0]], axis=1),
              image_mask=np.ones((b, 1 + groups), bool),
          ),
      ),
  }
  params = convert.init_params(LLVM(base), jax.random.key(0))
  print(
      f"device: {jax.devices()[0].device_kind}; decoder D={base.decoder.embed_dim} L={base.decoder.num_layers}; "
      f"ViT width {base.vision.width} x {base.vision.num_layers_used} layers at {size} px "
      f"({base.tokens_per_image} tokens/image); crops {grid[0]}x{grid[1]}; batch {b}"
  )
  compiled = {}
  for name, (cfg, x) in inputs.items():
    compiled[name] = compile_prefill(cfg, params, jax.tree.map(jnp.asarray, x))
  ms = time_interleaved({name: thunk for name, (thunk, _) in compiled.items()}, _STEPS.value)
  cost = flops.deepstack_cost(stacked, text_tokens=_TEXT_LEN.value)
  analytic = {
      "base": cost["vision_flops_per_image"] + cost["llm_flops"],
      "deepstack": cost["total_flops"],
      "plain hires": cost["total_flops_plain_hires"],
  }
  print(f"{'variant':12s} {'context':>7s} {'prefill ms':>10s} {'XLA GFLOP':>9s} {'analytic GFLOP':>14s}")
  for name, (_, x) in inputs.items():
    print(
        f"{name:12s} {x['tokens'].shape[1]:7d} {ms[name]:10.2f} {compiled[name][1] / 1e9:9.4f} "
        f"{b * analytic[name] / 1e9:14.4f}"
    )
  ds_flops, plain_flops, base_flops = (compiled[k][1] for k in ("deepstack", "plain hires", "base"))
  print(
      f"deepstack / plain hires: time {ms['deepstack'] / ms['plain hires']:.3f}, XLA FLOPs "
      f"{ds_flops / plain_flops:.3f}, analytic FLOPs {cost['total_flops_ratio_vs_plain_hires']:.3f}, "
      f"context {cost['context_tokens'] / cost['context_tokens_plain_hires']:.3f}"
  )
  print(
      f"deepstack / base:        time {ms['deepstack'] / ms['base']:.3f}, XLA FLOPs {ds_flops / base_flops:.3f}, "
      f"analytic FLOPs {analytic['deepstack'] / analytic['base']:.3f}, vision FLOPs x{cost['vision_flops_ratio']:.1f}, "
      f"extra params {cost['extra_params']}"
  )


if __name__ == "__main__":
  app.run(main)
