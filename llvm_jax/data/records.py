"""Record validation shared by the TFDS builders and the grain pipeline.

Bad input is never silently dropped: every skipped record raises `SampleError(reason, detail)`
internally; the caller counts it in a `SkipReport` and logs a line naming the record id, or, with
`strict=True`, raises `BadRecordError` whose message names the record id.

Skip reasons (`SKIP_REASONS`):
  missing_image           an image file is missing / an image entry is empty, or `<image>` with no image
  corrupt_image           the image bytes do not decode
  empty_conversation      no turns at all
  malformed_conversation  wrong roles / order, non-text values, empty answer, `<image>` markers
                          that do not match the images, ...
  malformed_record        a required field is missing or of the wrong type (e.g. preference triples)
  too_many_images         more image slots than `max_images`
  image_truncated         the image placeholder tokens do not fit in `seq_len`
  answer_truncated        truncation to `seq_len` would leave no answer token to train on
  prompt_too_long         eval mode: the prompt alone is longer than `seq_len`
"""

from __future__ import annotations

import collections
import dataclasses
import io
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("llvm_jax.data")

IMAGE_MARKER = "<image>"

SKIP_REASONS = (
    "missing_image",
    "corrupt_image",
    "empty_conversation",
    "malformed_conversation",
    "malformed_record",
    "too_many_images",
    "image_truncated",
    "answer_truncated",
    "prompt_too_long",
)

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"
_ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "system": SYSTEM}


class SampleError(Exception):
  """A record that cannot be used; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    if reason not in SKIP_REASONS:
      raise ValueError(f"unknown skip reason {reason!r}")
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


class BadRecordError(ValueError):
  """Raised under strict=True for a record that would otherwise be skipped."""

  def __init__(self, record_id: str, reason: str, detail: str = ""):
    super().__init__(f"bad record id={record_id!r}: {reason}" + (f" ({detail})" if detail else ""))
    self.record_id = record_id
    self.reason = reason
    self.detail = detail


class SkipReport:
  """Counts skipped records per reason and remembers the first ids of each reason."""

  def __init__(self, name: str = "", max_ids: int = 20):
    self.name = name
    self.max_ids = max_ids
    self.counts: collections.Counter = collections.Counter()
    self.ids: dict[str, list[str]] = collections.defaultdict(list)
    self.written = 0

  def skip(self, record_id: str, reason: str, detail: str = "", *, strict: bool = False) -> None:
    """Counts and logs one skipped record (or raises BadRecordError when strict)."""
    if strict:
      raise BadRecordError(record_id, reason, detail)
    self.counts[reason] += 1
    if len(self.ids[reason]) < self.max_ids:
      self.ids[reason].append(record_id)
    # A detail can quote the record's own text, lone surrogates included, which a UTF-8 log handler
    # (or pytest-xdist's report channel) cannot write: escape them.
    detail = str(detail).encode("utf-8", "backslashreplace").decode("utf-8") if detail else ""
    log.warning(
        "%sskipping record id=%r: %s%s",
        f"[{self.name}] " if self.name else "",
        record_id,
        reason,
        f" ({detail})" if detail else "",
    )

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def to_dict(self) -> dict[str, Any]:
    return {
        "written": self.written,
        "skipped": dict(self.counts),
        "skipped_ids": {k: list(v) for k, v in self.ids.items()},
    }

  def summary(self) -> str:
    head = f"{self.name}: " if self.name else ""
    if not self.total:
      return f"{head}wrote {self.written} examples, skipped 0"
    parts = [f"{r}={n} (e.g. {', '.join(map(repr, self.ids[r][:3]))})" for r, n in sorted(self.counts.items())]
    return f"{head}wrote {self.written} examples, skipped {self.total}: " + "; ".join(parts)


def as_text(value: Any, what: str) -> str:
  """bytes/str -> str; anything else is a malformed record."""
  if isinstance(value, bytes):
    try:
      return value.decode("utf-8")
    except UnicodeDecodeError as e:
      raise SampleError("malformed_record", f"{what} is not UTF-8: {e}") from None
  if isinstance(value, np.ndarray) and value.shape == ():
    return as_text(value.item(), what)
  if isinstance(value, str):
    try:  # valid JSON can hold lone surrogates ("\ud800"), which no UTF-8 writer accepts
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      raise SampleError(
          "malformed_record", f"{what} is not valid Unicode (lone surrogate at character {e.start})"
      ) from None
    return value
  raise SampleError("malformed_record", f"{what} must be text, got {type(value).__name__}")


def record_id(record: Mapping[str, Any], default: str = "?") -> str:
  """The record's id as a string (bytes decoded), or `default`."""
  value = record.get("id", None) if isinstance(record, Mapping) else None
  if value is None:
    return default
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  if isinstance(value, np.ndarray):
    value = value.item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
  return str(value)


