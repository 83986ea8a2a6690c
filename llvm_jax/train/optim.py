"""The optimiser: AdamW with warmup + cosine, clipping, a weight-decay mask, and regex rules that
freeze parameter groups or scale their learning rate (big_vision style).

`config.optim.trainable` is a list of `(regex, lr_mult)` matched in order against '/'-joined
parameter paths (first match wins); `lr_mult=None` freezes the group (no optimiser state, zero
updates, so its values stay bit-identical). A path no rule matches is an error, so a typo in a rule
cannot silently freeze or train the wrong weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import optax

from llvm_jax.tree_utils import flatten, unflatten

FROZEN = "frozen"


def lr_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `optim.decay_steps` (0: at
  `total_steps`)."""
  warmup = int(optim.warmup_steps)
  if int(optim.decay_steps) < 0:
    raise ValueError(f"optim.decay_steps={optim.decay_steps}: must be >= 0 (0: train.total_steps)")
  total_steps = int(optim.decay_steps) or total_steps
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim.lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=optim.lr * optim.min_lr_ratio,
  )


def group_labels(params: Any, rules: Sequence[tuple[str, float | None]]) -> Any:
  """A tree like `params` whose leaves name their group: FROZEN or 'lr_x<mult>'."""
  compiled = [(re.compile(pattern), mult) for pattern, mult in rules]
  labels = {}
  for path in flatten(params):
    for pattern, mult in compiled:
      if pattern.fullmatch(path):
        labels[path] = FROZEN if mult is None else f"lr_x{float(mult)}"
        break
    else:
      raise ValueError(f"no rule in optim.trainable matches parameter {path!r}; rules: {[r for r, _ in rules]}")
  return unflatten(labels)


def decay_mask(params: Any, no_decay: str) -> Any:
  """True for parameters that get weight decay: not matching `no_decay` (norms, biases...)."""
  pattern = re.compile(no_decay)
  return unflatten({path: not pattern.search(path) for path in flatten(params)})


def make_optimizer(
    optim: ml_collections.ConfigDict, params: Any, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The full transformation and the base learning-rate schedule (for logging)."""
  schedule = lr_schedule(optim, total_steps)
  labels = group_labels(params, [tuple(r) for r in optim.trainable])
  groups = sorted(set(jax.tree.leaves(labels)))
  transforms = {}
  for group in groups:
    if group == FROZEN:
      transforms[group] = optax.set_to_zero()
      continue
    mult = float(group[len("lr_x") :])
    transforms[group] = optax.adamw(
        lambda step, mult=mult: schedule(step) * mult,
        b1=optim.b1,
        b2=optim.b2,
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        mask=decay_mask(params, optim.no_decay),
    )
  tx = optax.multi_transform(transforms, labels)
  if optim.grad_clip:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx, schedule


def trainable_mask(params: Any, rules: Sequence[tuple[str, float | None]]) -> Any:
  """True for parameters that train under `rules`."""
  return jax.tree.map(lambda label: label != FROZEN, group_labels(params, rules))


def default_optim_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.lr = 1e-3
  c.min_lr_ratio = 0.0
  c.warmup_steps = 10
  # Steps of the cosine decay; 0: train.total_steps. Set it to stop a run early (or extend it) on the
  # learning-rate schedule of another length.
  c.decay_steps = 0
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0
  # Parameters whose path matches get no weight decay.
  c.no_decay = r"(norm|bias|embedding|cls_token|pos_embed|lambda_|phantom/eta)"
  c.grad_clip = 1.0
  # (regex, lr_mult or None to freeze), first match wins; see module docstring.
  c.trainable = [(".*", 1.0)]
  return c


# Stage presets (big_vision-style freeze rules), applied by `config_utils.set_stage`:
#   pretrain: LLaVA stage 1, the projector only (vision tower and LLM frozen);
#   sft: LLaVA stage 2, projector + LLM (vision frozen); sft_full: everything (vision too);
#   po1 / po2: Phantom Optimization step 1 (projector + phantom modules, LLM frozen) / step 2;
#   trol1: TroL step 1, projector + TroL-Mixers with the backbone frozen.
STAGE_RULES: dict[str, list[tuple[str, float | None]]] = {
    "pretrain": [("projector/.*", 1.0), (".*", None)],
    "sft": [("vision/.*", None), (".*", 1.0)],
    "sft_full": [(".*", 1.0)],
    "po1": [("projector/.*", 1.0), (".*/phantom/.*", 1.0), (".*", None)],
    "po2": [(".*", 1.0)],
    "trol1": [("projector/.*", 1.0), (".*/trol_gate/.*", 1.0), (".*", None)],
}
STAGE_LOSS = {"po1": "po", "po2": "po"}
