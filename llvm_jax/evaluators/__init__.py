"""Pluggable evaluators, big_vision style: `config.evals[name] = dict(type='vqa', ...)`.

An evaluator is built with `make(name, spec, **context)` and used as `evaluator.run(params, step)`,
returning a dict of metrics; it also writes its predictions and metrics as JSON (see vqa.py).
Types: 'vqa' (VQA accuracy, option letters for multiple choice), 'multiple_choice', 'exact_match'.
"""

from __future__ import annotations

from typing import Any

from llvm_jax.evaluators.vqa import ExactMatchEvaluator, GenerativeEvaluator, MultipleChoiceEvaluator, VQAEvaluator

REGISTRY = {"vqa": VQAEvaluator, "multiple_choice": MultipleChoiceEvaluator, "exact_match": ExactMatchEvaluator}


def make(name: str, spec: Any, **context: Any) -> GenerativeEvaluator:
  spec = dict(spec)
  kind = spec.pop("type", None)
  if kind not in REGISTRY:
    raise ValueError(f"evals.{name}.type={kind!r} unknown; expected one of {sorted(REGISTRY)}")
  try:
    return REGISTRY[kind](name=name, **spec, **context)
  except TypeError as e:  # an unknown option: name the eval and the option
    raise ValueError(f"evals.{name} (type {kind!r}): {e}") from None


__all__ = ["make", "REGISTRY", "GenerativeEvaluator", "VQAEvaluator", "MultipleChoiceEvaluator", "ExactMatchEvaluator"]