def turns_as_list(conversations: Any) -> list[tuple[Any, Any]]:
  """LLaVA turns as [(from, value)]: accepts a list of {'from','value'} dicts or TFDS's
  dict-of-lists form {'from': [...], 'value': [...]}."""
  if conversations is None:
    return []
  if isinstance(conversations, Mapping):
    froms, values = conversations.get("from"), conversations.get("value")
    lists = all(isinstance(x, Sequence) and not isinstance(x, (str, bytes)) for x in (froms, values))
    if not lists or len(froms) != len(values):
      raise SampleError("malformed_conversation", "conversations needs equal-length 'from' and 'value'")
    return list(zip(list(froms), list(values)))
  if isinstance(conversations, (str, bytes)) or not isinstance(conversations, Sequence):
    raise SampleError("malformed_conversation", f"conversations must be a list, got {type(conversations).__name__}")
  out = []
  for k, turn in enumerate(conversations):
    if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
      raise SampleError("malformed_conversation", f"turn {k} is not a {{'from', 'value'}} dict")
    out.append((turn["from"], turn["value"]))
  return out


def normalize_conversation(conversations: Any, num_images: int) -> list[tuple[str, str]]:
  """Validates LLaVA turns and returns [(role, text)] with role in user/assistant/system.

  Rules: at least one turn; an optional leading system turn, then user/assistant alternating,
  starting with user and ending with assistant; every answer non-empty; `<image>` markers only in
  user turns and exactly one per image. A conversation with images but no marker gets
  "<image>\\n" per image prepended to its first user turn (as LLaVA does).
  """
  raw = turns_as_list(conversations)
  if not raw:
    raise SampleError("empty_conversation", "no turns")
  turns: list[tuple[str, str]] = []
  for k, (who, value) in enumerate(raw):
    try:
      who_s = as_text(who, f"turn {k} 'from'").strip().lower()
      text = as_text(value, f"turn {k} 'value'")
    except SampleError as e:
      raise SampleError("malformed_conversation", e.detail) from None
    role = _ROLE_ALIASES.get(who_s)
    if role is None:
      raise SampleError("malformed_conversation", f"turn {k} has unknown role {who_s!r}")
    turns.append((role, text))
  body = turns[1:] if turns[0][0] == SYSTEM else turns
  if not body:
    raise SampleError("empty_conversation", "only a system turn")
  for k, (role, text) in enumerate(body):
    expected = USER if k % 2 == 0 else ASSISTANT
    if role != expected:
      raise SampleError(
          "malformed_conversation", f"turn {k} is {role!r}, expected {expected!r} (turns must alternate human/gpt)"
      )
    if role == ASSISTANT and not text.strip():
      raise SampleError("malformed_conversation", f"turn {k}: empty answer")
    if role == USER and not text.strip():
      raise SampleError("malformed_conversation", f"turn {k}: empty question")
  if body[-1][0] != ASSISTANT:
    raise SampleError("malformed_conversation", "the conversation does not end with an answer")
  markers = sum(text.count(IMAGE_MARKER) for role, text in turns if role != ASSISTANT)
  if any(IMAGE_MARKER in text for role, text in turns if role == ASSISTANT):
    raise SampleError("malformed_conversation", "an answer contains an <image> marker")
  if num_images and not markers:
    first = next(k for k, (role, _) in enumerate(turns) if role == USER)
    turns[first] = (USER, (IMAGE_MARKER + "\n") * num_images + turns[first][1])
  elif markers and not num_images:
    raise SampleError("missing_image", f"{markers} <image> marker(s) but no image")
  elif markers != num_images:
    raise SampleError("malformed_conversation", f"{markers} <image> markers for {num_images} images")
  return turns


def image_list(value: Any) -> list[Any]:
  """An 'image'/'images' field as a list (None/'' -> [], one item -> [item])."""
  if value is None:
    return []
  if isinstance(value, (bytes, str)):
    return [value] if len(value) else []
  if isinstance(value, np.ndarray):
    if value.dtype == object or value.dtype.kind in "SU":
      return list(value.reshape(-1))
    return [value]  # a decoded image array
  return list(value)


def decode_image(data: Any):
  """Encoded bytes (or a uint8 array) -> RGB PIL image; SampleError on empty/corrupt data."""
  from PIL import Image

  if isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 3:
    return to_rgb8(Image.fromarray(data))
  if isinstance(data, np.ndarray) and data.shape == ():
    data = data.item()
  if not isinstance(data, (bytes, bytearray)):
    raise SampleError("malformed_record", f"image must be encoded bytes, got {type(data).__name__}")
  if not data:
    raise SampleError("missing_image", "empty image bytes")
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      return to_rgb8(img)
  except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
    raise SampleError("corrupt_image", f"{type(e).__name__}: {e}") from None


