"""grain pipeline: batch contract, packing, preference pairs, sharding, determinism, state
save/restore, workers, bad input (skipped + counted + logged, or raised under strict)."""

from __future__ import annotations

import json
import logging

import grain.python as grain
import numpy as np
import pytest

from llvm_jax.data import pipeline
from llvm_jax.data.records import BadRecordError

IMG = "<image>"
TRAIN_KEYS = {"tokens", "segment_ids", "positions", "targets", "target_mask", "images", "image_mask"}


def _synth_cfg(dh, synthetic_dir, **kw):
  base = dict(
      name="synthetic_vqa/unittest",
      data_dir=synthetic_dir,
      image_size=16,
      seq_len=48,
      global_batch_size=4,
      shuffle=True,
      seed=3,
  )
  base.update(kw)
  return dh.data_config(**base)


def _check_row_invariants(b, image_token_id, num_image_tokens):
  """The contract every batch satisfies (rows of (B, S) arrays)."""
  tok, seg, pos, tgt, msk = (b[k] for k in ("tokens", "segment_ids", "positions", "targets", "target_mask"))
  for r in range(tok.shape[0]):
    pad = seg[r] == 0
    assert not tok[r][pad].any() and not pos[r][pad].any() and not tgt[r][pad].any() and not msk[r][pad].any()
    for s in range(1, seg[r].max() + 1):
      idx = np.nonzero(seg[r] == s)[0]
      assert (np.diff(idx) == 1).all()  # contiguous
      np.testing.assert_array_equal(pos[r][idx], np.arange(len(idx)))
      np.testing.assert_array_equal(tgt[r][idx[:-1]], tok[r][idx[1:]])
      assert tgt[r][idx[-1]] == 0 and msk[r][idx[-1]] == 0
      assert msk[r][idx].sum() > 0  # every sample trains on some answer
    # the model's check: image tokens == used slots x tokens per image
    assert (tok[r] == image_token_id).sum() == b["image_mask"][r].sum() * num_image_tokens
    assert not b["images"][r][~b["image_mask"][r]].any()
    assert not msk[r][tok[r] == image_token_id].any()


def test_train_batches_follow_the_contract(tokenizer, dh, synthetic_dir):
  it = pipeline.make_iterator(_synth_cfg(dh, synthetic_dir), tokenizer, num_image_tokens=4, image_token=IMG)
  image_id = tokenizer.convert_tokens_to_ids(IMG)
  for _ in range(8):  # 32 rows > 24 records: runs into the second epoch
    b = next(it)
    assert set(b) == TRAIN_KEYS
    assert b["tokens"].shape == (4, 48) and b["tokens"].dtype == np.int32
    for k in ("segment_ids", "positions", "targets"):
      assert b[k].shape == (4, 48) and b[k].dtype == np.int32
    assert b["target_mask"].dtype == np.float32
    assert b["images"].shape == (4, 1, 16, 16, 3) and b["images"].dtype == np.float32
    assert b["image_mask"].dtype == bool and b["image_mask"].all()
    assert b["segment_ids"].max() == 1
    _check_row_invariants(b, image_id, 4)
  assert it.stats["examples"] == 32 and it.stats["batches"] == 8


def test_eval_mode_prompt_only_with_answers(tokenizer, dh, synthetic_dir):
  import tensorflow_datasets as tfds

  cfg = _synth_cfg(dh, synthetic_dir, split="validation", shuffle=False)
  it = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=2, image_token=IMG, mode="eval")
  src = tfds.data_source("synthetic_vqa/unittest", split="validation", data_dir=synthetic_dir, download=False)
  truth = {src[i]["id"].decode(): src[i] for i in range(len(src))}
  batches = list(it)
  assert len(batches) == 4  # 13 records, batch 4: the last batch has one padding row
  seen = []
  for b in batches:
    assert set(b) == TRAIN_KEYS | {"id", "question", "answer", "options"}
    assert not b["target_mask"].any()
    for r, rid in enumerate(b["id"]):
      if not rid:
        assert not b["segment_ids"][r].any() and not b["image_mask"][r].any()
        continue
      seen.append(rid)
      rec = truth[rid]
      assert b["answer"][r] == rec["answer"].decode()
      assert b["question"][r] == "<image>\n" + rec["question"].decode()  # the first user turn
      assert [o for o in b["options"][r] if o] == [o.decode() for o in rec["options"]]
      n = b["segment_ids"][r].sum()
      assert tokenizer.convert_ids_to_tokens(b["tokens"][r][n - 2 : n].tolist()) == ["ASSISTANT", ":"]
      assert b["image_mask"][r].sum() == 1
  assert sorted(seen) == sorted(truth)
  assert batches[-1]["id"].tolist().count("") == 3


