"""Exact token / label layout: chat template, assistant-only targets, image placeholders."""

from __future__ import annotations

import numpy as np
import pytest

from llvm_jax.data import pipeline, records
from llvm_jax.data.text import ChatEncoder

CONV = [
    {"from": "human", "value": "<image>\nWhat color is the shape in the top left?"},
    {"from": "gpt", "value": "red"},
    {"from": "human", "value": "How many shapes are there?"},
    {"from": "gpt", "value": "2"},
]


def _tokens(tokenizer, ids):
  return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_encode_layout_multi_turn(tokenizer):
  enc = ChatEncoder(tokenizer, image_token="<image>", num_image_tokens=3)
  turns = records.normalize_conversation(CONV, num_images=1)
  e = enc.encode(turns, tiles_per_image=[1])
  expected = (
      ["<s>", "USER", ":"]
      + ["<image>"] * 3
      + ["What", "color", "is", "the", "shape", "in", "the", "top", "left", "?"]
      + [
          "ASSISTANT",
          ":",
          "red",
          "</s>",
          "USER",
          ":",
          "How",
          "many",
          "shapes",
          "are",
          "there",
          "?",
          "ASSISTANT",
          ":",
          "2",
          "</s>",
      ]
  )
  assert _tokens(tokenizer, e.ids) == expected
  assert e.ids.dtype == np.int32
  assert [t for t, m in zip(expected, e.loss) if m] == ["red", "</s>", "2", "</s>"]
  assert e.image_runs == [(3, 6)]


def test_eval_prompt_layout(tokenizer):
  enc = ChatEncoder(tokenizer, image_token="<image>", num_image_tokens=2)
  turns = records.normalize_conversation(CONV, num_images=1)
  e, answer = enc.encode_prompt(turns, tiles_per_image=[1])
  assert answer == "2"
  assert _tokens(tokenizer, e.ids)[-8:] == ["How", "many", "shapes", "are", "there", "?", "ASSISTANT", ":"]
  assert _tokens(tokenizer, e.ids)[:5] == ["<s>", "USER", ":", "<image>", "<image>"]
  assert "red" in _tokens(tokenizer, e.ids) and not e.loss.any()


def test_marker_prepended_when_missing_and_tiles(tokenizer):
  conv = [{"from": "human", "value": "What shape is in the top left?"}, {"from": "gpt", "value": "circle"}]
  turns = records.normalize_conversation(conv, num_images=2)
  assert turns[0] == ("user", "<image>\n<image>\nWhat shape is in the top left?")
  enc = ChatEncoder(tokenizer, image_token="<image>", num_image_tokens=4, image_start="(", image_end=")")
  e = enc.encode(turns, tiles_per_image=[3, 1])  # InternVL-style: 3 tiles then 1 tile
  toks = _tokens(tokenizer, e.ids)
  assert toks[:3] == ["<s>", "USER", ":"]
  assert toks[3 : 3 + 14] == ["("] + ["<image>"] * 12 + [")"]
  assert toks[17 : 17 + 6] == ["("] + ["<image>"] * 4 + [")"]
  assert e.image_runs == [(4, 16), (18, 22)]
  assert [t for t, m in zip(toks, e.loss) if m] == ["circle", "</s>"]


def test_system_prompt(tokenizer):
  enc = ChatEncoder(
      tokenizer, image_token="<image>", num_image_tokens=1, system_prompt="A chat between a user and an assistant."
  )
  e = enc.encode([("user", "How many shapes are there?"), ("assistant", "3")], [])
  toks = _tokens(tokenizer, e.ids)
  assert toks[:10] == ["<s>", "A", "chat", "between", "a", "user", "and", "an", "assistant", "."]
  assert toks[10:12] == ["USER", ":"] and [t for t, m in zip(toks, e.loss) if m] == ["3", "</s>"]


def test_template_without_stable_prefixes_uses_the_search_fallback(tokenizer_dir):
  from transformers import AutoTokenizer

  tok = AutoTokenizer.from_pretrained(tokenizer_dir)
  # The generation prompt ("ASSISTANT:") is not what an answer turn starts with ("ASSISTANT :").
  tok.chat_template = (
      "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }} "
      "{% else %}ASSISTANT : {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
      "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
  )
  enc = ChatEncoder(tok, image_token="<image>", num_image_tokens=1)
  e = enc.encode(
      [
          ("user", "What shape is in the top left?"),
          ("assistant", "top left"),
          ("user", "How many shapes are there?"),
          ("assistant", "4"),
      ],
      [],
  )
  toks = _tokens(tok, e.ids)
  assert [t for t, m in zip(toks, e.loss) if m] == ["top", "left", "</s>", "4", "</s>"]
  # the first "top left" (in the question) is not labelled
  assert not e.loss[toks.index("top")]


