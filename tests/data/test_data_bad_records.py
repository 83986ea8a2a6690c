"""Issue #17 (data side): hostile records never abort a build (skipped and counted, naming the record or
file:line), and high-bit-depth images convert to 8-bit RGB with their brightness."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
from PIL import Image

from llvm_jax.data import builders, records

CONV = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]


def _build(tmp_path, name, files, root, **cfg):
  config = builders.LlavaInstructConfig(name=name, json_files={"train": files}, **cfg)
  return builders.build_dataset("llava_instruct", tmp_path / "tfds", config, manual_dir=root)


@pytest.fixture
def root(tmp_path, dh):
  root = tmp_path / "manual"
  (root / "imgs" / "a_dir.png").mkdir(parents=True)  # row 6: an `image` path that is a directory
  (root / "imgs" / "red.png").write_bytes(dh.png_bytes((255, 0, 0)))
  return root


def test_directory_image_and_lone_surrogate_are_skipped_with_their_ids(tmp_path, root):
  data = [
      {"id": "good", "image": "imgs/red.png", "conversations": CONV},
      {"id": "dir", "image": "imgs/a_dir.png", "conversations": CONV},  # row 6
      {
          "id": "surrogate",
          "image": "imgs/red.png",
          "conversations": [CONV[0], {"from": "gpt", "value": "red \ud800"}],  # row 7
      },
      {"id": "bad\udc00id", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
      {
          "id": "dict_form",
          "image": "imgs/red.png",
          "conversations": {"from": ["human", "gpt"], "value": ["<image> q", "a"]},
      },
  ]
  # json.dumps writes "\ud800" as the escape, which json.loads turns back into a lone surrogate.
  (root / "train.json").write_text(json.dumps(data))
  b = _build(tmp_path, "t_bad", ["train.json"], root)
  report = b.skip_reports["train"]
  assert report.written == 2  # good and dict_form (TFDS's dict-of-lists conversation form)
  assert report.ids["missing_image"] == ["dir"]
  assert report.ids["malformed_conversation"] == ["surrogate"]
  assert report.ids["malformed_record"] == ["bad\\udc00id"]


def test_jsonl_bad_lines_are_skipped_naming_file_and_line(tmp_path, root, caplog):
  good = json.dumps({"id": "good", "image": "imgs/red.png", "conversations": CONV}).encode()
  latin1 = json.dumps(
      {"id": "latin", "conversations": [{"from": "human", "value": "caf\u00e9?"}, {"from": "gpt", "value": "oui"}]},
      ensure_ascii=False,
  )
  lines = [good, latin1.encode("latin-1"), b"", b'{"id": "torn", "conversations": [', good.replace(b"good", b"good2")]
  (root / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  with caplog.at_level("WARNING", logger="llvm_jax.data"):
    b = _build(tmp_path, "t_jsonl", ["train.jsonl"], root)
  report = b.skip_reports["train"]
  assert report.written == 2 and report.ids["malformed_record"] == ["train.jsonl:2", "train.jsonl:4"]
  messages = " ".join(r.getMessage() for r in caplog.records)
  assert "train.jsonl:2: not UTF-8" in messages and "train.jsonl:4: not JSON" in messages


def test_malformed_json_list_fails_naming_file_and_line(tmp_path, root):
  (root / "train.json").write_text('[\n{"id": "a"},\n{"id": oops}\n]')
  with pytest.raises(ValueError, match=r"train.json:3:\d+: invalid JSON"):
    _build(tmp_path, "t_badjson", ["train.json"], root)


def _random_value(rng: random.Random, depth: int = 0):
  kind = rng.randrange(11 if depth < 2 else 8)
  if kind == 0:
    return None
  if kind == 1:
    return rng.choice([0, -1, 2**70, 3.5, float("nan"), True])
  if kind == 2:
    return "x" * rng.choice([0, 1, 100_000])
  if kind == 3:
    return rng.choice(
        [
            "\ud800",
            "a\udfffb",
            "<image>",
            "<image><image>",
            "</s>",
            "\x00",
            "imgs/red.png",
            "imgs/a_dir.png",
            "../../etc/passwd",
            "/",
            "",
        ]
    )
  if kind == 4:
    return rng.choice(["human", "gpt", "system", "HUMAN", "bot"])
  if kind == 5:
    return list(CONV)
  if kind == 6:
    return {"from": "human", "value": rng.choice(["<image> q", "q", 5, None])}
  if kind == 7:
    return rng.choice([[], {}, [None], [""], ["imgs/red.png", "imgs/red.png"]])
  if kind == 8:
    return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
  if kind == 9:
    return {rng.choice(["from", "value", "id", "image"]): _random_value(rng, depth + 1) for _ in range(3)}
  return [{"from": _random_value(rng, depth + 1), "value": _random_value(rng, depth + 1)} for _ in range(2)]


def test_random_json_in_any_field_never_aborts_a_build(tmp_path, root):
  # Property-style (seeded): every record either builds or is skipped and counted.
  rng = random.Random(17)
  base = {"id": "r", "image": "imgs/red.png", "conversations": CONV}
  data = []
  for i in range(300):
    rec = dict(base, id=f"r{i}")
    for field in rng.sample(["id", "image", "conversations", "extra"], rng.randrange(1, 3)):
      rec[field] = _random_value(rng)
    if rng.random() < 0.05:
      rec = _random_value(rng)  # not even an object
    data.append(rec)
  (root / "train.json").write_text(json.dumps(data))
  b = _build(tmp_path, "t_random", ["train.json"], root)
  report = b.skip_reports["train"]
  assert report.written + report.total == len(data)
  assert 0 < report.written < len(data)
  assert len(b.as_data_source("train")) == report.written


# -- row 9: high-bit-depth images ----------------------------------------------------------------
def _encode(img: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format=fmt)
  return buf.getvalue()


def _gradient(h=16, w=24):
  return np.linspace(0.0, 1.0, h * w).reshape(h, w)  # brightness 0..1, mean 0.5


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("I;16", "PNG"),
        ("I;16", "TIFF"),
        ("I", "TIFF"),
        ("F", "TIFF"),
        ("I;16B", None),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("CMYK", "TIFF"),
        ("1", "PNG"),
    ],
)
def test_high_bit_depth_images_keep_their_brightness(mode, fmt):
  g = _gradient()
  if mode in ("I;16", "I;16B"):
    img = (
        Image.fromarray((g * 65535).astype(np.uint16)).convert(mode)
        if mode == "I;16"
        else Image.frombytes("I;16B", g.shape[::-1], (g * 65535).astype(">u2").tobytes())
    )
  elif mode == "I":
    img = Image.fromarray((g * 65535).astype(np.int32))  # a 16-bit PNG read as mode I
  elif mode == "F":
    img = Image.fromarray(g.astype(np.float32))
  elif mode == "1":
    img = Image.fromarray((g > 0.5).astype(np.uint8) * 255).convert("1")
    g = (g > 0.5).astype(float)
  else:
    img = Image.fromarray((g * 255).astype(np.uint8)).convert(mode)
    if mode == "CMYK":
      g = np.asarray(img.convert("RGB"), float).mean(-1) / 255
  rgb = records.decode_image(_encode(img, fmt or "TIFF"))
  assert rgb.mode == "RGB" and rgb.size == img.size
  out = np.asarray(rgb, np.float64) / 255
  assert abs(out.mean() - g.mean()) < 0.02, (Image.open(io.BytesIO(_encode(img, fmt or "TIFF"))).mode, out.mean())
  assert out.std() > 0.1 or mode == "1"  # a gradient, not a flat white or black image
