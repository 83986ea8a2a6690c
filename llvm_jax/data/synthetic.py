"""Procedurally drawn visual question answering: coloured shapes on a grid.

Every sample is a function of its seed: an image of `grid x grid` cells, some of them holding one
big solid shape (each (colour, shape) pair at most once per image, so "where is the red circle?"
has one answer), and one question about colour, shape, count or position. A fraction of the
samples is multiple choice (options lettered A, B, C, ...; the answer is the letter).

The visual signal is deliberately large (one shape fills most of its cell, few colours, few
shapes, a black background) so that a tiny ViT on 32-64 px images learns it in minutes on a CPU.
Prompts follow LLaVA-1.5's VQA suffixes ("Answer the question using a single word or phrase." /
"Answer with the option's letter from the given choices directly.").

    sample = draw_sample(sample_seed(0, "train", 17), SyntheticSpec(image_size=64, grid=2))
    sample["image"]     # (64, 64, 3) uint8
    sample["question"]  # "<image>\\n" is *not* included; the pipeline adds the marker
    sample["answer"]    # e.g. "red" or "B"
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Saturated, well separated colours (RGB).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 80, 240),
    "yellow": (240, 220, 30),
    "white": (235, 235, 235),
    "purple": (150, 40, 200),
}
DEFAULT_COLORS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")
QUESTION_TYPES = ("color", "shape", "count", "position")
SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}
OPTION_LETTERS = "ABCDEFGH"

# Joins the two answers of an ambiguous (hedged) rejected answer: 'red or blue'.
AMBIGUOUS_JOINER = "or"
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
MULTIPLE_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."

_ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLS = {2: ("left", "right"), 3: ("left", "center", "right")}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
  """What a synthetic sample may contain.

  image_size: side of the square image in pixels.
  grid: 2 or 3 (cells per side).
  colors / shapes: names from COLORS / SHAPES.
  question_types: subset of QUESTION_TYPES, drawn uniformly.
  mc_fraction: probability that a sample is multiple choice.
  num_options: options of a multiple-choice question (fewer if there are fewer candidates).
  min_objects / max_objects: objects per image (max None = grid * grid).
  object_scale: size of a shape relative to its cell (1.0: it fills most of the cell). Small values
    make shapes that are distinct at `image_size` but blur together at lower resolutions (the
    'detail' configs, for DeepStack).
  """

  image_size: int = 64
  grid: int = 2
  colors: tuple[str, ...] = DEFAULT_COLORS
  shapes: tuple[str, ...] = SHAPES
  question_types: tuple[str, ...] = QUESTION_TYPES
  mc_fraction: float = 0.25
  num_options: int = 4
  min_objects: int = 1
  max_objects: int | None = None
  object_scale: float = 1.0

  def __post_init__(self):
    if self.grid not in _ROWS:
      raise ValueError(f"grid must be 2 or 3, got {self.grid}")
    if self.image_size < 8 * self.grid:
      raise ValueError(f"image_size={self.image_size} too small for a {self.grid}x{self.grid} grid")
    unknown = [c for c in self.colors if c not in COLORS]
    if unknown or len(self.colors) < 2:
      raise ValueError(f"colors must be >= 2 names from {sorted(COLORS)}, got {self.colors}")
    if any(s not in SHAPES for s in self.shapes) or len(self.shapes) < 2:
      raise ValueError(f"shapes must be >= 2 names from {SHAPES}, got {self.shapes}")
    if not self.question_types or any(q not in QUESTION_TYPES for q in self.question_types):
      raise ValueError(f"question_types must be a non-empty subset of {QUESTION_TYPES}")
    if not 0.0 < self.object_scale <= 1.0:
      raise ValueError(f"object_scale must be in (0, 1], got {self.object_scale}")
    if not 0.0 <= self.mc_fraction <= 1.0:
      raise ValueError(f"mc_fraction must be in [0, 1], got {self.mc_fraction}")
    if not 2 <= self.num_options <= len(OPTION_LETTERS):
      raise ValueError(f"num_options must be in [2, {len(OPTION_LETTERS)}]")
    cells = self.grid * self.grid
    hi = self.max_objects if self.max_objects is not None else cells
    if not 1 <= self.min_objects <= hi <= min(cells, len(self.colors) * len(self.shapes)):
      raise ValueError(
          f"need 1 <= min_objects <= max_objects <= min(cells, colours*shapes); got "
          f"{self.min_objects}, {hi}, cells={cells}"
      )

  @property
  def objects_range(self) -> tuple[int, int]:
    return self.min_objects, (self.max_objects if self.max_objects is not None else self.grid**2)


def position_names(grid: int) -> list[str]:
  """Cell names in row-major order: 'top left', 'top right', ... ('center' for the 3x3 middle)."""
  names = []
  for r in _ROWS[grid]:
    for c in _COLS[grid]:
      names.append("center" if (r, c) == ("middle", "center") else f"{r} {c}")
  return names


def sample_seed(seed: int, split: str, index: int) -> tuple[int, int, int]:
  """The seed of sample `index` of `split` (train/validation/test) for a dataset seed."""
  return (int(seed), SPLIT_IDS[split], int(index))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, rgb) -> None:
  if shape == "square":
    s = 0.85 * r  # similar area to the circle
    draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
  elif shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
  elif shape == "triangle":
    draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
  else:
    raise ValueError(shape)


def render(objects: Sequence[dict[str, Any]], spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
  """Draws `objects` ({'cell', 'color', 'shape'}) on a black image; small jitter from `rng`."""
  size, grid = spec.image_size, spec.grid
  img = Image.new("RGB", (size, size), (0, 0, 0))
  draw = ImageDraw.Draw(img)
  cell = size / grid
  for obj in objects:
    row, col = divmod(obj["cell"], grid)
    r = cell / 2 * rng.uniform(0.72, 0.86) * spec.object_scale
    slack = cell / 2 - r
    cx = (col + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
    cy = (row + 0.5) * cell + rng.uniform(-slack, slack) * 0.8
    _draw_shape(draw, obj["shape"], cx, cy, r, COLORS[obj["color"]])
  return np.asarray(img, dtype=np.uint8)


def draw_sample(seed: int | Sequence[int], spec: SyntheticSpec = SyntheticSpec()) -> dict[str, Any]:
  """Draws one sample from `seed` (an int or a tuple such as `sample_seed(...)`).

  Returns a dict: image (H, W, 3) uint8, question (str, with the answer-format suffix and the
  lettered options for multiple choice), answer (str), options (list[str], empty unless multiple
  choice), question_type, multiple_choice (bool), objects (list of {'cell','color','shape'}).
  """
  rng = np.random.default_rng(seed)
  grid = spec.grid
  positions = position_names(grid)
  lo, hi = spec.objects_range
  n = int(rng.integers(lo, hi + 1))
  cells = sorted(int(c) for c in rng.choice(grid * grid, size=n, replace=False))
  pairs = rng.choice(len(spec.colors) * len(spec.shapes), size=n, replace=False)
  objects = [
      {"cell": c, "color": spec.colors[int(p) // len(spec.shapes)], "shape": spec.shapes[int(p) % len(spec.shapes)]}
      for c, p in zip(cells, pairs)
  ]
  image = render(objects, spec, rng)

  qtype = spec.question_types[int(rng.integers(len(spec.question_types)))]
  target = objects[int(rng.integers(n))]
  if qtype == "color":
    question = f"What color is the shape in the {positions[target['cell']]}?"
    answer, candidates = target["color"], list(spec.colors)
  elif qtype == "shape":
    question = f"What shape is in the {positions[target['cell']]}?"
    answer, candidates = target["shape"], list(spec.shapes)
  elif qtype == "count":
    question = "How many shapes are there?"
    answer, candidates = str(n), [str(k) for k in range(lo, hi + 1)]
  else:  # position
    question = f"Where is the {target['color']} {target['shape']}?"
    answer, candidates = positions[target["cell"]], positions

  multiple_choice = bool(rng.random() < spec.mc_fraction) and len(candidates) >= 2
  options: list[str] = []
  if multiple_choice:
    k = min(spec.num_options, len(candidates))
    others = [c for c in candidates if c != answer]
    picked = [others[int(i)] for i in rng.choice(len(others), size=k - 1, replace=False)]
    options = picked + [answer]
    options = [options[int(i)] for i in rng.permutation(k)]
    letter = OPTION_LETTERS[options.index(answer)]
    lines = [f"{OPTION_LETTERS[i]}. {opt}" for i, opt in enumerate(options)]
    text = question + "\n" + "\n".join(lines) + "\n" + MULTIPLE_CHOICE_PROMPT
    answer = letter
  else:
    text = question + "\n" + SHORT_ANSWER_PROMPT
  return {
      "image": image,
      "question": text,
      "answer": answer,
      "options": options,
      "question_type": qtype,
      "multiple_choice": multiple_choice,
      "objects": objects,
  }


def encode_png(image: np.ndarray) -> bytes:
  """uint8 (H, W, 3) -> PNG bytes (deterministic)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def corpus_texts(max_grid: int = 3) -> list[str]:
  """Every question, option line and answer the generator can produce (for all colours, shapes
  and grids up to `max_grid`), as strings: the tiny tokenizer's vocabulary is built from these."""
  texts = [SHORT_ANSWER_PROMPT, MULTIPLE_CHOICE_PROMPT, AMBIGUOUS_JOINER]
  texts += [f"{letter}." for letter in OPTION_LETTERS]
  for grid in range(2, max_grid + 1):
    for pos in position_names(grid):
      texts.append(f"What color is the shape in the {pos}?")
      texts.append(f"What shape is in the {pos}?")
    texts += [str(k) for k in range(0, grid * grid + 1)]
  texts.append("How many shapes are there?")
  for color in COLORS:
    for shape in SHAPES:
      texts.append(f"Where is the {color} {shape}?")
  return texts