def to_rgb8(img):
  """Any PIL image -> 8-bit RGB with the same brightness.

  PIL's `convert("RGB")` clips high-bit-depth modes (16-bit PNG/TIFF -> almost all white, float
  TIFF in [0, 1] -> black), so those are scaled first: 16-bit integer modes by 65535 (their bit
  depth); 32-bit integer ('I') by 65535 when the values fit 16 bits (PIL opens 16-bit PNGs as 'I'),
  else by their range; float ('F') as is when in [0, 1], else by their range. 8-bit modes (L, LA,
  P, PA, RGBA, CMYK, YCbCr, 1...) convert with PIL (alpha dropped).
  """
  from PIL import Image

  mode = img.mode
  if mode == "RGB":
    return img
  if mode.startswith("I") or mode == "F":
    values = np.asarray(img).astype(np.float64)
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    if mode.startswith("I;16"):
      unit = values / 65535.0
    elif mode == "F" and lo >= 0.0 and hi <= 1.0:
      unit = values
    elif mode.startswith("I") and lo >= 0.0 and hi <= 65535.0:
      unit = values / 65535.0
    else:  # other ranges: stretch the range present to [0, 1]
      unit = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
    gray = np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    if gray.ndim == 3:  # multi-channel high-bit-depth: keep the first three channels
      gray = gray[..., :3] if gray.shape[-1] >= 3 else gray[..., :1].repeat(3, -1)
      return Image.fromarray(gray, "RGB")
    return Image.fromarray(gray, "L").convert("RGB")
  try:
    return img.convert("RGB")
  except ValueError:  # modes PIL cannot convert directly (e.g. LAB, HSV)
    return img.convert("RGBA").convert("RGB")


@dataclasses.dataclass
class Example:
  """A record in the pipeline's canonical form.

  conversations: one list of validated [(role, text)] per sequence: one for SFT / VQA, two
  (chosen, rejected) for preference data. answer / options: for evaluation.
  """

  id: str
  images: list[Any]
  conversations: list[list[tuple[str, str]]]
  answer: str = ""
  options: list[str] = dataclasses.field(default_factory=list)
  is_preference: bool = False


def first_question(example: Example) -> str:
  """The text of the first user turn (with its image markers), e.g. for question-only baselines."""
  return next(text for role, text in example.conversations[0] if role == USER)


def to_example(record: Mapping[str, Any]) -> Example:
  """Converts a stored record (any of the three builders' formats, or the LLaVA JSON form with
  the image already as bytes) into an Example; SampleError if it cannot be used.

  Formats recognised by their keys:
    llava_instruct: id, images (list of bytes) or image, conversations
    preference:     id, images / image, question, chosen, rejected
    synthetic_vqa:  id, image, question, answer, options
  """
  if not isinstance(record, Mapping):
    raise SampleError("malformed_record", f"record must be a dict, got {type(record).__name__}")
  rid = record_id(record)
  images = image_list(record.get("images", record.get("image")))
  if "conversations" in record:
    turns = normalize_conversation(record["conversations"], len(images))
    answer = turns[-1][1]
    return Example(rid, images, [turns], answer=answer)
  if "chosen" in record or "rejected" in record:
    fields = {}
    for key in ("question", "chosen", "rejected"):
      if key not in record:
        raise SampleError("malformed_record", f"missing field {key!r}")
      fields[key] = as_text(record[key], key)
    if not fields["question"].strip():
      raise SampleError("malformed_record", "empty question")
    for key in ("chosen", "rejected"):
      if not fields[key].strip():
        raise SampleError("malformed_record", f"empty {key} answer")
    if fields["chosen"].strip() == fields["rejected"].strip():
      raise SampleError("malformed_record", "chosen and rejected answers are identical")
    convs = [
        normalize_conversation(
            [{"from": "human", "value": fields["question"]}, {"from": "gpt", "value": fields[k]}], len(images)
        )
        for k in ("chosen", "rejected")
    ]
    return Example(rid, images, convs, answer=fields["chosen"], is_preference=True)
  if "question" in record and "answer" in record:
    question = as_text(record["question"], "question")
    answer = as_text(record["answer"], "answer")
    options = [as_text(o, "option") for o in list(record.get("options", None) or [])]
    turns = normalize_conversation(
        [{"from": "human", "value": question}, {"from": "gpt", "value": answer}], len(images)
    )
    return Example(rid, images, [turns], answer=answer, options=options)
  raise SampleError("malformed_record", f"unrecognised record with keys {sorted(record)}")