def test_packing(tokenizer, dh, synthetic_dir):
  kw = dict(seq_len=96, max_images=3, shuffle=False)
  flat = pipeline.make_iterator(_synth_cfg(dh, synthetic_dir, **kw), tokenizer, num_image_tokens=4, image_token=IMG)
  packed = pipeline.make_iterator(
      _synth_cfg(dh, synthetic_dir, packing=True, **kw), tokenizer, num_image_tokens=4, image_token=IMG
  )
  image_id = tokenizer.convert_tokens_to_ids(IMG)
  # the packed rows hold the same samples, in order
  flat_samples, flat_images = [], []
  for _ in range(6):
    b = next(flat)
    for r in range(4):
      n = b["segment_ids"][r].sum()
      flat_samples.append(b["tokens"][r][:n].tolist())
      flat_images.append(b["images"][r, 0])
  packed_samples, packed_images = [], []
  b = next(packed)
  assert b["segment_ids"].max() == 3 and b["image_mask"].sum() > 4
  _check_row_invariants(b, image_id, 4)
  for r in range(4):
    assert b["image_mask"][r].sum() == b["segment_ids"][r].max()  # one image per packed sample
    for s in range(1, b["segment_ids"][r].max() + 1):
      packed_samples.append(b["tokens"][r][b["segment_ids"][r] == s].tolist())
    packed_images += list(b["images"][r][b["image_mask"][r]])
  # first fit places the first M examples of the stream: the same (tokens, image) pairs as the
  # first M unpacked rows (each image travels with its own sample)
  m = len(packed_samples)
  key = lambda toks, img: (tuple(toks), np.asarray(img).tobytes())  # noqa: E731
  assert sorted(key(t, i) for t, i in zip(packed_samples, packed_images)) == sorted(
      key(t, i) for t, i in zip(flat_samples[:m], flat_images[:m])
  )
  assert packed.stats["examples"] == len(packed_samples)


def test_sharding_simulated_two_processes_disjoint_and_complete(tokenizer, dh, synthetic_dir):
  cfg = _synth_cfg(dh, synthetic_dir, split="validation", global_batch_size=4)
  per_shard, n_batches = [], []
  for i in range(2):
    it = pipeline.make_iterator(
        cfg,
        tokenizer,
        num_image_tokens=2,
        image_token=IMG,
        mode="eval",
        shard_options=grain.ShardOptions(shard_index=i, shard_count=2),
    )
    assert it.local_batch_size == 2
    batches = list(it)
    n_batches.append(len(batches))
    per_shard.append([rid for b in batches for rid in b["id"] if rid])
  a, b = map(set, per_shard)
  assert len(a) == len(per_shard[0]) and len(b) == len(per_shard[1])
  assert not a & b
  assert a | b == {f"validation_{i:06d}" for i in range(13)}
  assert n_batches == [4, 4]  # 7 and 6 records, 2 per batch: both processes return 4 batches
  # training shards too (records split 12/12, each process reshuffles only its own)
  train = [
      pipeline.make_iterator(
          _synth_cfg(dh, synthetic_dir),
          tokenizer,
          num_image_tokens=2,
          image_token=IMG,
          shard_options=grain.ShardOptions(i, 2),
          num_epochs=1,
      )
      for i in range(2)
  ]
  # a sample's identity: its tokens and its image (questions repeat, images do not)
  rows = [
      [
          bt["tokens"][r].tobytes() + bt["images"][r].tobytes()
          for bt in t
          for r in range(2)
          if bt["segment_ids"][r].any()
      ]
      for t in train
  ]
  assert len(rows[0]) == len(rows[1]) == 12 and len(set(rows[0]) | set(rows[1])) == 24


