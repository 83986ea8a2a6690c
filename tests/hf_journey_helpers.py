"""A tiny random LLaVA `save_pretrained` directory with a trained tokenizer and a processor, and a
LLaVA-format JSON dataset with images, for the HF journey tests (tests/test_hf_journey.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llvm_jax.data import tokenizer as tokenizer_lib

COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "disc")
QUESTIONS = ("What color is the shape?", "Which shape is it?")
# The library's own tiny template (USER/ASSISTANT turns), as an HF tokenizer would carry it.
CHAT_TEMPLATE = tokenizer_lib.CHAT_TEMPLATE
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


def train_tokenizer(out_dir: str) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer trained with `tokenizers` on the dataset's words and the chat words."""
  tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")]
  )
  tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
  corpus = list(QUESTIONS) + list(COLORS) + list(SHAPES) + ["USER: ASSISTANT: a the it is"]
  tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=SPECIAL, min_frequency=1))
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok,
      bos_token="<s>",
      eos_token="</s>",
      unk_token="<unk>",
      pad_token="<pad>",
      extra_special_tokens=["<image>"],
      chat_template=CHAT_TEMPLATE,
      model_max_length=4096,
  )
  fast.save_pretrained(out_dir)
  return fast


def build_llava_dir(out_dir: str, seed: int = 0) -> str:
  """Random LLaVA (CLIP, 3 layers, feature layer -2 so one layer is unused; Llama) + tokenizer + a
  centre-cropping CLIP processor, saved like a hub checkpoint."""
  os.makedirs(out_dir, exist_ok=True)
  tok = train_tokenizer(out_dir)
  image_id = tok.convert_tokens_to_ids("<image>")
  text = transformers.LlamaConfig(
      vocab_size=len(tok) + 3,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=256,
      bos_token_id=tok.bos_token_id,
      eos_token_id=tok.eos_token_id,
      pad_token_id=tok.pad_token_id,
  )
  vision = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=7
  )
  config = transformers.LlavaConfig(
      vision_config=vision,
      text_config=text,
      image_token_id=image_id,
      vision_feature_layer=-2,
      vision_feature_select_strategy="default",
      image_seq_length=16,
  )
  torch.manual_seed(seed)
  model = transformers.LlavaForConditionalGeneration(config).eval()
  model.save_pretrained(out_dir)
  image_processor = transformers.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
  transformers.LlavaProcessor(
      image_processor=image_processor,
      tokenizer=tok,
      patch_size=7,
      vision_feature_select_strategy="default",
      chat_template=CHAT_TEMPLATE,
      num_additional_image_tokens=1,
  ).save_pretrained(out_dir)
  transformers.GenerationConfig(
      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
  ).save_pretrained(out_dir)
  return out_dir


def draw(color: str, shape: str, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
  """A non-square picture: a coloured shape on a noisy grey background."""
  w, h = size
  rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}[color]
  x = rng.integers(90, 140, (h, w, 3)).astype(np.uint8)
  yy, xx = np.mgrid[:h, :w]
  r = min(w, h) // 3
  mask = (
      (np.abs(yy - h // 2) < r) & (np.abs(xx - w // 2) < r)
      if shape == "square"
      else (yy - h // 2) ** 2 + (xx - w // 2) ** 2 < r * r
  )
  x[mask] = rgb
  return Image.fromarray(x)


def build_llava_json(root: str, num_train: int = 24, num_test: int = 6, seed: int = 0) -> str:
  """LLaVA-format train.json / test.json plus PNG images in `root` (the builder's manual dir)."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  for split, n in (("train", num_train), ("test", num_test)):
    records = []
    for i in range(n):
      color, shape = COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]
      size = (int(rng.integers(30, 60)), int(rng.integers(30, 60)))
      name = f"images/{split}{i}.png"
      draw(color, shape, size, rng).save(os.path.join(root, name))
      q = int(rng.integers(len(QUESTIONS)))
      records.append(
          {
              "id": f"{split}{i}",
              "image": name,
              "conversations": [
                  {"from": "human", "value": "<image>\n" + QUESTIONS[q]},
                  {"from": "gpt", "value": color if q == 0 else shape},
              ],
          }
      )
    with open(os.path.join(root, f"{split}.json"), "w") as f:
      json.dump(records, f)
  return root