REJECTED_KINDS = ("incorrect", "ambiguous", "mixed")


def preference_records(
    records: Sequence[Mapping[str, Any]], seed: int = 0, rejected: str = "incorrect"
) -> list[dict[str, Any]]:
  """Preference triples for Phantom Optimization from synthetic_vqa records.

  chosen = the record's answer. rejected, by `rejected`:
  - 'incorrect': an incorrect answer of the same kind: another option's letter for multiple choice,
    else an answer that other records give to questions of the same type (a plausible, wrong answer:
    a colour for a colour question, a count for a count question...);
  - 'ambiguous': a hedge that names the right answer and a wrong one, in random order ('red or
    blue'; multiple choice: 'B or D'), the Phantom paper's ambiguous answers;
  - 'mixed': each record one of the two at random.
  Records whose type has a single answer are left out.
  """
  if rejected not in REJECTED_KINDS:
    raise ValueError(f"rejected must be one of {REJECTED_KINDS}, got {rejected!r}")

  def text(value):
    return value.decode() if isinstance(value, bytes) else str(value)

  answers_by_type: dict[str, set[str]] = {}
  for rec in records:
    if not bool(rec["multiple_choice"]):
      answers_by_type.setdefault(text(rec["question_type"]), set()).add(text(rec["answer"]))
  rng = np.random.default_rng(seed)
  out = []
  for rec in records:
    answer = text(rec["answer"])
    if bool(rec["multiple_choice"]):
      wrong = [OPTION_LETTERS[i] for i in range(len(rec["options"])) if OPTION_LETTERS[i] != answer]
    else:
      wrong = sorted(answers_by_type[text(rec["question_type"])] - {answer})
    if not wrong:
      continue
    other = wrong[int(rng.integers(len(wrong)))]
    kind = rejected if rejected != "mixed" else REJECTED_KINDS[int(rng.integers(2))]
    if kind == "ambiguous":
      first, second = (answer, other) if rng.random() < 0.5 else (other, answer)
      other = f"{first} {AMBIGUOUS_JOINER} {second}"
    out.append(
        {
            "id": text(rec["id"]),
            "image": rec["image"],
            "question": text(rec["question"]),
            "chosen": answer,
            "rejected": other,
        }
    )
  return out