def test_deterministic_and_seeded(tokenizer, dh, synthetic_dir):
  def first(seed, n=3):
    it = pipeline.make_iterator(
        _synth_cfg(dh, synthetic_dir, seed=seed), tokenizer, num_image_tokens=2, image_token=IMG
    )
    return [next(it) for _ in range(n)]

  a, b, c = first(3), first(3), first(4)
  assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
  assert not all(np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


def _same(xs, ys):
  return len(xs) == len(ys) and all(
      set(x) == set(y) and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(xs, ys)
  )


@pytest.mark.parametrize("packing", [False, True])
def test_restored_iterator_yields_the_same_next_batches(tokenizer, dh, synthetic_dir, packing):
  cfg = _synth_cfg(dh, synthetic_dir, packing=packing, seq_len=96, max_images=3)
  it = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=4, image_token=IMG)
  for _ in range(2):
    next(it)
  state = it.get_state()
  assert isinstance(state, bytes) and json.loads(state)["version"] == 1
  expected = [next(it) for _ in range(4)]  # crosses the epoch boundary
  fresh = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=4, image_token=IMG)
  fresh.set_state(state)
  assert _same([next(fresh) for _ in range(4)], expected)
  assert fresh.stats == it.stats
  # and the original iterator can rewind as well
  it.set_state(state)
  assert _same([next(it) for _ in range(4)], expected)


def test_state_through_grain_checkpoint_handler(tmp_path, tokenizer, dh, synthetic_dir):
  from etils import epath
  from grain.checkpoint import CheckpointHandler

  cfg = _synth_cfg(dh, synthetic_dir, packing=True, seq_len=96, max_images=3)
  it = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=4, image_token=IMG)
  next(it)
  handler = CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=it)
  expected = [next(it) for _ in range(2)]
  fresh = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=4, image_token=IMG)
  handler.restore(epath.Path(tmp_path), item=fresh)
  assert _same([next(fresh) for _ in range(2)], expected)


def test_worker_processes_give_the_same_batches_and_state(tokenizer_dir, dh, synthetic_dir):
  cfg0 = _synth_cfg(dh, synthetic_dir, packing=True, seq_len=96, max_images=3)
  cfg1 = _synth_cfg(dh, synthetic_dir, packing=True, seq_len=96, max_images=3, num_workers=1)
  ref = pipeline.make_iterator(cfg0, tokenizer_dir, num_image_tokens=4, image_token=IMG)
  expected = [next(ref) for _ in range(4)]
  it = pipeline.make_iterator(cfg1, tokenizer_dir, num_image_tokens=4, image_token=IMG)
  try:
    assert _same([next(it) for _ in range(2)], expected[:2])
    state = it.get_state()
    assert _same([next(it) for _ in range(2)], expected[2:])
    it.set_state(state)
    assert _same([next(it) for _ in range(2)], expected[2:])
  finally:
    it.close()


def test_make_global_batch_single_process(tokenizer, dh, synthetic_dir):
  import jax

  mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
  cfg = _synth_cfg(dh, synthetic_dir, split="validation")
  it = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=2, image_token=IMG, mode="eval", mesh=mesh)
  b = next(it)
  assert isinstance(b["tokens"], jax.Array) and b["tokens"].shape == (4, 48)
  assert b["tokens"].sharding.spec[0] == ("data", "fsdp")
  assert isinstance(b["id"], np.ndarray) and b["id"].dtype.kind == "U"
  local = pipeline.make_global_batch({"x": np.arange(8, dtype=np.int32).reshape(4, 2)}, jax.make_mesh((1,), ("data",)))
  np.testing.assert_array_equal(np.asarray(local["x"]), np.arange(8).reshape(4, 2))
  with pytest.raises(ValueError, match="data axes"):
    pipeline.make_global_batch({"x": np.zeros((4,))}, jax.make_mesh((1,), ("model",)))


