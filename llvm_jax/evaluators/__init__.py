"""Pluggable evaluators, big_vision style: `config.evals[name] = dict(type='vqa', ...)`.

An evaluator is built with `make(name, spec, **context)` and used as `evaluator.run(params, step)`,
returning a dict of metrics; it also writes its predictions and metrics as JSON.
"""

from __future__ import annotations

from typing import Any

from llvm_jax.evaluators.vqa import VQAEvaluator, normalize_answer

REGISTRY = {"vqa": VQAEvaluator}


def make(name: str, spec: Any, **context: Any) -> Any:
  spec = dict(spec)
  kind = spec.pop("type", None)
  if kind not in REGISTRY:
    raise ValueError(f"evals.{name}.type={kind!r} unknown; expected one of {sorted(REGISTRY)}")
  return REGISTRY[kind](name=name, **spec, **context)


__all__ = ["make", "REGISTRY", "VQAEvaluator", "normalize_answer"]
