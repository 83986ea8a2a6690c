"""The data block of an experiment config (`ml_collections.ConfigDict`)."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


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


def validate_data_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the `config.data` field whose value cannot work (before anything runs)."""
  for name, low in (("global_batch_size", 1), ("seq_len", 1), ("num_workers", 0), ("max_images", 0),
                    ("image_size", 1), ("read_threads", 1), ("worker_buffer_size", 1)):
    value = cfg.get(name, None)
    if value is None:
      continue
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"config.data.{name}={value!r}: must be an integer >= {low}")
