"""Shared fixtures of the data tests: the tiny tokenizer and a tiny synthetic_vqa build."""

from __future__ import annotations

import io
import types

import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
  from llvm_jax.data.tokenizer import build_tiny_tokenizer

  return build_tiny_tokenizer(
      tmp_path_factory.mktemp("tiny_tokenizer"), extra_words=["Describe the picture briefly", "A cat sits on a mat"]
  )


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
  from transformers import AutoTokenizer

  return AutoTokenizer.from_pretrained(tokenizer_dir)


SYNTH_COUNTS = {"train": 24, "validation": 13, "test": 8}


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> str:
  """synthetic_vqa config 'unittest' (24/13/8 samples, 32 px) built into a temporary data_dir."""
  from llvm_jax.data import builders

  data_dir = tmp_path_factory.mktemp("tfds")
  cfg = builders.SyntheticVqaConfig(
      name="unittest",
      num_train=SYNTH_COUNTS["train"],
      num_validation=SYNTH_COUNTS["validation"],
      num_test=SYNTH_COUNTS["test"],
      image_size=32,
      mc_fraction=0.3,
      seed=7,
  )
  builders.build_dataset("synthetic_vqa", data_dir, cfg)
  return str(data_dir)


def png_bytes(color=(255, 0, 0), size=(16, 16)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return buf.getvalue()


def jpeg_bytes(color=(0, 0, 255), size=(20, 12)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="JPEG")
  return buf.getvalue()


def data_config(**overrides):
  from llvm_jax.data.config import default_data_config

  cfg = default_data_config()
  cfg.image_size = 16
  cfg.seq_len = 64
  cfg.global_batch_size = 4
  cfg.shuffle = False
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope="session")
def dh():
  """Helper functions (a fixture, so test modules need not import this conftest)."""
  return types.SimpleNamespace(
      png_bytes=png_bytes, jpeg_bytes=jpeg_bytes, data_config=data_config, synth_counts=SYNTH_COUNTS
  )