def test_preference_batches(tokenizer, dh):
  img = dh.png_bytes((200, 10, 10))
  recs = [
      {
          "id": f"p{i}",
          "images": [img],
          "question": "<image>\nWhat color is the shape in the top left?",
          "chosen": "red",
          "rejected": "blue green",
      }
      for i in range(3)
  ]
  cfg = dh.data_config(seq_len=40, global_batch_size=2)
  it = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=3, image_token=IMG, source=recs, num_epochs=1)
  b = next(it)
  for k in ("tokens", "segment_ids", "positions", "targets", "target_mask"):
    assert b[k].shape == (2, 2, 40)
  assert b["images"].shape == (2, 1, 16, 16, 3) and b["image_mask"].all()
  chosen, rejected = b["tokens"][0, 0], b["tokens"][0, 1]
  assert tokenizer.convert_ids_to_tokens(b["targets"][0, 0][b["target_mask"][0, 0] > 0].tolist()) == ["red", "</s>"]
  assert tokenizer.convert_ids_to_tokens(b["targets"][0, 1][b["target_mask"][0, 1] > 0].tolist()) == [
      "blue",
      "green",
      "</s>",
  ]
  prompt = np.nonzero(b["target_mask"][0, 0])[0][0] + 1  # first answer token position
  np.testing.assert_array_equal(chosen[:prompt], rejected[:prompt])
  for ch in range(2):
    _check_row_invariants({k: (v[:, ch] if v.ndim == 3 and k != "image_mask" else v) for k, v in b.items()}, 4, 3)
  last = next(it)  # 3 records, batch 2: one padding row
  assert last["segment_ids"][1].sum() == 0 and not last["image_mask"][1].any()


def test_deepstack_and_internvl_batches(tokenizer, dh):
  wide = dh.png_bytes((0, 255, 0), (64, 32))
  recs = [
      {
          "id": "w",
          "images": [wide],
          "conversations": [
              {"from": "human", "value": "<image>\nWhat color is the shape in the top left?"},
              {"from": "gpt", "value": "green"},
          ],
      }
  ]
  cfg = dh.data_config(
      seq_len=64,
      global_batch_size=1,
      vision="internvl",
      image_size=16,
      max_tiles=4,
      max_images=5,
      deepstack_grid=(2, 2),
  )
  b = next(pipeline.make_iterator(cfg, tokenizer, num_image_tokens=2, image_token=IMG, source=recs, num_epochs=1))
  assert b["images"].shape == (1, 5, 16, 16, 3) and b["image_mask"].tolist() == [[True, True, True, False, False]]
  assert (b["tokens"][0] == tokenizer.convert_tokens_to_ids(IMG)).sum() == 3 * 2  # 2 tiles + thumbnail
  assert b["hires_images"].shape == (1, 5, 4, 16, 16, 3)
  assert b["hires_images"][0, :3].any() and not b["hires_images"][0, 3:].any()


def test_deepstack_aspect_grid_batches(tokenizer, dh):
  import jax

  from llvm_jax.data.config import resolve

  recs = [
      {"id": i, "images": [dh.png_bytes((0, 255, 0), size)], "conversations": _conv()}
      for i, size in enumerate([(64, 16), (16, 16)])  # wide -> (1, 4); square -> (2, 2)
  ]
  cfg = dh.data_config(global_batch_size=2, max_images=2, deepstack_grid=(2, 2), deepstack_grid_mode="aspect")
  mesh = jax.make_mesh((1,), ("data",))
  b = next(
      pipeline.make_iterator(cfg, tokenizer, num_image_tokens=2, image_token=IMG, source=recs, num_epochs=1, mesh=mesh)
  )
  assert b["hires_images"].shape == (2, 2, 4, 16, 16, 3)
  assert isinstance(b["hires_grid"], jax.Array) and b["hires_grid"].dtype == np.int32
  assert np.asarray(b["hires_grid"]).tolist() == [[[1, 4], [0, 0]], [[2, 2], [0, 0]]]  # unused slots: 0
  fixed = next(
      pipeline.make_iterator(
          dh.data_config(global_batch_size=2, deepstack_grid=(2, 2)),
          tokenizer,
          num_image_tokens=2,
          image_token=IMG,
          source=recs,
          num_epochs=1,
      )
  )
  assert "hires_grid" not in fixed
  with pytest.raises(ValueError, match="config.data.deepstack_grid_mode='best'.*fixed"):
    resolve(dh.data_config(deepstack_grid_mode="best"))


