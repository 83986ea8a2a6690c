"""The data block of an experiment config (`ml_collections.ConfigDict`) and its one reader.

`default_data_config()` holds the only defaults; `resolve(data_cfg)` merges a (possibly partial)
data block with them, validates it and returns the frozen `DataSettings` that the pipeline reads.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from llvm_jax.data import vision

log = logging.getLogger(__name__)


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults for `llvm_jax.data.pipeline.make_iterator`.

  Fields:
    name: TFDS name with config, e.g. 'synthetic_vqa/small', 'llava_instruct/sft', 'preference/default'.
    data_dir: the TFDS data_dir the dataset was built into ('' = TFDS's default).
    split: a TFDS split ('train', 'validation', 'test', 'train[:90%]', ...).
    build_if_missing: build the dataset (download_and_prepare) if it is not in data_dir yet;
      meant for synthetic_vqa (the others need local files). Single-process only.
    seq_len: tokens per row; global_batch_size: rows per step over all processes.
    num_workers: grain worker processes (0 = in the main process); worker_buffer_size;
      read_threads: grain read threads.
    vision: 'clip' | 'siglip' | 'internvl' (preprocessing of the tower; 'internvit' = 'internvl').
    image_size: side of the tower input (and of InternVL tiles).
    aspect_mode: '' = the tower's default ('pad' for clip, 'resize' for siglip, 'tile' for
      internvl); or 'pad' | 'crop' | 'resize'.
    image_processor: '' or a transformers directory whose image processor (preprocessor_config.json /
      processor_config.json) makes the pixels; vision, image_size and aspect_mode must agree with it
      (configs/hf.py sets all four from the checkpoint).
    max_tiles: InternVL dynamic_preprocess max_num; use_thumbnail: InternVL thumbnail tile.
    max_images: image slots per row (InternVL: tile slots; with packing: for all packed samples).
    deepstack_grid: None or (g_h, g_w): also emit the DeepStack high-resolution crops.
    deepstack_grid_mode: 'fixed' (every image cut g_h x g_w) | 'aspect' (each image cut by the grid
      (a, b), a*b = g_h*g_w, closest to its aspect ratio, emitted as `hires_grid`; data/vision.py).
    image_start / image_end: text put around each image's placeholder tokens (e.g. '<img>' and
      '</img>' for InternVL); '' for LLaVA.
    system_prompt: None, or a system message put before each conversation.
    chat_template: '' = the tokenizer's own; 'vicuna_v1' (LLaVA-1.5, for Vicuna tokenizers,
      which have none), 'tiny', or a Jinja template string.
    packing: pack several samples per row (segment_ids 1..n); not in eval mode.
    strict: raise (naming the record id) instead of skipping bad records.
    seed / shuffle: the sampler's shuffling (deterministic given the seed).
    drop_remainder: drop the records that do not divide evenly among processes.
  """
  cfg = ml_collections.ConfigDict()
  cfg.name = "synthetic_vqa/small"
  cfg.data_dir = ""
  cfg.split = "train"
  cfg.build_if_missing = False
  cfg.seq_len = 256
  cfg.global_batch_size = 8
  cfg.num_workers = 0
  cfg.worker_buffer_size = 2
  cfg.read_threads = 2
  cfg.vision = "clip"
  cfg.image_size = 336
  cfg.aspect_mode = ""
  cfg.image_processor = ""
  cfg.max_tiles = 6
  cfg.use_thumbnail = True
  cfg.max_images = 1
  cfg.deepstack_grid = config_dict.placeholder(tuple)
  cfg.deepstack_grid_mode = "fixed"
  cfg.image_start = ""
  cfg.image_end = ""
  cfg.system_prompt = config_dict.placeholder(str)
  cfg.chat_template = ""
  cfg.packing = False
  cfg.strict = False
  cfg.seed = 0
  cfg.shuffle = True
  cfg.drop_remainder = False
  return cfg


VISION_KINDS = vision.KINDS + ("internvit",)  # 'internvit' is an alias of 'internvl'
ASPECT_MODES = ("",) + vision.ASPECT_MODES  # '' = the tower's default
# Integer fields and their smallest valid value.
_INT_BOUNDS = {
    "global_batch_size": 1,
    "seq_len": 1,
    "num_workers": 0,
    "max_images": 0,
    "image_size": 1,
    "read_threads": 1,
    "worker_buffer_size": 1,
}


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """A resolved, validated data block (field meanings: `default_data_config`)."""

  name: str
  data_dir: str
  split: str
  build_if_missing: bool
  seq_len: int
  global_batch_size: int
  num_workers: int
  worker_buffer_size: int
  read_threads: int
  vision: str
  image_size: int
  aspect_mode: str
  image_processor: str
  max_tiles: int
  use_thumbnail: bool
  max_images: int
  deepstack_grid: tuple[int, int] | None
  deepstack_grid_mode: str
  image_start: str
  image_end: str
  system_prompt: str | None
  chat_template: str
  packing: bool
  strict: bool
  seed: int
  shuffle: bool
  drop_remainder: bool


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
  if value not in valid:
    raise ValueError(f"config.data.{name}={value!r}: must be one of {valid}")
  return value


def _integer(name: str, value: Any) -> int:
  low = _INT_BOUNDS.get(name)
  if low is None:
    return int(value)
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"config.data.{name}={value!r}: must be an integer >= {low}")
  return value


def resolve(data_cfg: ml_collections.ConfigDict | Mapping[str, Any] | DataSettings) -> DataSettings:
  """The data block merged with `default_data_config()`, validated; raises ValueError naming the field.

  Fields missing from `data_cfg` take their default; unknown fields (e.g. from the config of an
  older checkpoint) are logged and ignored. A `DataSettings` is returned unchanged.
  """
  if isinstance(data_cfg, DataSettings):
    return data_cfg
  values = default_data_config().to_dict()
  unknown = []
  for key in data_cfg.keys():
    if key in values:
      values[key] = data_cfg[key]
    else:
      unknown.append(key)
  if unknown:
    log.warning("ignoring unknown config.data field(s) %s", sorted(unknown))
  types = {f.name: f.type for f in dataclasses.fields(DataSettings)}
  for key, value in values.items():
    if types[key] == "int":
      values[key] = _integer(key, value)
    elif types[key] == "bool":
      values[key] = bool(value)
  values["vision"] = _choice("vision", values["vision"], VISION_KINDS)
  values["aspect_mode"] = _choice("aspect_mode", values["aspect_mode"] or "", ASPECT_MODES)
  values["image_processor"] = values["image_processor"] or ""  # configs/hf.py sets it
  values["chat_template"] = values["chat_template"] or ""
  values["image_start"], values["image_end"] = values["image_start"] or "", values["image_end"] or ""
  grid = values["deepstack_grid"]
  values["deepstack_grid"] = None if grid is None else tuple(grid)
  values["deepstack_grid_mode"] = _choice(
      "deepstack_grid_mode", values["deepstack_grid_mode"], vision.DEEPSTACK_GRID_MODES
  )
  return DataSettings(**values)


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the `config.data` field whose value cannot work (before anything runs)."""
  resolve(cfg)
