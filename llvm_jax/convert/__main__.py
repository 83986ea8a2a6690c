"""Checkpoint conversion between training runs (Orbax) and `transformers` directories.

  python -m llvm_jax.convert to_hf --checkpoint=RUN [--step=N] --out=DIR [--allow_custom] [--dtype=float32]
  python -m llvm_jax.convert from_hf --hf=DIR --out=RUN

to_hf reads the run's params (never its optimiser state; LoRA merged) with the run's own config, and
writes what `AutoProcessor` + `LlavaForConditionalGeneration` / `AutoModelForImageTextToText` /
InternVL load: config.json, safetensors (sharded with an index above --max_shard_mb), the tokenizer and
its chat template, the image processor (the run's `data.image_processor`, else one built from its data
settings), the processor, and generation_config.json. The tower layers the model never reads (past
`vision.feature_layer`, post-layernorm, SigLIP's head) are written too, re-read from where the run
started: `<run>/hf_unused.safetensors` (written by from_hf), else the run's `init_hf` directory, else,
following `init_checkpoint`, the run it started from. So HF -> llvm_jax -> HF keeps every tensor.

A model with a technique (TroL, Phantom, p-MoD, DeepStack) has no transformers equivalent and is
refused unless --allow_custom: then its technique tensors and llvm_jax_config.json are written too, and
from_hf reads them back, so the round trip is exact.

from_hf writes RUN/checkpoints/0 (params + config, the layout of a training run) that
`predict --checkpoint=RUN`, `--config.init_checkpoint=RUN` and `task=eval` read; its config is
configs/hf.py's for DIR, with the directory's small files (tokenizer, processor, configs) copied to
RUN/hf so that RUN stands alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file, save_file

from llvm_jax import config_utils, convert, predict
from llvm_jax.data.config import resolve
from llvm_jax.data.pipeline import vision_spec_from_config
from llvm_jax.train import checkpoint as ckpt

UNUSED_FILE = "hf_unused.safetensors"


def _hf_config_module():
  """configs/hf.py (beside the package; the repository's configs are not an installed package)."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir, "configs", "hf.py")
  spec = importlib.util.spec_from_file_location("llvm_jax_configs_hf", os.path.normpath(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def unused_tower_state(checkpoint: str, cfg: Any, step: int | None = None, depth: int = 0) -> dict[str, np.ndarray]:
  """The HF tensors a run's model never reads, from where the run started (see the module docstring)."""
  config, workdir, _ = ckpt.read_config(checkpoint, step)
  saved = os.path.join(workdir, UNUSED_FILE)
  if os.path.isfile(saved):
    return _read_file(saved)
  if config.get("init_hf", ""):
    if not os.path.isdir(config.init_hf):
      print(
          f"warning: init_hf={config.init_hf} is gone; the tower layers the model does not use are not written "
          "(transformers will initialise them)",
          file=sys.stderr,
      )
      return {}
    return convert.unused_hf_state(cfg, config.init_hf)
  if config.get("init_checkpoint", "") and depth < 16:
    return unused_tower_state(config.init_checkpoint, cfg, None, depth + 1)
  return {}


def _read_file(path: str) -> dict[str, np.ndarray]:
  return dict(load_file(path))


def image_processor_for(data_cfg: Any, cfg: Any):
  """The run's image processor: `data.image_processor` if set, else one matching its data settings."""
  import transformers  # lazy: a heavy import, kept off the CLI's startup

  if resolve(data_cfg).image_processor:
    return transformers.AutoImageProcessor.from_pretrained(data_cfg.image_processor)
  spec = vision_spec_from_config(data_cfg)
  side = {"height": spec.image_size, "width": spec.image_size}
  common = dict(image_mean=list(spec.mean), image_std=list(spec.std), do_convert_rgb=True)
  if spec.kind == "internvl":
    return transformers.GotOcr2ImageProcessor(
        size=side, crop_to_patches=True, max_patches=spec.max_tiles, min_patches=1, **common
    )
  if spec.kind == "siglip" or spec.aspect_mode == "resize":
    cls = transformers.SiglipImageProcessor if spec.kind == "siglip" else transformers.CLIPImageProcessor
    return (
        cls(size=side, do_center_crop=False, **common)
        if cls is transformers.CLIPImageProcessor
        else cls(size=side, **common)
    )
  if spec.aspect_mode == "crop":
    return transformers.CLIPImageProcessor(size={"shortest_edge": spec.image_size}, crop_size=side, **common)
  return transformers.LlavaImageProcessor(
      size={"shortest_edge": spec.image_size}, crop_size=side, do_pad=True, **common
  )


def write_processor(out: str, cfg: Any, tokenizer: Any, image_processor: Any, image_token: str) -> None:
  """The tokenizer, image processor and (LLaVA) processor files `AutoProcessor.from_pretrained(out)` reads."""
  import transformers  # lazy: a heavy import, kept off the CLI's startup

  tokenizer.save_pretrained(out)
  image_processor.save_pretrained(out)
  if cfg.vision is None:
    return
  if cfg.projector.kind == "pixel_shuffle_mlp":
    try:
      transformers.InternVLProcessor(
          image_processor=image_processor,
          tokenizer=tokenizer,
          image_seq_length=cfg.tokens_per_image,
          chat_template=tokenizer.chat_template,
      ).save_pretrained(out)
    except Exception as e:  # InternVL's processor needs its special tokens in the tokenizer
      print(f"warning: no InternVL processor written ({e}); the tokenizer and image processor are", file=sys.stderr)
    return
  extra = 1 if cfg.vision.kind == "clip" else 0  # CLIP's CLS token, dropped by the 'default' strategy
  transformers.LlavaProcessor(
      image_processor=image_processor,
      tokenizer=tokenizer,
      patch_size=cfg.vision.patch_size,
      vision_feature_select_strategy=cfg.vision.feature_select,
      chat_template=tokenizer.chat_template,
      image_token=image_token,
      num_additional_image_tokens=extra,
  ).save_pretrained(out)


def to_hf(
    checkpoint: str,
    out: str,
    step: int | None = None,
    allow_custom: bool = False,
    dtype: str = "float32",
    max_shard_bytes: int = 5 << 30,
) -> str:
  """Exports a run's checkpoint to a transformers directory (see the module docstring)."""
  import transformers  # lazy: a heavy import, kept off the CLI's startup

  config, _, step = ckpt.read_config(checkpoint, step)
  cfg = config_utils.model_config(config)
  convert.check_exportable(cfg, allow_custom)  # refuse before reading any weights
  predictor = predict.from_checkpoint(checkpoint, step=step)
  params = jax.device_get(predictor.params)
  tok = predictor.tokenizer
  ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
  extra = unused_tower_state(checkpoint, cfg, step) if cfg.vision is not None else {}
  convert.to_hf(
      cfg, params, out, dtype, allow_custom=allow_custom, extra_state=extra, max_shard_bytes=max_shard_bytes, **ids
  )
  if cfg.vision is not None:
    write_processor(out, cfg, tok, image_processor_for(predictor.data_config, cfg), predictor.image_token)
  else:
    tok.save_pretrained(out)
  transformers.GenerationConfig(**ids).save_pretrained(out)
  return out


def from_hf(hf_dir: str, out: str) -> str:
  """Writes a transformers directory as a run's step-0 checkpoint (see the module docstring)."""
  hf_dir, out = os.path.abspath(hf_dir), os.path.abspath(out)
  assets = os.path.join(out, "hf")
  os.makedirs(assets, exist_ok=True)
  for name in os.listdir(hf_dir):  # everything but the weights, so the run stands alone
    src = os.path.join(hf_dir, name)
    if os.path.isfile(src) and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
      shutil.copy2(src, assets)
  config = _hf_config_module().get_config(f"dir={assets}")
  model_cfg = config_utils.model_config(config)
  model, params = convert.from_hf(
      hf_dir,
      dtype=model_cfg.decoder.dtype,
      param_dtype=model_cfg.decoder.param_dtype,
      scan_layers=model_cfg.decoder.scan_layers,
  )
  with config.unlocked():
    config.model = config_utils.model_block(model.config)  # techniques of an allow_custom export included
    config.init_hf = ""  # the weights are in this checkpoint
  if hasattr(config_utils, "finalize"):
    config = config_utils.finalize(config)  # data settings that follow the model (DeepStack crops)
  if model.config.vision is not None:
    save_file(convert.unused_hf_state(model.config, hf_dir), os.path.join(out, UNUSED_FILE))
  mngr = ckpt.manager(out, save_every=1, keep=1, async_save=False)
  mngr.save(
      0,
      args=ocp.args.Composite(params=ocp.args.StandardSave(params), config=ocp.args.JsonSave(config.to_dict())),
      force=True,
  )
  mngr.wait_until_finished()
  mngr.close()
  return out


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m llvm_jax.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  sub = parser.add_subparsers(dest="command", required=True)
  export = sub.add_parser("to_hf", help="a run's checkpoint -> a transformers directory")
  export.add_argument("--checkpoint", required=True, help="a workdir, its checkpoints/ folder or one step's folder")
  export.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  export.add_argument("--out", required=True)
  export.add_argument(
      "--allow_custom",
      action="store_true",
      help="export a model with techniques (no transformers equivalent) with llvm_jax_config.json",
  )
  export.add_argument("--dtype", default="float32", help="dtype of the written weights")
  export.add_argument("--max_shard_mb", type=float, default=5 * 1024, help="safetensors shard size")
  imp = sub.add_parser("from_hf", help="a transformers directory -> a run's checkpoint (step 0)")
  imp.add_argument("--hf", required=True, help="a save_pretrained directory")
  imp.add_argument("--out", required=True, help="the run directory to write")
  args = parser.parse_args(argv)
  try:
    if args.command == "to_hf":
      path = to_hf(
          args.checkpoint, args.out, args.step, args.allow_custom, args.dtype, int(args.max_shard_mb * (1 << 20))
      )
    else:
      path = from_hf(args.hf, args.out)
  except (convert.CustomModelError, FileNotFoundError) as e:
    print(f"llvm_jax.convert {args.command}: {e}", file=sys.stderr)
    return 2
  print(f"llvm_jax.convert {args.command}: wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