# -- bad input -----------------------------------------------------------------------------------
def _conv(q="What color is the shape in the top left?", a="red"):
  return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


BAD = {
    "corrupt_image": {"id": "b_corrupt", "images": [b"\x89PNG\r\n\x1a\n broken"], "conversations": _conv()},
    "missing_image": {"id": "b_missing", "images": [b""], "conversations": _conv()},
    "empty_conversation": {"id": "b_empty", "images": [], "conversations": []},
    "malformed_conversation": {
        "id": "b_malformed",
        "images": [],
        "conversations": [{"from": "human", "value": "hi"}, {"from": "human", "value": "?"}],
    },
    "answer_truncated": {"id": "b_long", "images": [], "conversations": _conv(q=" ".join(["shape"] * 60))},
    "image_truncated": {
        "id": "b_late_image",
        "images": [None],
        "conversations": _conv(q=" ".join(["shape"] * 60) + " <image>"),
    },
    "too_many_images": {"id": "b_many", "images": [None, None, None], "conversations": _conv()},
    "malformed_record": {"id": "b_record", "images": [], "question": "What?"},
}


@pytest.fixture
def bad_records(dh):
  img = dh.png_bytes((255, 0, 0))
  out = {}
  for reason, rec in BAD.items():
    rec = dict(rec)
    rec["images"] = [img if x is None else x for x in rec["images"]]
    out[reason] = rec
  good = {"id": "good", "images": [img], "conversations": _conv()}
  return good, out


def test_each_bad_input_is_skipped_counted_and_logged(tokenizer, dh, bad_records, caplog):
  good, bad = bad_records
  source = [good] + list(bad.values()) + [good]
  cfg = dh.data_config(seq_len=48, global_batch_size=2, max_images=2)
  it = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=4, image_token=IMG, source=source, num_epochs=1)
  with caplog.at_level(logging.WARNING, logger="llvm_jax.data"):
    batches = list(it)
  assert len(batches) == 1 and batches[0]["segment_ids"].any(1).all()
  assert it.stats["examples"] == 2
  for reason, rec in bad.items():
    assert it.stats[reason] == 1, reason
    assert any(rec["id"] in r.getMessage() and reason in r.getMessage() for r in caplog.records), reason
    assert it.skip_report.ids[reason] == [rec["id"]]
  assert "skipped 8" in it.report()


@pytest.mark.parametrize("reason", sorted(BAD))
def test_strict_raises_with_the_record_id(tokenizer, dh, bad_records, reason):
  good, bad = bad_records
  cfg = dh.data_config(seq_len=48, global_batch_size=2, max_images=2, strict=True)
  it = pipeline.make_iterator(
      cfg, tokenizer, num_image_tokens=4, image_token=IMG, source=[good, bad[reason]], num_epochs=1
  )
  with pytest.raises(BadRecordError, match=f"{bad[reason]['id']}.*{reason}"):
    next(it)


