"""synthetic.py (procedural VQA) and tokenizer.py (tiny word-level tokenizer + chat template)."""

from __future__ import annotations

import numpy as np
import pytest

from llvm_jax.data import synthetic as S
from llvm_jax.data import tokenizer as T


def _cell_center_rgb(image: np.ndarray, cell: int, grid: int) -> tuple[int, ...]:
  size = image.shape[0]
  r, c = divmod(cell, grid)
  y, x = int((r + 0.5) * size / grid), int((c + 0.5) * size / grid)
  return tuple(int(v) for v in image[y, x])


@pytest.mark.parametrize("grid", [2, 3])
def test_samples_are_consistent_with_their_image(grid):
  spec = S.SyntheticSpec(image_size=48, grid=grid, mc_fraction=0.0)
  positions = S.position_names(grid)
  seen_types = set()
  for i in range(60):
    s = S.draw_sample(S.sample_seed(3, "train", i), spec)
    img, objs = s["image"], s["objects"]
    assert img.shape == (48, 48, 3) and img.dtype == np.uint8
    cells = {o["cell"]: o for o in objs}
    assert len(cells) == len(objs) and len({(o["color"], o["shape"]) for o in objs}) == len(objs)
    for cell in range(grid * grid):  # filled cells show their colour at the centre, others are black
      expected = S.COLORS[cells[cell]["color"]] if cell in cells else (0, 0, 0)
      assert _cell_center_rgb(img, cell, grid) == expected
    q, a, t = s["question"], s["answer"], s["question_type"]
    seen_types.add(t)
    assert q.endswith(S.SHORT_ANSWER_PROMPT) and s["options"] == []
    if t == "count":
      assert a == str(len(objs))
    elif t == "color":
      pos = q.split("in the ")[1].split("?")[0]
      assert a == cells[positions.index(pos)]["color"]
    elif t == "shape":
      pos = q.split("is in the ")[1].split("?")[0]
      assert a == cells[positions.index(pos)]["shape"]
    else:
      color, shape = q.split("Where is the ")[1].split("?")[0].split()
      (obj,) = [o for o in objs if (o["color"], o["shape"]) == (color, shape)]
      assert a == positions[obj["cell"]]
  assert seen_types == set(S.QUESTION_TYPES)


def test_multiple_choice_variant():
  spec = S.SyntheticSpec(image_size=32, mc_fraction=1.0)
  for i in range(40):
    s = S.draw_sample((1, 0, i), spec)
    assert s["multiple_choice"] and s["question"].endswith(S.MULTIPLE_CHOICE_PROMPT)
    opts = s["options"]
    assert 2 <= len(opts) <= 4 and len(set(opts)) == len(opts)
    letter = s["answer"]
    assert letter in "ABCD"[: len(opts)]
    for k, opt in enumerate(opts):
      assert f"\n{'ABCD'[k]}. {opt}\n" in s["question"]
    # same seed without multiple choice: same image and question, and its short answer is the
    # option the letter points to
    short = S.draw_sample((1, 0, i), S.SyntheticSpec(image_size=32, mc_fraction=0.0))
    assert np.array_equal(short["image"], s["image"]) and s["question"].startswith(short["question"].split("\n")[0])
    assert opts[ord(letter) - ord("A")] == short["answer"]


def test_deterministic_by_seed():
  spec = S.SyntheticSpec(image_size=32)
  a, b = S.draw_sample(S.sample_seed(0, "test", 5), spec), S.draw_sample(S.sample_seed(0, "test", 5), spec)
  assert np.array_equal(a["image"], b["image"]) and a["question"] == b["question"] and a["answer"] == b["answer"]
  assert S.encode_png(a["image"]) == S.encode_png(b["image"])
  others = [S.draw_sample(S.sample_seed(0, split, 5), spec) for split in ("train", "validation")]
  others.append(S.draw_sample(S.sample_seed(1, "test", 5), spec))
  assert all(not np.array_equal(a["image"], o["image"]) or a["question"] != o["question"] for o in others)


def test_answer_distribution_is_balanced_enough():
  """No single answer dominates: chance level stays low, so far-above-chance accuracy means learning."""
  spec = S.SyntheticSpec(image_size=32, mc_fraction=0.0)
  answers = [S.draw_sample((0, 0, i), spec)["answer"] for i in range(400)]
  _, counts = np.unique(answers, return_counts=True)
  assert counts.max() / len(answers) < 0.15


def test_spec_validation():
  with pytest.raises(ValueError, match="grid"):
    S.SyntheticSpec(grid=5)
  with pytest.raises(ValueError, match="colors"):
    S.SyntheticSpec(colors=("red", "magenta"))
  with pytest.raises(ValueError, match="max_objects"):
    S.SyntheticSpec(grid=2, max_objects=5)


