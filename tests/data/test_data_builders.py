"""TFDS builders: ArrayRecord round trips from generated local files, skip reports, strict mode."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import tensorflow_datasets as tfds

from llvm_jax.data import builders, records
from llvm_jax.data import synthetic as S
from llvm_jax.data.records import BadRecordError


def _text(x):
  return x.decode() if isinstance(x, bytes) else x


def test_synthetic_round_trip(synthetic_dir, dh):
  SYNTH_COUNTS = dh.synth_counts
  spec = S.SyntheticSpec(image_size=32, mc_fraction=0.3)
  for split, n in SYNTH_COUNTS.items():
    source = tfds.data_source("synthetic_vqa/unittest", split=split, data_dir=synthetic_dir, download=False)
    assert len(source) == n
    ids = set()
    for k in range(n):
      rec = source[k]
      rid = _text(rec["id"])
      ids.add(rid)
      index = int(rid.split("_")[-1])
      expected = S.draw_sample(S.sample_seed(7, split, index), spec)
      assert rec["image"] == S.encode_png(expected["image"])
      img = np.asarray(records.decode_image(rec["image"]))
      assert np.array_equal(img, expected["image"])
      assert _text(rec["question"]) == expected["question"]
      assert _text(rec["answer"]) == expected["answer"]
      assert [_text(o) for o in rec["options"]] == expected["options"]
      assert _text(rec["question_type"]) == expected["question_type"]
      assert bool(rec["multiple_choice"]) == expected["multiple_choice"]
      assert int(rec["num_objects"]) == len(expected["objects"])
    assert ids == {f"{split}_{i:06d}" for i in range(n)}
  report = json.loads((builders.dataset_dir("synthetic_vqa/unittest", synthetic_dir) / "skip_report.json").read_text())
  assert report["train"] == {"written": SYNTH_COUNTS["train"], "skipped": {}, "skipped_ids": {}}


def test_synthetic_build_is_deterministic(tmp_path, synthetic_dir):
  cfg = builders.SyntheticVqaConfig(
      name="unittest", num_train=24, num_validation=13, num_test=8, image_size=32, mc_fraction=0.3, seed=7
  )
  builders.build_dataset("synthetic_vqa", tmp_path, cfg)
  a = tfds.data_source("synthetic_vqa/unittest", split="validation", data_dir=synthetic_dir, download=False)
  b = tfds.data_source("synthetic_vqa/unittest", split="validation", data_dir=str(tmp_path), download=False)
  assert [a[i]["id"] for i in range(len(a))] == [b[i]["id"] for i in range(len(b))]
  assert all(a[i]["image"] == b[i]["image"] and a[i]["question"] == b[i]["question"] for i in range(len(a)))


def test_registered_configs():
  names = {c.name: c for c in builders.SyntheticVqa.BUILDER_CONFIGS}
  assert set(names) >= {"tiny", "small"} and names["tiny"].image_size == 32
  assert {c.name for c in builders.LlavaInstruct.BUILDER_CONFIGS} >= {"default", "pretrain", "sft"}
  assert builders.Preference.name == "preference" and builders.LlavaInstruct.name == "llava_instruct"


# -- llava_instruct ------------------------------------------------------------------------------
def _write(path, data, jsonl=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  if jsonl:
    path.write_text("\n".join(json.dumps(r) for r in data) + "\n")
  else:
    path.write_text(json.dumps(data))


@pytest.fixture
def llava_files(tmp_path, dh):
  root = tmp_path / "manual"
  (root / "imgs").mkdir(parents=True)
  red, blue, green = dh.png_bytes((255, 0, 0)), dh.jpeg_bytes((0, 0, 255)), dh.png_bytes((0, 255, 0), (10, 30))
  (root / "imgs" / "red.png").write_bytes(red)
  (root / "imgs" / "blue.jpg").write_bytes(blue)
  (root / "imgs" / "green.png").write_bytes(green)
  (root / "imgs" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  good = [
      {
          "id": "cap1",
          "image": "imgs/red.png",
          "conversations": [
              {"from": "human", "value": "<image>\nDescribe the picture briefly."},
              {"from": "gpt", "value": "A red square."},
          ],
      },
      {
          "id": 17,
          "image": "imgs/blue.jpg",
          "conversations": [  # no marker: the pipeline prepends it
              {"from": "human", "value": "What color is it?"},
              {"from": "gpt", "value": "blue"},
              {"from": "human", "value": "Is it dark?"},
              {"from": "gpt", "value": "yes"},
          ],
      },
      {
          "id": "multi",
          "image": ["imgs/red.png", "imgs/green.png"],
          "conversations": [
              {"from": "human", "value": "<image> and <image>: same color?"},
              {"from": "gpt", "value": "no"},
          ],
      },
      {"id": "textonly", "conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"}]},
  ]
  bad = [
      {"id": "bad_missing", "image": "imgs/nothere.png", "conversations": good[0]["conversations"]},
      {"id": "bad_corrupt", "image": "imgs/corrupt.jpg", "conversations": good[0]["conversations"]},
      {"id": "bad_empty", "image": "imgs/red.png", "conversations": []},
      {
          "id": "bad_roles",
          "image": "imgs/red.png",
          "conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "<image> hi"}],
      },
      {
          "id": "bad_markers",
          "image": "imgs/red.png",
          "conversations": [{"from": "human", "value": "<image> <image> two?"}, {"from": "gpt", "value": "one"}],
      },
      {
          "id": "bad_noanswer",
          "image": "imgs/red.png",
          "conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "   "}],
      },
  ]
  return root, good, bad, {"red": red, "blue": blue, "green": green}


def test_llava_instruct_round_trip_and_skip_report(tmp_path, llava_files, caplog):
  root, good, bad, imgs = llava_files
  train = good[:2] + bad + good[2:3]
  _write(root / "a.json", train)
  _write(root / "b.jsonl", good[3:], jsonl=True)
  _write(root / "val.json", good[:1])
  cfg = builders.LlavaInstructConfig(
      name="t_files", json_files={"train": ["a.json", "b.jsonl"], "validation": "val.json"}
  )
  with caplog.at_level(logging.INFO, logger="llvm_jax.data"):
    b = builders.build_dataset("llava_instruct", tmp_path / "tfds", cfg, manual_dir=root)
  src = b.as_data_source("train")
  assert len(src) == 4 and len(b.as_data_source("validation")) == 1
  got = {_text(src[i]["id"]): src[i] for i in range(len(src))}
  assert set(got) == {"cap1", "17", "multi", "textonly"}
  assert list(got["cap1"]["images"]) == [imgs["red"]]
  assert list(got["17"]["images"]) == [imgs["blue"]]  # JPEG bytes stored unchanged
  assert list(got["multi"]["images"]) == [imgs["red"], imgs["green"]]
  assert list(got["textonly"]["images"]) == []
  assert [_text(p) for p in got["multi"]["image_paths"]] == ["imgs/red.png", "imgs/green.png"]
  conv = got["17"]["conversations"]
  assert [_text(x) for x in conv["from"]] == ["human", "gpt", "human", "gpt"]
  assert [_text(x) for x in conv["value"]] == [t["value"] for t in good[1]["conversations"]]

  report = b.skip_reports["train"]
  assert report.written == 4
  assert dict(report.counts) == {
      "missing_image": 1,
      "corrupt_image": 1,
      "empty_conversation": 1,
      "malformed_conversation": 3,
  }
  assert report.ids["malformed_conversation"] == ["bad_roles", "bad_markers", "bad_noanswer"]
  for rid in ("bad_missing", "bad_corrupt", "bad_empty", "bad_roles", "bad_markers", "bad_noanswer"):
    assert any(rid in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records), rid
  out = " ".join(r.getMessage() for r in caplog.records)  # the split's summary is logged
  assert "wrote 4 examples, skipped 6" in out and "missing_image=1" in out
  saved = json.loads((b.data_path / "skip_report.json").read_text())
  assert saved["train"]["skipped"]["corrupt_image"] == 1 and saved["validation"]["skipped"] == {}


@pytest.mark.parametrize(
    "bad_index,reason",
    [(0, "missing_image"), (1, "corrupt_image"), (2, "empty_conversation"), (3, "malformed_conversation")],
)
def test_llava_instruct_strict_raises_with_record_id(tmp_path, llava_files, bad_index, reason):
  root, good, bad, _ = llava_files
  _write(root / "train.json", good[:1] + [bad[bad_index]])
  with pytest.raises(BadRecordError, match=f"{bad[bad_index]['id']}.*{reason}"):
    builders.build_dataset(
        "llava_instruct", tmp_path / "tfds", builders.LlavaInstructConfig(name="t_strict", strict=True), manual_dir=root
    )


def test_llava_instruct_manual_dir_discovery(tmp_path, llava_files):
  root, good, _, imgs = llava_files
  _write(root / "train.jsonl", good, jsonl=True)
  _write(root / "test.json", good[:2])
  b = builders.build_dataset("llava_instruct", tmp_path / "tfds", "default", manual_dir=root)
  assert set(b.info.splits) == {"train", "test"}
  assert b.info.splits["train"].num_examples == 4 and b.info.splits["test"].num_examples == 2
  # reading by name from the data_dir, as the pipeline does
  src = tfds.data_source("llava_instruct/default", split="test", data_dir=str(tmp_path / "tfds"), download=False)
  assert sorted(_text(src[i]["id"]) for i in range(2)) == ["17", "cap1"]


def test_llava_instruct_without_inputs_fails_clearly(tmp_path):
  with pytest.raises(ValueError, match="manual dir"):
    builders.build_dataset("llava_instruct", tmp_path / "tfds", builders.LlavaInstructConfig(name="t_none"))


# -- preference ----------------------------------------------------------------------------------
def test_preference_round_trip_and_skips(tmp_path, dh, caplog):
  root = tmp_path / "pref"
  root.mkdir()
  (root / "a.png").write_bytes(dh.png_bytes((1, 2, 3)))
  data = [
      {
          "id": "p1",
          "image": "a.png",
          "question": "<image>\nWhat is shown?",
          "chosen": "A small square.",
          "rejected": "A cat sits on a mat.",
      },
      {"id": "p2", "image": "a.png", "question": "Is it dark?", "chosen": "yes", "rejected": "no"},
      {"id": "p_same", "image": "a.png", "question": "Q?", "chosen": "same", "rejected": "same"},
      {"id": "p_empty", "image": "a.png", "question": "Q?", "chosen": "x", "rejected": ""},
      {"id": "p_missing", "image": "b.png", "question": "Q?", "chosen": "x", "rejected": "y"},
      {"id": "p_nofield", "image": "a.png", "question": "Q?", "chosen": "x"},
  ]
  _write(root / "train.json", data)
  with caplog.at_level(logging.INFO, logger="llvm_jax.data"):
    b = builders.build_dataset("preference", tmp_path / "tfds", "default", manual_dir=root)
  src = tfds.data_source("preference/default", split="train", data_dir=str(tmp_path / "tfds"), download=False)
  got = {_text(src[i]["id"]): src[i] for i in range(len(src))}
  assert set(got) == {"p1", "p2"}
  assert _text(got["p1"]["chosen"]) == "A small square." and _text(got["p1"]["rejected"]) == "A cat sits on a mat."
  assert _text(got["p2"]["question"]) == "Is it dark?" and list(got["p2"]["images"]) == [dh.png_bytes((1, 2, 3))]
  assert dict(b.skip_reports["train"].counts) == {"malformed_record": 3, "missing_image": 1}
  assert b.skip_reports["train"].ids["malformed_record"] == ["p_same", "p_empty", "p_nofield"]
  assert any("skipped 4" in r.getMessage() for r in caplog.records)
  with pytest.raises(BadRecordError, match="p_same"):
    builders.build_dataset("preference", tmp_path / "tfds2", "default", manual_dir=root, strict=True)


def test_build_cli_with_overrides(tmp_path, capsys):
  from llvm_jax.data import build

  assert (
      build.main(
          [
              "synthetic_vqa",
              "--data_dir",
              str(tmp_path),
              "--config",
              "cli",
              "--set",
              "num_train=5",
              "--set",
              "num_validation=2",
              "--set",
              "num_test=3",
              "--set",
              "image_size=16",
          ]
      )
      == 0
  )
  out = capsys.readouterr().out
  assert "synthetic_vqa/cli train: 5 examples" in out and "test: 3 examples" in out
  assert "split 'train': wrote 5 examples, skipped 0" in out  # the skip report of each split
  src = tfds.data_source("synthetic_vqa/cli", split="train", data_dir=str(tmp_path), download=False)
  assert records.decode_image(src[0]["image"]).size == (16, 16)
  with pytest.raises(SystemExit):
    build.main(["synthetic_vqa", "--data_dir", str(tmp_path), "--config", "small", "--set", "num_train=5"])


def test_synthetic_preference_triples_come_from_the_vqa_samples(tmp_path):
  source = builders.SyntheticVqaConfig(name="src", num_train=30, image_size=32, mc_fraction=0.3, seed=5)
  cfg = builders.SyntheticPreferenceConfig(name="unittest", source=source, rejected="ambiguous", num_train=30)
  builders.build_dataset("synthetic_preference", tmp_path, cfg)
  data = tfds.data_source("synthetic_preference/unittest", split="train", data_dir=str(tmp_path), download=False)
  assert len(data) == 30
  for k in range(len(data)):
    rec = data[k]
    index = int(_text(rec["id"]).split("_")[-1])
    sample = S.draw_sample(S.sample_seed(5, "train", index), source.spec())
    assert rec["image"] == S.encode_png(sample["image"])
    assert _text(rec["question"]) == sample["question"] and _text(rec["chosen"]) == sample["answer"]
    rejected = _text(rec["rejected"])
    assert f" {S.AMBIGUOUS_JOINER} " in rejected and sample["answer"] in rejected.split(f" {S.AMBIGUOUS_JOINER} ")
    # The pipeline reads it as a preference record (chosen, rejected).
    assert records.to_example({**rec, "images": [rec["image"]]}).is_preference
  with pytest.raises(ValueError, match="unknown synthetic_vqa config 'nope'"):
    builders.build_dataset(
        "synthetic_preference", tmp_path / "bad", builders.SyntheticPreferenceConfig(name="bad", source="nope")
    )