def test_image_token_must_be_a_single_token(tokenizer):
  with pytest.raises(ValueError, match="single token"):
    ChatEncoder(tokenizer, image_token="<img>", num_image_tokens=4)


def test_batch_layout_of_a_known_conversation(tokenizer, dh):
  rec = {"id": "known", "images": [dh.png_bytes((255, 0, 0))], "conversations": CONV}
  cfg = dh.data_config(seq_len=40, global_batch_size=1, image_size=16, max_images=2)
  it = pipeline.make_iterator(cfg, tokenizer, num_image_tokens=3, image_token="<image>", source=[rec], num_epochs=1)
  b = next(it)
  ids = (
      ChatEncoder(tokenizer, image_token="<image>", num_image_tokens=3)
      .encode(records.normalize_conversation(CONV, 1), [1])
      .ids
  )
  n = len(ids)
  assert n == 32
  tokens = np.zeros(40, np.int32)
  tokens[:n] = ids
  np.testing.assert_array_equal(b["tokens"][0], tokens)
  np.testing.assert_array_equal(b["segment_ids"][0], [1] * n + [0] * 8)
  np.testing.assert_array_equal(b["positions"][0], list(range(n)) + [0] * 8)
  targets = np.zeros(40, np.int32)
  targets[: n - 1] = ids[1:]
  np.testing.assert_array_equal(b["targets"][0], targets)
  # target_mask[t] = 1 where targets[t] is an answer token: red, </s>, 2, </s>
  mask_positions = np.nonzero(b["target_mask"][0])[0]
  assert _tokens(tokenizer, b["targets"][0][mask_positions]) == ["red", "</s>", "2", "</s>"]
  assert _tokens(tokenizer, b["tokens"][0][mask_positions]) == [":", "red", ":", "2"]
  assert int((b["tokens"][0] == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 3
  np.testing.assert_array_equal(b["image_mask"], [[True, False]])
  assert b["target_mask"].dtype == np.float32 and b["tokens"].dtype == np.int32
  with pytest.raises(StopIteration):
    next(it)


def test_vicuna_v1_template_matches_llava_format(tokenizer):
  from llvm_jax.data.tokenizer import VICUNA_V1_SYSTEM, load_tokenizer

  tok = load_tokenizer(tokenizer, "vicuna_v1")
  assert tok is not tokenizer and tokenizer.chat_template != tok.chat_template  # the given one is untouched
  enc = ChatEncoder(tok, image_token="<image>", num_image_tokens=1)
  turns = records.normalize_conversation(CONV, num_images=1)
  text = enc.render(enc.messages(turns), add_generation_prompt=False)
  assert text == (
      f"<s>{VICUNA_V1_SYSTEM} USER: <image>\nWhat color is the shape in the top left? ASSISTANT: red</s>"
      "USER: How many shapes are there? ASSISTANT: 2</s>"
  )
  e = enc.encode(turns, [1])
  assert [t for t, m in zip(_tokens(tok, e.ids), e.loss) if m] == ["red", "</s>", "2", "</s>"]


def test_special_token_text_in_a_message_stays_text(tokenizer):
  # Issue #17 row 14: the literal "</s>" (or "<s>") typed in an answer / question is not an EOS / BOS to train on.
  enc = ChatEncoder(tokenizer, image_token="<image>", num_image_tokens=2)
  turns = records.normalize_conversation(
      [{"from": "human", "value": "<image>\nsay <s> red"}, {"from": "gpt", "value": "red </s> 2"}], num_images=1
  )
  e = enc.encode(turns, tiles_per_image=[1])
  tokens = _tokens(tokenizer, e.ids)
  assert tokens.count("</s>") == 1 and tokens[-1] == "</s>"  # only the template's end of turn
  assert tokens.count("<s>") == 1 and tokens[0] == "<s>"
  assert tokens.count("<image>") == 2  # the marker's image token is still expanded
  assert [t for t, m in zip(tokens, e.loss) if m] == ["red", "<", "/", "s", ">", "2", "</s>"]
  prompt, _ = enc.encode_prompt(turns, tiles_per_image=[1])
  assert _tokens(tokenizer, prompt.ids).count("<s>") == 1