def test_tiny_tokenizer_special_tokens_and_template(tokenizer):
  assert [tokenizer.convert_tokens_to_ids(t) for t in T.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
  assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (
      0,
      1,
      2,
      3,
  )
  msgs = [
      {"role": "user", "content": "<image>\nWhat shape is in the top left?"},
      {"role": "assistant", "content": "circle"},
  ]
  text = tokenizer.apply_chat_template(msgs, tokenize=False)
  assert text == "<s>USER: <image>\nWhat shape is in the top left? ASSISTANT: circle</s>"
  prompt = tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
  assert prompt == "<s>USER: <image>\nWhat shape is in the top left? ASSISTANT:"
  ids = tokenizer(text, add_special_tokens=False)["input_ids"]
  assert tokenizer.convert_ids_to_tokens(ids) == [
      "<s>",
      "USER",
      ":",
      "<image>",
      "What",
      "shape",
      "is",
      "in",
      "the",
      "top",
      "left",
      "?",
      "ASSISTANT",
      ":",
      "circle",
      "</s>",
  ]
  assert tokenizer.decode(tokenizer("bottom right", add_special_tokens=False)["input_ids"]) == "bottom right"


@pytest.mark.parametrize("grid,colors", [(2, S.DEFAULT_COLORS), (3, tuple(S.COLORS))])
def test_synthetic_text_has_no_unknown_tokens(tokenizer, grid, colors):
  spec = S.SyntheticSpec(image_size=32, grid=grid, colors=colors, mc_fraction=0.5)
  for i in range(150):
    s = S.draw_sample((9, 0, i), spec)
    msgs = [{"role": "user", "content": "<image>\n" + s["question"]}, {"role": "assistant", "content": s["answer"]}]
    ids = tokenizer(tokenizer.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids, s["question"]
    for opt in s["options"]:
      assert tokenizer.unk_token_id not in tokenizer(opt, add_special_tokens=False)["input_ids"]


def test_extra_words_extend_the_vocabulary(tmp_path, tokenizer):
  from transformers import AutoTokenizer

  assert tokenizer.unk_token_id in tokenizer("zebra", add_special_tokens=False)["input_ids"]
  tok = AutoTokenizer.from_pretrained(T.build_tiny_tokenizer(tmp_path, extra_words=["a zebra!"]))
  assert tok.unk_token_id not in tok("zebra", add_special_tokens=False)["input_ids"]
  assert tok.convert_tokens_to_ids("<image>") == 4


def test_preference_records_reject_a_wrong_answer_of_the_same_kind():
  spec = S.SyntheticSpec(mc_fraction=0.3)
  recs = []
  for i in range(200):
    s = S.draw_sample(S.sample_seed(0, "train", i), spec)
    recs.append(
        {
            "id": f"r{i}",
            "image": b"png",
            "question": s["question"],
            "answer": s["answer"],
            "options": s["options"],
            "question_type": s["question_type"],
            "multiple_choice": s["multiple_choice"],
        }
    )
  pairs = S.preference_records(recs, seed=0)
  assert len(pairs) == len(recs)  # every type has several answers in 200 samples
  by_id = {r["id"]: r for r in recs}
  answers = {
      t: {r["answer"] for r in recs if r["question_type"] == t and not r["multiple_choice"]} for t in S.QUESTION_TYPES
  }
  for p in pairs:
    rec = by_id[p["id"]]
    assert p["chosen"] == rec["answer"] != p["rejected"]
    if rec["multiple_choice"]:
      assert p["rejected"] in S.OPTION_LETTERS[: len(rec["options"])]
    else:
      assert p["rejected"] in answers[rec["question_type"]]
  assert S.preference_records(recs, seed=0) == pairs


def _kind(rec) -> str:
  return "mc" if rec["multiple_choice"] else rec["question_type"]


def _ids_by_kind(recs) -> dict[str, set[str]]:
  out: dict[str, set[str]] = {}
  for rec in recs:
    out.setdefault(_kind(rec), set()).add(rec["id"])
  return out


def test_ambiguous_rejected_answers_hedge_between_the_answer_and_a_wrong_one():
  spec = S.SyntheticSpec(mc_fraction=0.3)
  recs = []
  for i in range(120):
    s = S.draw_sample(S.sample_seed(1, "train", i), spec)
    recs.append({"id": f"r{i}", "image": b"png", **{k: s[k] for k in ("question", "answer", "options")}})
    recs[-1].update(question_type=s["question_type"], multiple_choice=s["multiple_choice"])
  incorrect = S.preference_records(recs, seed=0)
  ambiguous = S.preference_records(recs, seed=0, rejected="ambiguous")
  assert len(ambiguous) == len(incorrect) == len(recs)
  wrong = {t: {p["rejected"] for p in incorrect if p["id"] in ids} for t, ids in _ids_by_kind(recs).items()}
  orders = set()
  for p, rec in zip(ambiguous, recs):
    joiner = f" {S.AMBIGUOUS_JOINER} "
    if p["rejected"].startswith(p["chosen"] + joiner):
      other, orders = p["rejected"][len(p["chosen"] + joiner) :], orders | {"first"}
    else:
      assert p["rejected"].endswith(joiner + p["chosen"]), p
      other, orders = p["rejected"][: -len(joiner + p["chosen"])], orders | {"second"}
    assert other != p["chosen"] and other in wrong[_kind(rec)]
  assert orders == {"first", "second"}  # the right answer comes first or second at random
  kinds = {" or " in p["rejected"] for p in S.preference_records(recs, seed=0, rejected="mixed")}
  assert kinds == {True, False}
  with pytest.raises(ValueError, match="rejected must be one of"):
    S.preference_records(recs, rejected="vague")
  # The joiner is a word of the tiny tokenizer, so a hedge tokenises without <unk>.
  assert S.AMBIGUOUS_JOINER in T.tiny_vocabulary()


def test_object_scale_shrinks_the_shapes():
  big = S.SyntheticSpec(image_size=64, grid=2, min_objects=4)
  small = S.SyntheticSpec(image_size=64, grid=2, min_objects=4, object_scale=0.25)
  lit = lambda spec: (S.draw_sample(S.sample_seed(0, "test", 5), spec)["image"].max(-1) > 0).sum()
  # Area goes with the square of the radius: a quarter of the size is about a sixteenth of the pixels.
  assert 8 < lit(big) / lit(small) < 32
  with pytest.raises(ValueError, match="object_scale"):
    S.SyntheticSpec(object_scale=0.0)
