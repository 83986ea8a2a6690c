"""Generative evaluators on a TFDS split: VQA accuracy, multiple-choice accuracy, exact match.

Each process generates answers for its shard of the split (the eval pipeline shards by process;
the padded last batch's empty rows are dropped), prompts trimmed to a length bucket so each bucket
compiles once. Counts are summed over processes; every process writes its predictions, in data
order, to `<workdir>/eval/<name>_step<N>_process<i>.json` and process 0 the summed metrics to
`<workdir>/eval/<name>_step<N>_metrics.json`.

Records that carry a `question_type` (synthetic_vqa: color / shape / count / position; taken from
the batch if it has the field, else looked up by id in the split's records) are also scored per
type: `accuracy/<type>`, `examples/<type>` and, with a baseline split, `chance/<type>`, next to the
overall `accuracy` / `examples` / `chance` (the trainer writes them as `eval/<name>/accuracy/<type>`).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from llvm_jax import sampler
from llvm_jax.data import records as data_records
from llvm_jax.data.config import resolve
from llvm_jax.data.pipeline import make_iterator, open_data_source
from llvm_jax.evaluators import scoring


class GenerativeEvaluator:
  """Shared machinery: batches, sampling, host sums, JSON output. Subclasses define `score`.

  baseline_split: if set (e.g. 'train'), also reports `chance`: the accuracy of the blind
  question-prior baseline (scoring.question_prior) fitted on that split, on the same examples.
  dataset: the TFDS name to evaluate on (default: the training data's `data.name`), e.g.
  'synthetic_vqa/large' after training on its preference triples.
  """

  def __init__(
      self,
      name: str,
      *,
      model: Any,
      tokenizer: Any,
      data_config: Any,
      workdir: str,
      split: str = "test",
      max_new_tokens: int = 8,
      image_token: str = "<image>",
      max_examples: int | None = None,
      buckets: Sequence[int] = sampler.DEFAULT_BUCKETS,
      baseline_split: str | None = None,
      dataset: str | None = None,
  ):
    self.name, self.model, self.tokenizer = name, model, tokenizer
    self.data_config = data_config.copy_and_resolve_references()
    self.data_config.unlock()
    self.data_config.update(split=split, shuffle=False, packing=False)
    if dataset:  # evaluate on another dataset than the training data (e.g. VQA after preference training)
      self.data_config.update(name=dataset)
    self.settings = resolve(self.data_config)  # validated once, defaults from data/config.py
    self.workdir = workdir
    self.sampling = sampler.SamplingConfig(max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id)
    self.image_token = image_token
    self.max_examples = max_examples
    self.buckets = tuple(buckets)
    self.baseline_split = baseline_split
    self._prior = None
    self._types_by_id: dict[str, str] | None = None

  def score(self, record: dict[str, Any]) -> float | None:
    """The record's score in [0, 1], or None if this evaluator does not score it."""
    raise NotImplementedError

  def _batches(self):
    return make_iterator(
        self.data_config,
        self.tokenizer,
        num_image_tokens=self.model.config.tokens_per_image,
        image_token=self.image_token,
        mode="eval",
    )

  def predict(self, params: Any) -> list[dict[str, Any]]:
    """Greedy answers for this process's examples, in data order (padding rows dropped)."""
    records = []
    for batch in self._batches():
      types = [_text(t) for t in batch["question_type"]] if "question_type" in batch else None
      tokens, segment_ids, rows = sampler.left_align(
          np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"]), self.buckets
      )
      inputs = {"tokens": tokens, "segment_ids": segment_ids}
      for key in ("images", "image_mask", "hires_images", "hires_grid"):
        if key in batch:
          inputs[key] = np.asarray(batch[key])
      out = sampler.sample(self.model, params, inputs, self.sampling)
      new_tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
      for r in np.flatnonzero(rows):
        ids = new_tokens[r, : lengths[r]].tolist()
        records.append(
            {
                "id": _text(batch["id"][r]),
                "question": _text(batch["question"][r]) if "question" in batch else "",
                "prediction": self.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                "answer": _text(batch["answer"][r]),
                "options": [o for o in (_text(v) for v in batch["options"][r]) if o] if "options" in batch else [],
            }
        )
        if types is not None:
          records[-1]["question_type"] = types[r]
        if self.max_examples and len(records) >= self.max_examples:
          return self._with_question_types(records)
    return self._with_question_types(records)

  def _with_question_types(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`records`, each given its record's question_type when the batches did not carry it."""
    if records and "question_type" not in records[0]:
      by_id = self._question_types()
      for record in records:
        if record["id"] in by_id:
          record["question_type"] = by_id[record["id"]]
    return records

  def _question_types(self) -> dict[str, str]:
    """id -> question_type of the evaluated split's records; {} if its records have no such field."""
    if self._types_by_id is None:
      self._types_by_id = {}
      source = open_data_source(self.settings.name, self.settings.split, self.settings.data_dir)
      if len(source) and "question_type" in source[0]:
        for i in range(len(source)):
          rec = source[i]
          if rec.get("question_type") is not None:
            qtype = data_records.as_text(rec["question_type"], "question_type")
            self._types_by_id[data_records.record_id(rec)] = qtype
    return self._types_by_id

  def _baseline(self):
    if self._prior is None:
      source = open_data_source(self.settings.name, self.baseline_split, self.settings.data_dir)
      examples = []
      for i in range(len(source)):
        try:
          ex = data_records.to_example(source[i])
        except data_records.SampleError:
          continue
        examples.append((data_records.first_question(ex), ex.answer, bool(ex.options)))
      self._prior = scoring.question_prior(examples)
    return self._prior

  def run(self, params: Any, step: int) -> dict[str, float]:
    records = self.predict(params)
    sums: collections.Counter = collections.Counter()
    for record in records:
      score = self.score(record)
      record["score"] = score
      if score is None:
        sums["skipped"] += 1
        continue
      qtype = record.get("question_type")
      sums["score"] += score
      sums["scored"] += 1
      if qtype is not None:
        sums["score", qtype] += score
        sums["scored", qtype] += 1
      if self.baseline_split:
        guess = self._baseline()(record["question"], bool(record["options"]))
        chance = self.score(dict(record, prediction=guess))
        sums["chance"] += chance
        if qtype is not None:
          sums["chance", qtype] += chance
    # The question types of every process (a process's shard may lack some), sorted.
    types = _all_processes_names({r["question_type"] for r in records if r.get("question_type") is not None})
    keys = ["score", "scored", "skipped", "chance"] + [(k, t) for t in types for k in ("score", "scored", "chance")]
    local = np.asarray([sums[k] for k in keys], np.float64)
    totals = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(keys)).sum(axis=0)
    total = dict(zip(keys, totals.tolist()))
    metrics = {
        "accuracy": total["score"] / max(total["scored"], 1),
        "examples": int(total["scored"]),
        "skipped": int(total["skipped"]),
    }
    if self.baseline_split:
      metrics["chance"] = total["chance"] / max(total["scored"], 1)
    for t in types:
      scored = total["scored", t]
      if not scored:  # every record of this type was skipped (e.g. multiple_choice on open ones)
        continue
      metrics[f"accuracy/{t}"] = total["score", t] / scored
      metrics[f"examples/{t}"] = int(scored)
      if self.baseline_split:
        metrics[f"chance/{t}"] = total["chance", t] / scored
    out_dir = os.path.join(self.workdir, "eval")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{self.name}_step{step}_process{jax.process_index()}.json"), "w") as f:
      json.dump({"metrics": metrics, "predictions": records}, f, indent=1)
    if jax.process_index() == 0:
      with open(os.path.join(out_dir, f"{self.name}_step{step}_metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics


class VQAEvaluator(GenerativeEvaluator):
  """Open questions: VQA accuracy (normalised); multiple-choice questions: the extracted letter."""

  def score(self, record: dict[str, Any]) -> float | None:
    if record["options"]:
      return float(scoring.option_letter(record["prediction"], record["options"]) == record["answer"].strip())
    return scoring.vqa_accuracy(record["prediction"], _answers(record["answer"]))


class MultipleChoiceEvaluator(GenerativeEvaluator):
  """Multiple-choice questions only (others are skipped and counted): the extracted option letter."""

  def score(self, record: dict[str, Any]) -> float | None:
    if not record["options"]:
      return None
    return float(scoring.option_letter(record["prediction"], record["options"]) == record["answer"].strip())


class ExactMatchEvaluator(GenerativeEvaluator):
  """The prediction equals the answer (surrounding whitespace aside)."""

  def score(self, record: dict[str, Any]) -> float | None:
    return float(scoring.exact_match(record["prediction"], record["answer"]))


def _all_processes_names(local: set[str]) -> list[str]:
  """The sorted union of `local` over every process (each process passes its own set)."""
  if jax.process_count() == 1:
    return sorted(local)
  encoded = np.frombuffer(json.dumps(sorted(local)).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.asarray([encoded.size], np.int64))).reshape(-1)
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[: encoded.size] = encoded
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), -1)
  return sorted(set().union(*(json.loads(row[:n].tobytes().decode()) for row, n in zip(gathered, lengths))))


def _answers(answer: str) -> list[str]:
  """A stored answer, or a JSON list of human answers (VQAv2 style)."""
  if answer.startswith("["):
    try:
      parsed = json.loads(answer)
    except json.JSONDecodeError:
      return [answer]
    if isinstance(parsed, list) and parsed and all(isinstance(a, str) for a in parsed):
      return parsed
  return [answer]


def _text(value: Any) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)
