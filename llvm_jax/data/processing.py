"""Per-record processing, run in grain's workers: a record -> a tokenised example (or a skip marker).

`ProcessRecord` decodes and preprocesses the images (`vision`), applies the chat template with the
image placeholders (`text.ChatEncoder`), and truncates to seq_len when the images and an answer
token survive. A record that cannot be used becomes `{'skip': reason, 'id', 'detail'}`, which the
iterator counts instead of failing the run.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from collections.abc import Mapping
from typing import Any

import grain.python as grain
import numpy as np

from llvm_jax.data import records, vision
from llvm_jax.data.records import SampleError
from llvm_jax.data.text import ChatEncoder, Encoded

MODES = ("train", "eval")

_WATCHED_PARENT: int | None = None


def exit_with_parent(parent_pid: int, interval: float = 0.5) -> None:
  """In a grain worker: starts (once per process) a thread that exits the process when `parent_pid` dies.

  grain's worker processes outlive a trainer killed with SIGKILL (it cannot stop them), holding
  their memory for minutes; polling the parent is portable and, unlike PR_SET_PDEATHSIG, does not
  depend on which thread of the parent started the worker.
  """
  global _WATCHED_PARENT
  if _WATCHED_PARENT == parent_pid or os.getpid() == parent_pid:
    return
  _WATCHED_PARENT = parent_pid

  def watch():
    while True:
      try:
        os.kill(parent_pid, 0)
      except ProcessLookupError:
        os._exit(0)  # no cleanup to do: the parent that consumed our output is gone
      except PermissionError:  # the pid was reused by another user's process: our parent is gone
        os._exit(0)
      time.sleep(interval)

  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


class ProcessRecord(grain.MapTransform):
  """Record -> processed example dict, or a skip marker {'skip': reason, 'id', 'detail'}."""

  def __init__(
      self,
      tokenizer,
      *,
      image_token: str,
      num_image_tokens: int,
      vision_spec: vision.VisionSpec,
      seq_len: int,
      max_images: int,
      mode: str = "train",
      image_start: str = "",
      image_end: str = "",
      system_prompt: str | None = None,
  ):
    if mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    self.encoder = ChatEncoder(
        tokenizer,
        image_token=image_token,
        num_image_tokens=num_image_tokens,
        image_start=image_start,
        image_end=image_end,
        system_prompt=system_prompt,
    )
    self.vision_spec = vision_spec
    self.seq_len = int(seq_len)
    self.max_images = int(max_images)
    self.mode = mode

  # When set (worker processes), outputs travel as one pickled bytes object: much cheaper than
  # grain's per-array shared-memory blocks for the small arrays of one example.
  serialize: bool = False
  # The process that built the pipeline; workers exit when it is gone (see exit_with_parent).
  parent_pid: int = os.getpid()

  def map(self, record):
    if self.serialize:
      exit_with_parent(self.parent_pid)
    rid = records.record_id(record) if isinstance(record, Mapping) else "?"
    try:
      out = self._process(record, rid)
    except SampleError as e:
      out = {"skip": e.reason, "id": rid, "detail": e.detail}
    if self.serialize:
      return {"pickled": pickle.dumps(out, protocol=pickle.HIGHEST_PROTOCOL)}
    return out

  def _images(self, images: list[Any]) -> tuple[np.ndarray, np.ndarray | None, list[int], np.ndarray | None]:
    """(slots, hires crops or None, slots per image, per-slot crop grids (n, 2) or None: 'aspect' only)."""
    spec = self.vision_spec
    slots, hires, tiles, grids = [], [], [], []
    for k, data in enumerate(images):
      try:
        img = records.decode_image(data)
      except SampleError as e:
        raise SampleError(e.reason, f"image {k}: {e.detail}") from None
      s, h = vision.preprocess_image(img, spec)
      slots.append(s)
      hires.append(h)
      grids.append(vision.deepstack_grids(img, spec))
      tiles.append(len(s))
    if sum(tiles) > self.max_images:
      raise SampleError("too_many_images", f"{sum(tiles)} image slots > max_images={self.max_images}")
    size = spec.image_size
    slot_arr = np.concatenate(slots) if slots else np.zeros((0, size, size, 3), np.float32)
    hires_arr = None
    if spec.deepstack_grid is not None:
      g = spec.deepstack_grid[0] * spec.deepstack_grid[1]
      hires_arr = np.concatenate(hires) if hires else np.zeros((0, g, size, size, 3), np.float32)
    grid_arr = None
    if spec.deepstack_grid is not None and spec.deepstack_grid_mode == "aspect":
      grid_arr = np.concatenate(grids) if grids else np.zeros((0, 2), np.int32)
    return slot_arr, hires_arr, tiles, grid_arr

  def _fit(self, enc: Encoded) -> tuple[Encoded, bool]:
    """Truncates to seq_len when the images and at least one answer token survive."""
    n = len(enc.ids)
    if n <= self.seq_len:
      return enc, False
    if any(end > self.seq_len for _, end in enc.image_runs):
      raise SampleError("image_truncated", f"{n} tokens; image placeholders end past seq_len={self.seq_len}")
    if not enc.loss[1 : self.seq_len].any():
      raise SampleError("answer_truncated", f"{n} tokens > seq_len={self.seq_len}: no answer token left")
    cut = Encoded(enc.ids[: self.seq_len], enc.loss[: self.seq_len], enc.image_runs)
    return cut, True

  def _process(self, record, rid: str) -> dict[str, Any]:
    ex = records.to_example(record)
    slots, hires, tiles, grids = self._images(ex.images)
    out: dict[str, Any] = {
        "id": ex.id,
        "answer": ex.answer,
        "options": list(ex.options),
        "images": slots,
        "question": records.first_question(ex),
    }
    if hires is not None:
      out["hires"] = hires
    if grids is not None:
      out["hires_grid"] = grids
    if self.mode == "eval":
      enc, answer = self.encoder.encode_prompt(ex.conversations[0], tiles)
      if len(enc.ids) > self.seq_len:
        raise SampleError("prompt_too_long", f"prompt of {len(enc.ids)} tokens > seq_len={self.seq_len}")
      out.update(tokens=[enc.ids], loss=[enc.loss], truncated=0, answer=answer if not ex.is_preference else ex.answer)
      return out
    seqs, truncated = [], 0
    for conv in ex.conversations:
      enc, cut = self._fit(self.encoder.encode(conv, tiles))
      seqs.append(enc)
      truncated += int(cut)
    out.update(tokens=[e.ids for e in seqs], loss=[e.loss for e in seqs], truncated=truncated)
    return out


def num_channels(first_record: Any, mode: str) -> int:
  """2 (chosen, rejected) for preference records in train mode, else 1."""
  if mode == "train" and isinstance(first_record, Mapping) and ("chosen" in first_record or "rejected" in first_record):
    return 2
  return 1