def test_partial_truncation_keeps_the_answer_that_fits_and_counts_it(tokenizer, dh, caplog):
  conv = [
      {"from": "human", "value": "How many shapes are there?"},
      {"from": "gpt", "value": "3"},
      {"from": "human", "value": " ".join(["shape"] * 40)},
      {"from": "gpt", "value": "4"},
  ]
  cfg = dh.data_config(seq_len=32, global_batch_size=1)
  it = pipeline.make_iterator(
      cfg,
      tokenizer,
      num_image_tokens=1,
      image_token=IMG,
      source=[{"id": "t1", "images": [], "conversations": conv}],
      num_epochs=1,
  )
  with caplog.at_level(logging.INFO, logger="llvm_jax.data"):
    b = next(it)
  assert b["segment_ids"][0].all()  # exactly seq_len tokens kept
  assert tokenizer.convert_ids_to_tokens(b["targets"][0][b["target_mask"][0] > 0].tolist()) == ["3", "</s>"]
  assert it.stats["truncated"] == 1 and any(
      "t1" in r.getMessage() and "truncated" in r.getMessage() for r in caplog.records
  )


def test_eval_prompt_too_long_is_skipped(tokenizer, dh):
  recs = [
      {"id": "long", "images": [], "conversations": _conv(q=" ".join(["shape"] * 60))},
      {"id": "ok", "images": [], "conversations": _conv()},
  ]
  it = pipeline.make_iterator(
      dh.data_config(seq_len=32, global_batch_size=2),
      tokenizer,
      num_image_tokens=1,
      image_token=IMG,
      source=recs,
      mode="eval",
  )
  b = next(it)
  assert b["id"].tolist() == ["ok", ""] and it.stats["prompt_too_long"] == 1


def test_all_records_bad_raises_instead_of_spinning(tokenizer, dh):
  recs = [{"id": f"e{i}", "images": [], "conversations": []} for i in range(3)]
  it = pipeline.make_iterator(
      dh.data_config(), tokenizer, num_image_tokens=1, image_token=IMG, source=recs
  )  # infinite epochs
  with pytest.raises(RuntimeError, match="whole pass"):
    next(it)


def test_open_data_source_missing_and_build_if_missing(tmp_path, tokenizer, dh):
  cfg = dh.data_config(name="synthetic_vqa/tiny", data_dir=str(tmp_path), image_size=16, split="test")
  with pytest.raises(FileNotFoundError, match="python -m llvm_jax.data.build synthetic_vqa"):
    pipeline.make_iterator(cfg, tokenizer, num_image_tokens=1, image_token=IMG)
  cfg.build_if_missing = True
  it = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=1, image_token=IMG, mode="eval")
  assert sum(int(b["segment_ids"].any(1).sum()) for b in it) == 64  # the registered 'tiny' test split


def test_build_if_missing_from_two_processes_builds_once(tmp_path):
  """Two runs sharing a data_dir (two experiments, or the processes of one job) both get the data."""
  import subprocess
  import sys

  code = (
      "import sys; from llvm_jax.data import pipeline; "
      "s = pipeline.open_data_source('synthetic_vqa/tiny', 'train', sys.argv[1], build_if_missing=True); "
      "print(len(s))"
  )
  procs = [
      subprocess.Popen(
          [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
      )
      for _ in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
  assert [out.strip().splitlines()[-1] for out, _ in outs] == ["256", "256"]
  assert [d.name for d in (tmp_path / "synthetic_vqa" / "tiny").iterdir()] == ["1.0.0"]


def _children(pid):
  import os

  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
      except (OSError, ValueError, IndexError):
        pass
  return out


def test_grain_workers_exit_when_the_trainer_is_killed(tokenizer_dir, synthetic_dir):
  # Issue #17 row 5: kill -9 of the trainer must not leave its grain workers running.
  import os
  import signal
  import subprocess
  import sys
  import time

  script = os.path.join(os.path.dirname(__file__), "orphan_worker.py")
  proc = subprocess.Popen([sys.executable, script, synthetic_dir, tokenizer_dir], stdout=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == "READY"
    workers = _children(proc.pid)
    assert len(workers) >= 2, workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    alive = workers
    while alive and time.time() < deadline:
      time.sleep(0.2)
      alive = [w for w in alive if os.path.exists(f"/proc/{w}") and open(f"/proc/{w}/stat").read().split()[2] != "Z"]
    assert not alive, f"orphaned workers still running: {alive}"
  finally:
    if proc.poll() is None:
      proc.kill()
