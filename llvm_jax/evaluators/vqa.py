"""VQA accuracy by greedy generation on a TFDS split (exact match after VQA normalisation).

Multiple-choice questions are scored on the option letter extracted from the prediction. Each
process evaluates its own shard; counts are summed over processes; padding rows are not counted.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from llvm_jax import generate

_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
  """The standard VQA normalisation: lower case, no punctuation or articles, digits for numbers."""
  words = _PUNCT.sub(" ", text.lower()).split()
  return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def option_letter(text: str, num_options: int = 8) -> str | None:
  """The first standalone option letter (A., (B), C) in a prediction, or None."""
  letters = "ABCDEFGH"[:num_options]
  match = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text.strip())
  return match.group(1) if match else None


def left_pad(tokens: np.ndarray, segment_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded prompts -> left-padded (generation appends at the end of every row)."""
  out_t, out_s = np.zeros_like(tokens), np.zeros_like(segment_ids)
  for r in range(tokens.shape[0]):
    n = int((segment_ids[r] != 0).sum())
    if n:
      out_t[r, -n:] = tokens[r, :n]
      out_s[r, -n:] = segment_ids[r, :n]
  return out_t, out_s


class VQAEvaluator:
  def __init__(
      self,
      name: str,
      *,
      model: Any,
      tokenizer: Any,
      data_config: Any,
      workdir: str,
      split: str = "test",
      max_new_tokens: int = 6,
      image_token: str = "<image>",
      max_examples: int | None = None,
  ):
    self.name, self.model, self.tokenizer = name, model, tokenizer
    self.data_config = data_config.copy_and_resolve_references()
    self.data_config.unlock()
    self.data_config.split = split
    self.data_config.shuffle = False
    self.data_config.packing = False
    self.workdir = workdir
    self.max_new_tokens = max_new_tokens
    self.image_token = image_token
    self.max_examples = max_examples

  def _batches(self):
    from llvm_jax.data.pipeline import make_iterator

    return make_iterator(
        self.data_config, self.tokenizer, num_image_tokens=self.model.config.tokens_per_image,
        image_token=self.image_token, mode="eval",
    )

  def predict(self, params: Any) -> list[dict[str, Any]]:
    eos = self.tokenizer.eos_token_id
    records = []
    for batch in self._batches():
      tokens, segment_ids = left_pad(np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"]))
      inputs = {"tokens": jnp.asarray(tokens), "segment_ids": jnp.asarray(segment_ids)}
      for key in ("images", "image_mask", "hires_images"):
        if key in batch:
          inputs[key] = jnp.asarray(batch[key])
      new_tokens, _ = generate.greedy_generate(self.model, params, inputs, self.max_new_tokens)
      new_tokens = np.asarray(new_tokens)
      for r in range(tokens.shape[0]):
        if not segment_ids[r].any():
          continue  # padding row of the last batch
        ids = new_tokens[r].tolist()
        if eos in ids:
          ids = ids[: ids.index(eos)]
        options = batch.get("options")
        records.append({
            "id": _text(batch["id"][r]),
            "prediction": self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
            "answer": _text(batch["answer"][r]),
            "options": [] if options is None else [o for o in _as_list(options[r]) if o],
        })
      if self.max_examples and len(records) >= self.max_examples:
        break
    return records[: self.max_examples] if self.max_examples else records

  @staticmethod
  def score(record: dict[str, Any]) -> bool:
    if record["options"]:
      return option_letter(record["prediction"], len(record["options"])) == record["answer"].strip()
    return normalize_answer(record["prediction"]) == normalize_answer(record["answer"])

  def run(self, params: Any, step: int) -> dict[str, float]:
    records = self.predict(params)
    correct = sum(self.score(r) for r in records)
    totals = multihost_utils.process_allgather(np.asarray([correct, len(records)], np.int64))
    correct, count = np.asarray(totals).reshape(-1, 2).sum(axis=0)
    metrics = {"accuracy": float(correct) / max(int(count), 1), "examples": int(count)}
    out_dir = os.path.join(self.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{self.name}_step{step}_process{jax.process_index()}.json")
    with open(path, "w") as f:
      json.dump({"metrics": metrics, "predictions": records}, f, indent=1)
    return metrics


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _as_list(value: Any) -> list[str]:
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_text(v) for v in value]
  text = _text(value)
  return json.loads(text) if text.startswith("[") else [text]
