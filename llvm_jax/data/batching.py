"""Batch assembly in the calling process: processed examples -> rows (first fit when packing) -> arrays.

The batch contract (keys, shapes, dtypes) is documented in `pipeline`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llvm_jax.data import vision

SEQUENCE_KEYS = ("tokens", "segment_ids", "positions", "targets", "target_mask")


class BatchBuilder:
  """Places processed examples into B rows (first fit when packing) and emits the arrays."""

  def __init__(
      self, rows: int, channels: int, seq_len: int, max_images: int, packing: bool, mode: str, spec: vision.VisionSpec
  ):
    self.n_rows, self.channels, self.seq_len, self.max_images = rows, channels, seq_len, max_images
    self.packing, self.mode, self.spec = packing, mode, spec
    self.rows: list[dict[str, Any]] = []

  def __len__(self) -> int:
    return len(self.rows)

  @property
  def full(self) -> bool:
    return not self.packing and len(self.rows) == self.n_rows

  def add(self, ex: dict[str, Any]) -> bool:
    lens = [len(t) for t in ex["tokens"]]
    n_img = len(ex["images"])
    if self.packing:
      for row in self.rows:
        if row["n_img"] + n_img <= self.max_images and all(u + l <= self.seq_len for u, l in zip(row["used"], lens)):
          row["examples"].append(ex)
          row["n_img"] += n_img
          row["used"] = [u + l for u, l in zip(row["used"], lens)]
          return True
    if len(self.rows) == self.n_rows:
      return False
    self.rows.append({"examples": [ex], "n_img": n_img, "used": lens})
    return True

  def arrays(self) -> dict[str, np.ndarray]:
    b, c, s = self.n_rows, self.channels, self.seq_len
    size = self.spec.image_size
    tokens = np.zeros((b, c, s), np.int32)
    segment_ids = np.zeros((b, c, s), np.int32)
    positions = np.zeros((b, c, s), np.int32)
    targets = np.zeros((b, c, s), np.int32)
    target_mask = np.zeros((b, c, s), np.float32)
    images = np.zeros((b, self.max_images, size, size, 3), np.float32)
    image_mask = np.zeros((b, self.max_images), bool)
    hires = None
    if self.spec.deepstack_grid is not None:
      g = self.spec.deepstack_grid[0] * self.spec.deepstack_grid[1]
      hires = np.zeros((b, self.max_images, g, size, size, 3), np.float32)
    grids = None
    if self.spec.deepstack_grid is not None and self.spec.deepstack_grid_mode == "aspect":
      grids = np.zeros((b, self.max_images, 2), np.int32)  # unused slots: (0, 0)
    for r, row in enumerate(self.rows):
      slot = 0
      for ch in range(c):
        off = 0
        for k, ex in enumerate(row["examples"]):
          ids, loss = ex["tokens"][ch], ex["loss"][ch]
          n = len(ids)
          tokens[r, ch, off : off + n] = ids
          segment_ids[r, ch, off : off + n] = k + 1
          positions[r, ch, off : off + n] = np.arange(n, dtype=np.int32)
          targets[r, ch, off : off + n - 1] = ids[1:]
          target_mask[r, ch, off : off + n - 1] = loss[1:]
          off += n
      for ex in row["examples"]:
        n = len(ex["images"])
        images[r, slot : slot + n] = ex["images"]
        if hires is not None:
          hires[r, slot : slot + n] = ex["hires"]
        if grids is not None:
          grids[r, slot : slot + n] = ex["hires_grid"]
        image_mask[r, slot : slot + n] = True
        slot += n
    squeeze = (lambda x: x[:, 0]) if c == 1 else (lambda x: x)
    out = {
        "tokens": squeeze(tokens),
        "segment_ids": squeeze(segment_ids),
        "positions": squeeze(positions),
        "targets": squeeze(targets),
        "target_mask": squeeze(target_mask),
        "images": images,
        "image_mask": image_mask,
    }
    if hires is not None:
      out["hires_images"] = hires
    if grids is not None:
      out["hires_grid"] = grids
    if self.mode == "eval":
      exs = [row["examples"][0] for row in self.rows] + [None] * (b - len(self.rows))
      k = max([1] + [len(e["options"]) for e in exs if e is not None])
      out["id"] = np.array([e["id"] if e else "" for e in exs], dtype=str)
      out["answer"] = np.array([e["answer"] if e else "" for e in exs], dtype=str)
      out["question"] = np.array([e["question"] if e else "" for e in exs], dtype=str)
      options = [[""] * k for _ in range(b)]
      for i, e in enumerate(exs):
        if e:
          options[i][: len(e["options"])] = e["options"]
      out["options"] = np.array(options, dtype=str).reshape(b, k)
    return out
