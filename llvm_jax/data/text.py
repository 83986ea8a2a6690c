"""Conversation -> token ids with the LLM's chat template, assistant-only loss and `<image>`
placeholder expansion.

Assistant spans are found by rendering the template incrementally: for the i-th message (an
answer), P = render(messages[:i], add_generation_prompt=True) and Q = render(messages[:i+1]); the
characters Q[len(P):] are the answer as the template writes it, end-of-turn / eos included. The
whole conversation is tokenised once (with offsets, so a fast tokenizer is needed) and every token
starting inside such a span is an answer token. If a template does not render prefixes that way,
the answer text is searched in the rendering instead and the special tokens right after it
(eos / end-of-turn) are added.

Each `<image>` marker becomes image_start + image_token + image_end in the text; after
tokenisation the single image token is repeated `num_image_tokens * tiles` times.

Special-token strings typed inside a message (e.g. the literal text "</s>" in an answer) are
tokenised as plain text (`split_special_tokens`): only the template's own special tokens, and the
image token that `<image>` markers become, are special tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llvm_jax.data.records import ASSISTANT, IMAGE_MARKER, SYSTEM, SampleError


@dataclasses.dataclass
class Encoded:
  ids: np.ndarray  # int32 (L,)
  loss: np.ndarray  # bool (L,): token is part of an answer (to be predicted)
  image_runs: list[tuple[int, int]]  # [start, end) of each image's placeholder tokens


class ChatEncoder:
  """Tokenises validated conversations ([(role, text)], role user/assistant/system)."""

  def __init__(
      self,
      tokenizer,
      *,
      image_token: str,
      num_image_tokens: int,
      image_start: str = "",
      image_end: str = "",
      system_prompt: str | None = None,
  ):
    if not getattr(tokenizer, "is_fast", False):
      raise ValueError("a fast tokenizer (offset mapping) is needed; load it with AutoTokenizer(use_fast=True)")
    if not getattr(tokenizer, "chat_template", None):
      raise ValueError("the tokenizer has no chat_template")
    if num_image_tokens < 1:
      raise ValueError(f"num_image_tokens must be >= 1, got {num_image_tokens}")
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    ids = tokenizer(image_token, add_special_tokens=False)["input_ids"]
    if image_token_id is None or ids != [image_token_id] or image_token_id == tokenizer.unk_token_id:
      raise ValueError(
          f"image token {image_token!r} is not a single token of the tokenizer (got ids {ids}); "
          "add it as a special token"
      )
    self.tokenizer = tokenizer
    self.image_token = image_token
    self.image_token_id = int(image_token_id)
    self.num_image_tokens = int(num_image_tokens)
    self.image_start = image_start
    self.image_end = image_end
    self.system_prompt = system_prompt
    self._special_ids = set(int(i) for i in tokenizer.all_special_ids) - {self.image_token_id}

  # -- rendering ---------------------------------------------------------------------------------
  def messages(self, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    image_text = self.image_start + self.image_token + self.image_end
    msgs = [{"role": role, "content": text.replace(IMAGE_MARKER, image_text)} for role, text in turns]
    if self.system_prompt and (not msgs or msgs[0]["role"] != SYSTEM):
      msgs.insert(0, {"role": SYSTEM, "content": self.system_prompt})
    return msgs

  def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
      raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}")
    return text

  def _answer_spans(self, msgs: list[dict[str, str]], full: str) -> tuple[list[tuple[int, int]], bool]:
    """Character spans of the answers in `full`; the bool says whether the prefix method worked."""
    spans = []
    for i, m in enumerate(msgs):
      if m["role"] != ASSISTANT:
        continue
      p = self.render(msgs[:i], add_generation_prompt=True)
      q = self.render(msgs[: i + 1], add_generation_prompt=False)
      if not (q.startswith(p) and full.startswith(q) and len(q) > len(p)):
        return self._search_spans(msgs, full), False
      spans.append((len(p), len(q)))
    return spans, True

  @staticmethod
  def _search_spans(msgs, full: str) -> list[tuple[int, int]]:
    """Finds every message's text in order (so an answer is searched after its question)."""
    spans, cursor = [], 0
    for m in msgs:
      content = m["content"]
      pos = full.find(content, cursor)
      if pos < 0:
        content = content.strip()
        pos = full.find(content, cursor) if content else -1
      if m["role"] != ASSISTANT:
        if pos >= 0:
          cursor = pos + len(content)
        continue
      if pos < 0 or not content:
        raise SampleError("malformed_conversation", "answer text not found in the chat-template rendering")
      spans.append((pos, pos + len(content)))
      cursor = pos + len(content)
    return spans

  # -- encoding ----------------------------------------------------------------------------------
  def _tokenize(self, text: str, msgs: list[dict[str, str]]):
    enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int32)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2)
    spans = self._content_spans(msgs, text)
    literal = [
        k for k in range(len(ids)) if int(ids[k]) in self._special_ids and any(a <= offsets[k, 0] < b for a, b in spans)
    ]
    if not literal:
      return ids, offsets
    # A special token spelled out inside a message's text: re-tokenise its characters as plain text.
    out_ids, out_offsets, prev = [], [], 0
    for k in literal:
      out_ids.append(ids[prev:k])
      out_offsets.append(offsets[prev:k])
      a, b = int(offsets[k, 0]), int(offsets[k, 1])
      piece = self.tokenizer(
          text[a:b], add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True
      )
      out_ids.append(np.asarray(piece["input_ids"], np.int32))
      out_offsets.append(np.asarray(piece["offset_mapping"], np.int64).reshape(-1, 2) + a)
      prev = k + 1
    out_ids.append(ids[prev:])
    out_offsets.append(offsets[prev:])
    return np.concatenate(out_ids).astype(np.int32), np.concatenate(out_offsets)

  @staticmethod
  def _content_spans(msgs: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans of the messages' own text in the rendering (searched in order)."""
    spans, cursor = [], 0
    for m in msgs:
      pos = full.find(m["content"], cursor) if m["content"] else -1
      if pos >= 0:
        spans.append((pos, pos + len(m["content"])))
        cursor = pos + len(m["content"])
    return spans

  def _expand_images(self, ids: np.ndarray, loss: np.ndarray, tiles_per_image: list[int]) -> Encoded:
    where = np.nonzero(ids == self.image_token_id)[0]
    if len(where) != len(tiles_per_image):
      raise SampleError(
          "malformed_conversation",
          f"{len(where)} image tokens {self.image_token!r} in the text for {len(tiles_per_image)} images",
      )
    counts = np.ones(len(ids), np.int64)
    counts[where] = np.asarray(tiles_per_image, np.int64) * self.num_image_tokens
    ends = np.cumsum(counts)
    runs = [(int(ends[k] - counts[k]), int(ends[k])) for k in where]
    return Encoded(
        np.repeat(ids, counts).astype(np.int32), np.repeat(loss & (ids != self.image_token_id), counts), runs
    )

  def encode(self, turns: list[tuple[str, str]], tiles_per_image: list[int]) -> Encoded:
    """Training form: the whole conversation, `loss` True on answer tokens (eos included)."""
    msgs = self.messages(turns)
    full = self.render(msgs, add_generation_prompt=False)
    spans, exact = self._answer_spans(msgs, full)
    ids, offsets = self._tokenize(full, msgs)
    starts = offsets[:, 0]
    nonempty = offsets[:, 1] > offsets[:, 0]
    loss = np.zeros(len(ids), bool)
    for a, b in spans:
      loss |= (starts >= a) & (starts < b) & nonempty
    if not exact:  # add the eos / end-of-turn tokens that directly follow each answer
      for _, b in spans:
        k = int(np.searchsorted(starts, b))
        while k < len(ids) and int(ids[k]) in self._special_ids:
          loss[k] = True
          k += 1
    if not loss[1:].any():
      raise SampleError("malformed_conversation", "the answers produced no tokens")
    return self._expand_images(ids, loss, tiles_per_image)

  def encode_prompt(self, turns: list[tuple[str, str]], tiles_per_image: list[int]) -> tuple[Encoded, str]:
    """Eval form: everything before the last answer plus the template's assistant prefix
    (add_generation_prompt=True); returns (encoded prompt with loss all False, the last answer)."""
    if not turns or turns[-1][0] != ASSISTANT:
      raise SampleError("malformed_conversation", "the conversation does not end with an answer")
    msgs = self.messages(turns[:-1])
    ids, _ = self._tokenize(self.render(msgs, add_generation_prompt=True), msgs)
    return self._expand_images(ids, np.zeros(len(ids), bool), tiles_per_image), turns[-1][1]
