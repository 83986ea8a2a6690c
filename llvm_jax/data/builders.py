"""TFDS builders that write ArrayRecord from local files, without TensorFlow.

  synthetic_vqa   procedurally drawn shapes-on-a-grid VQA (train / validation / test), sized by
                  its config; no input files.
  synthetic_preference  (image, question, chosen, rejected) triples from synthetic_vqa samples, with
                  incorrect, ambiguous ('red or blue') or mixed rejected answers; no input files.
  llava_instruct  the LLaVA JSON format: [{"id", "image": path | [paths] (optional),
                  "conversations": [{"from": "human"|"gpt", "value"}]}], JSON list or JSONL;
                  covers the LLaVA pretrain captions and the SFT mixes.
  preference      [{"id", "image": path | [paths], "question", "chosen", "rejected"}] triples for
                  Phantom Optimization.

Images are stored as their original encoded bytes (PNG/JPEG/...) in a
`Tensor(shape=(), dtype=object)` feature and decoded with PIL by the grain pipeline, so a record
that cannot be decoded at read time is counted and skipped there, and no image is re-encoded.
(`tfds.features.Image(encoding_format='png')` also works without TensorFlow here, but it decodes
inside the data source, where a bad image would raise instead of being counted, and it holds one
fixed-channel image per feature.)

Input files come from the config (`json_files`, `image_root`) or from the manual dir
(`download_config=tfds.download.DownloadConfig(manual_dir=...)`): `{split}.json` / `{split}.jsonl`
there, image paths relative to `image_root` (default: the manual dir). Records with a missing or
corrupt image, an empty or malformed conversation (or preference triple) are skipped, logged with
their id and summarised in a report logged at the end of each split (`builder.skip_reports`);
with `strict=True` the first one raises `BadRecordError` naming the id.

    build_dataset("synthetic_vqa", data_dir, config="small")
    build_dataset("llava_instruct", data_dir, config="sft", manual_dir="/data/llava")
    source = tfds.data_source("synthetic_vqa/small", split="train", data_dir=data_dir)
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from llvm_jax.data import records, synthetic
from llvm_jax.data.records import SampleError, SkipReport

log = logging.getLogger(__name__)
_BYTES = tfds.features.Tensor(shape=(), dtype=np.object_)


class _SkipReportsMixin:
  """`skip_reports` ({split: SkipReport}), filled by `_generate_examples` and written by `build_dataset`."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self.skip_reports: dict[str, SkipReport] = {}


class _CodePathMixin:
  """TFDS 4.9.10's `DatasetBuilder.code_path` needs the `importlib_resources` backport (not a
  dependency on Python >= 3.9) for builders defined in a package; the file path is what it
  would compute, so give it directly."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


# -- shared helpers ------------------------------------------------------------------------------
class _BadLine:
  """A JSONL line that is not UTF-8 or not JSON: skipped and counted like any bad record."""

  def __init__(self, detail: str):
    self.detail = detail


def _load_json_records(path: epath.Path) -> list[tuple[str, Any]]:
  """A JSON list (or {"data": [...]}) or JSONL file -> [(default id, record)].

  The default id names the file and the JSONL line number (or the record index in a JSON list). A
  JSONL line that does not decode gives a _BadLine (skipped and counted by the caller); a JSON
  file that does not parse raises ValueError naming the file, line and column.
  """
  raw = path.read_bytes()
  if path.suffix == ".jsonl":
    out = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        out.append((f"{path.name}:{lineno}", json.loads(line.decode("utf-8"))))
      except UnicodeDecodeError as e:
        out.append((f"{path.name}:{lineno}", _BadLine(f"{path}:{lineno}: not UTF-8 (byte {e.start} of the line)")))
      except ValueError as e:
        out.append((f"{path.name}:{lineno}", _BadLine(f"{path}:{lineno}: not JSON ({e})")))
    return out
  try:
    data = json.loads(raw.decode("utf-8"))
  except UnicodeDecodeError as e:
    line = raw[: e.start].count(b"\n") + 1
    raise ValueError(
        f"{path}:{line}: not UTF-8 (byte offset {e.start}); a JSON list is read whole, so fix the file "
        "(or convert it to JSONL, whose bad lines are skipped and counted)"
    ) from None
  except json.JSONDecodeError as e:
    raise ValueError(
        f"{path}:{e.lineno}:{e.colno}: invalid JSON ({e.msg}); a JSON list is read whole, so fix the "
        "file (or convert it to JSONL, whose bad lines are skipped and counted)"
    ) from None
  if isinstance(data, Mapping) and isinstance(data.get("data"), list):
    data = data["data"]
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of records")
  return [(f"{path.name}:{i}", rec) for i, rec in enumerate(data)]


def _record_id(rec: Any, default: str) -> str:
  """The record's id for reports and the stored `id` feature (always valid UTF-8 text)."""
  rid = records.record_id(rec, default=default) if isinstance(rec, Mapping) else default
  return rid.encode("utf-8", "backslashreplace").decode("utf-8")


def _unexpected(e: Exception) -> SampleError:
  """Any other error of one record's content (wrong types deep inside it): the record is skipped."""
  return SampleError("malformed_record", f"{type(e).__name__}: {str(e)[:200]}")


def _read_image(path: epath.Path, verify: bool) -> bytes:
  """The file's bytes; SampleError if missing, empty or (with verify) not a decodable image."""
  try:
    if not path.exists():
      raise SampleError("missing_image", f"no file {path}")
    if not path.is_file():
      raise SampleError("missing_image", f"{path} is not a file")
    data = path.read_bytes()
  except (OSError, ValueError) as e:  # a directory, no permission, NUL or surrogate in the path...
    raise SampleError("missing_image", f"cannot read {path}: {type(e).__name__}: {e}") from None
  if not data:
    raise SampleError("missing_image", f"empty file {path}")
  if verify:
    records.decode_image(data)  # raises SampleError('corrupt_image')
  return data


def _image_paths(value: Any) -> list[str]:
  if value is None or value == "":
    return []
  if isinstance(value, str):
    return [value]
  if isinstance(value, Sequence) and all(isinstance(v, str) and v for v in value):
    for v in value:
      records.as_text(v, "image path")  # valid Unicode (stored as text)
    return list(value)
  raise SampleError("malformed_record", f"'image' must be a path or a list of paths, got {value!r}")


class _LocalFilesMixin(_SkipReportsMixin):
  """Finds a config's input files (config fields or the manual dir) and tracks skip reports."""

  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put {split}.json or {split}.jsonl (a JSON list or JSON lines of records) and the images "
      "they name in the manual dir, or set json_files / image_root in the builder config."
  )

  def __init__(self, *, strict: bool | None = None, **kwargs):
    super().__init__(**kwargs)
    self._strict_override = strict

  @property
  def strict(self) -> bool:
    return self.builder_config.strict if self._strict_override is None else self._strict_override

  def _manual_dir(self, dl_manager) -> epath.Path | None:
    try:
      return epath.Path(dl_manager.manual_dir)
    except Exception:  # TFDS raises when no manual dir exists
      return None

  def _split_files(self, dl_manager) -> tuple[dict[str, list[epath.Path]], epath.Path]:
    cfg = self.builder_config
    manual = self._manual_dir(dl_manager)

    def resolve(p: str) -> epath.Path:
      path = epath.Path(os.path.expanduser(p))
      if not path.is_absolute():
        if manual is None:
          raise ValueError(f"relative path {p!r} in the config needs a manual dir")
        path = manual / p
      return path

    if cfg.json_files:
      files = {
          split: [resolve(p) for p in ([v] if isinstance(v, str) else v)] for split, v in dict(cfg.json_files).items()
      }
    else:
      if manual is None or not manual.exists():
        raise ValueError(
            f"{self.name}: no json_files in the config and no manual dir. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
      files = {}
      for split in ("train", "validation", "test"):
        for ext in (".json", ".jsonl"):
          if (manual / f"{split}{ext}").exists():
            files.setdefault(split, []).append(manual / f"{split}{ext}")
      if not files:
        raise ValueError(
            f"{self.name}: no train/validation/test .json(l) in {manual}. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    for paths in files.values():
      for p in paths:
        if not p.exists():
          raise FileNotFoundError(f"{self.name}: input file {p} does not exist")
    if cfg.image_root:
      root = resolve(cfg.image_root)
    elif manual is not None:
      root = manual
    else:
      root = files[next(iter(files))][0].parent
    return files, root

  def _report(self, split: str) -> SkipReport:
    report = SkipReport(f"{self.name}/{self.builder_config.name} split {split!r}")
    self.skip_reports[split] = report
    return report

  DESCRIPTION = ""

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "id": tfds.features.Text(),
        "images": tfds.features.Sequence(_BYTES),  # encoded bytes, in the record's order
        "image_paths": tfds.features.Sequence(tfds.features.Text()),
        **self._record_features(),
    }
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, features=tfds.features.FeaturesDict(features)
    )

  def _record_features(self) -> dict[str, Any]:
    """The builder's features besides id, images and image_paths."""
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    files, root = self._split_files(dl_manager)
    return {split: self._generate_examples(split, paths, root) for split, paths in files.items()}

  def _generate_examples(self, split: str, paths: list[epath.Path], root: epath.Path):
    """Every valid record of the split's files; the others are skipped into the split's report."""
    report = self._report(split)
    verify = self.builder_config.verify_images
    for f, path in enumerate(paths):
      for i, (default_id, rec) in enumerate(_load_json_records(path)):
        rid = _record_id(rec, default_id)
        try:
          example = self._checked_example(rec, rid, default_id, root, verify)
        except SampleError as e:
          report.skip(rid, e.reason, e.detail, strict=self.strict)
          continue
        report.written += 1
        yield f"{f}:{i}", example
    log.info("%s", report.summary())

  def _checked_example(self, rec: Any, rid: str, default_id: str, root: epath.Path, verify: bool) -> dict[str, Any]:
    """The stored example of one input record; SampleError (any content error) if it must be skipped."""
    try:
      if isinstance(rec, _BadLine):
        raise SampleError("malformed_record", rec.detail)
      if not isinstance(rec, Mapping):
        raise SampleError("malformed_record", f"record is a {type(rec).__name__}, not an object")
      records.as_text(records.record_id(rec, default_id), "id")
      rel, fields = self._parse_record(rec, rid)
      images = [_read_image(root / p, verify) for p in rel]
    except SampleError:
      raise
    except Exception as e:
      raise _unexpected(e) from None
    return {"id": rid, "images": images, "image_paths": rel, **fields}

  def _parse_record(self, rec: Mapping[str, Any], rid: str) -> tuple[list[str], dict[str, Any]]:
    """(image paths, the builder's other features) of a record; raises SampleError if invalid."""
    raise NotImplementedError


# -- synthetic_vqa -------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class SyntheticVqaConfig(tfds.core.BuilderConfig):
  """Size and content of a synthetic_vqa build (see synthetic.SyntheticSpec)."""

  num_train: int = 2000
  num_validation: int = 200
  num_test: int = 200
  image_size: int = 64
  grid: int = 2
  colors: tuple[str, ...] = synthetic.DEFAULT_COLORS
  shapes: tuple[str, ...] = synthetic.SHAPES
  question_types: tuple[str, ...] = synthetic.QUESTION_TYPES
  mc_fraction: float = 0.25
  object_scale: float = 1.0
  min_objects: int = 1
  max_objects: int | None = None
  seed: int = 0

  def spec(self) -> synthetic.SyntheticSpec:
    return synthetic.SyntheticSpec(
        image_size=self.image_size,
        grid=self.grid,
        colors=tuple(self.colors),
        shapes=tuple(self.shapes),
        question_types=tuple(self.question_types),
        mc_fraction=self.mc_fraction,
        object_scale=self.object_scale,
        min_objects=self.min_objects,
        max_objects=self.max_objects,
    )


class SyntheticVqa(_CodePathMixin, _SkipReportsMixin, tfds.core.GeneratorBasedBuilder):
  """Coloured shapes on a grid with colour / shape / count / position questions."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticVqaConfig(
          name="tiny",
          description="256/64/64 samples, 32 px, 2x2 grid",
          num_train=256,
          num_validation=64,
          num_test=64,
          image_size=32,
      ),
      SyntheticVqaConfig(
          name="small",
          description="4000/500/500 samples, 64 px, 2x2 grid",
          num_train=4000,
          num_validation=500,
          num_test=500,
      ),
      # The demo's: the same test split as 'small' (samples are functions of (seed, split, index)),
      # ten times the training images, so a tiny model generalises instead of memorising.
      SyntheticVqaConfig(
          name="large",
          description="40000/500/500 samples, 64 px, 2x2 grid",
          num_train=40000,
          num_validation=500,
          num_test=500,
      ),
      SyntheticVqaConfig(
          name="grid3",
          description="8000/500/500 samples, 64 px, 3x3 grid",
          num_train=8000,
          num_validation=500,
          num_test=500,
          grid=3,
      ),
      # The studies' (experiments/study_*.py). 'basic': colour, shape and position questions, short
      # answers only (no counting, no multiple choice): a task a tiny model learns to convergence in
      # a few thousand steps, so technique effects are not buried under an unfinished run.
      SyntheticVqaConfig(
          name="basic",
          description="40000/500/500 samples, 64 px, 2x2 grid, colour/shape/position short answers",
          num_train=40000,
          num_validation=500,
          num_test=500,
          question_types=("color", "shape", "position"),
          mc_fraction=0.0,
      ),
      # 'detail': one shape per image at 40% of its usual size (about 10 px across at 64 px), so its
      # shape is sharp at 64 px and a few blurred pixels at 32 px, while its colour survives: shape
      # questions need high resolution, colour questions are the control (DeepStack's study).
      SyntheticVqaConfig(
          name="detail",
          description="40000/500/500 samples, 64 px, 2x2 grid, one small shape, shape/colour short answers",
          num_train=40000,
          num_validation=500,
          num_test=500,
          question_types=("shape", "color"),
          mc_fraction=0.0,
          object_scale=0.4,
          max_objects=1,
      ),
  ]
  DEFAULT_CONFIG_NAME = "small"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedural VQA: coloured shapes on a grid (llvm_jax).",
        features=tfds.features.FeaturesDict(
            {
                "id": tfds.features.Text(),
                "image": _BYTES,  # PNG bytes
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "options": tfds.features.Sequence(tfds.features.Text()),
                "question_type": tfds.features.Text(),
                "multiple_choice": np.bool_,
                "num_objects": np.int32,
            }
        ),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    cfg.spec()  # validate early
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "validation": self._generate_examples("validation", cfg.num_validation),
        "test": self._generate_examples("test", cfg.num_test),
    }

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    spec = cfg.spec()
    report = SkipReport(f"{self.name}/{cfg.name} split {split!r}")
    self.skip_reports[split] = report
    for i in range(num):
      s = synthetic.draw_sample(synthetic.sample_seed(cfg.seed, split, i), spec)
      rid = f"{split}_{i:06d}"
      report.written += 1
      yield rid, {
          "id": rid,
          "image": synthetic.encode_png(s["image"]),
          "question": s["question"],
          "answer": s["answer"],
          "options": s["options"],
          "question_type": s["question_type"],
          "multiple_choice": s["multiple_choice"],
          "num_objects": len(s["objects"]),
      }
    log.info("%s", report.summary())


# -- synthetic_preference ------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class SyntheticPreferenceConfig(tfds.core.BuilderConfig):
  """Preference triples drawn from a synthetic_vqa config's training samples: `source` is that
  config or its name (its spec and seed, so the images and questions are that config's), and
  `rejected` the kind of rejected answer (synthetic.REJECTED_KINDS)."""

  source: str | SyntheticVqaConfig = "large"
  rejected: str = "incorrect"
  num_train: int = 4000


def _preference_config(source: str, rejected: str, num_train: int) -> SyntheticPreferenceConfig:
  return SyntheticPreferenceConfig(
      name=f"{source}_{rejected}",
      description=f"{num_train} triples from synthetic_vqa/{source}'s training samples, {rejected} rejected answers",
      source=source,
      rejected=rejected,
      num_train=num_train,
  )


class SyntheticPreference(_CodePathMixin, _SkipReportsMixin, tfds.core.GeneratorBasedBuilder):
  """(image, question, chosen, rejected) from synthetic_vqa samples: the right answer against an
  incorrect one, an ambiguous hedge ('red or blue'), or a mix (Phantom Optimization's data)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      _preference_config(source, kind, 4000) for source in ("large", "basic") for kind in synthetic.REJECTED_KINDS
  ]
  DEFAULT_CONFIG_NAME = "large_incorrect"

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Preference triples from procedural VQA (llvm_jax).",
        features=tfds.features.FeaturesDict(
            {
                "id": tfds.features.Text(),
                "image": _BYTES,  # PNG bytes
                "question": tfds.features.Text(),
                "chosen": tfds.features.Text(),
                "rejected": tfds.features.Text(),
            }
        ),
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    source = cfg.source
    if isinstance(source, str):
      named = {c.name: c for c in SyntheticVqa.BUILDER_CONFIGS}
      if source not in named:
        raise ValueError(
            f"synthetic_preference: unknown synthetic_vqa config {source!r}; expected one of {sorted(named)}"
        )
      source = named[source]
    spec = source.spec()
    samples = []
    for i in range(cfg.num_train):
      s = synthetic.draw_sample(synthetic.sample_seed(source.seed, "train", i), spec)
      samples.append({"id": f"train_{i:06d}", "image": s["image"], **{k: s[k] for k in _SAMPLE_FIELDS}})
    report = SkipReport(f"{self.name}/{cfg.name} split 'train'")
    self.skip_reports["train"] = report
    triples = synthetic.preference_records(samples, seed=source.seed, rejected=cfg.rejected)
    kept = {rec["id"] for rec in triples}
    for sample in samples:
      if sample["id"] not in kept:
        report.skip(sample["id"], "single_answer", "its question type has no wrong answer to reject")
    for rec in triples:
      report.written += 1
      yield rec["id"], {**rec, "image": synthetic.encode_png(rec["image"])}
    log.info("%s", report.summary())


_SAMPLE_FIELDS = ("question", "answer", "options", "question_type", "multiple_choice")


# -- llava_instruct ------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
  """json_files: {split: path or [paths]} (relative to the manual dir) or None for
  {split}.json(l) in the manual dir; image_root: image paths are relative to it (default: the
  manual dir); verify_images: decode every image at build time to catch corrupt files."""

  json_files: Mapping[str, Any] | None = None
  image_root: str | None = None
  strict: bool = False
  verify_images: bool = True


@dataclasses.dataclass(eq=False)
class LlavaInstructConfig(LocalFilesConfig):
  """LocalFilesConfig of llava_instruct; records are LLaVA conversations."""


class LlavaInstruct(_CodePathMixin, _LocalFilesMixin, tfds.core.GeneratorBasedBuilder):
  """LLaVA-format instruction / caption data from local JSON and image files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      LlavaInstructConfig(name="default", description="{split}.json(l) + images in the manual dir"),
      LlavaInstructConfig(
          name="pretrain",
          description="LLaVA-Pretrain captions: blip_laion_cc_sbu_558k.json + images/ in the manual dir",
          json_files={"train": "blip_laion_cc_sbu_558k.json"},
          image_root="images",
      ),
      LlavaInstructConfig(
          name="sft",
          description="LLaVA-1.5 SFT mix: llava_v1_5_mix665k.json + coco/ gqa/ ocr_vqa/ textvqa/ vg/ in the manual dir",
          json_files={"train": "llava_v1_5_mix665k.json"},
      ),
  ]
  DEFAULT_CONFIG_NAME = "default"

  DESCRIPTION = "LLaVA-format conversations with images (llvm_jax)."

  def _record_features(self) -> dict[str, Any]:
    return {"conversations": tfds.features.Sequence({"from": tfds.features.Text(), "value": tfds.features.Text()})}

  def _parse_record(self, rec: Mapping[str, Any], rid: str) -> tuple[list[str], dict[str, Any]]:
    rel = _image_paths(rec.get("image"))
    conv = rec.get("conversations")
    records.normalize_conversation(conv, len(rel))  # validation only: the stored turns are the original ones
    stored = [{"from": str(w), "value": str(v)} for w, v in records.turns_as_list(conv)]
    return rel, {"conversations": stored}


# -- preference ----------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class PreferenceConfig(LocalFilesConfig):
  """LocalFilesConfig of preference; records are (image, question, chosen, rejected)."""


class Preference(_CodePathMixin, _LocalFilesMixin, tfds.core.GeneratorBasedBuilder):
  """(image, question, chosen, rejected) triples for preference optimisation."""

  name = "preference"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [PreferenceConfig(name="default", description="{split}.json(l) + images in the manual dir")]
  DEFAULT_CONFIG_NAME = "default"

  DESCRIPTION = "Preference triples with images (llvm_jax)."

  def _record_features(self) -> dict[str, Any]:
    return {k: tfds.features.Text() for k in ("question", "chosen", "rejected")}

  def _parse_record(self, rec: Mapping[str, Any], rid: str) -> tuple[list[str], dict[str, Any]]:
    rel = _image_paths(rec.get("image", rec.get("images")))
    fields = {k: rec.get(k) for k in ("question", "chosen", "rejected")}
    # Same validation as the pipeline (empty / identical answers, <image> markers).
    records.to_example({"id": rid, "images": [b"x"] * len(rel), **fields})
    return rel, fields


BUILDERS = {
    "synthetic_vqa": SyntheticVqa,
    "synthetic_preference": SyntheticPreference,
    "llava_instruct": LlavaInstruct,
    "preference": Preference,
}


def make_builder(
    name: str,
    data_dir: str | os.PathLike,
    config: str | tfds.core.BuilderConfig | None = None,
    *,
    strict: bool | None = None,
):
  """The builder `name` (one of BUILDERS, optionally 'name/config') writing ArrayRecord to data_dir."""
  if "/" in name:
    if config is not None:
      raise ValueError(f"config given twice: {name!r} and {config!r}")
    name, config = name.split("/", 1)
  if name not in BUILDERS:
    raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(BUILDERS)}")
  kwargs: dict[str, Any] = {"data_dir": os.fspath(data_dir), "file_format": "array_record"}
  if config is not None:
    kwargs["config"] = config
  if strict is not None:
    if name.startswith("synthetic_"):
      raise ValueError(f"{name} has no bad input and no strict option")
    kwargs["strict"] = strict
  return BUILDERS[name](**kwargs)


def build_dataset(
    name: str,
    data_dir: str | os.PathLike,
    config: str | tfds.core.BuilderConfig | None = None,
    *,
    manual_dir: str | os.PathLike | None = None,
    strict: bool | None = None,
    overwrite: bool = False,
):
  """Builds (download_and_prepare, ArrayRecord, no network) and returns the builder.

  The skip report of each split is logged and also written to `skip_report.json` in the
  dataset directory (`builder.data_path`).
  """
  builder = make_builder(name, data_dir, config, strict=strict)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if overwrite:
    mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    if builder.data_path.exists():
      builder.data_path.rmtree()
  download_config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.fspath(manual_dir), download_mode=mode, try_download_gcs=False
  )
  builder.download_and_prepare(file_format="array_record", download_config=download_config)
  if builder.skip_reports:
    report = {split: r.to_dict() for split, r in builder.skip_reports.items()}
    (builder.data_path / "skip_report.json").write_text(json.dumps(report, indent=2))
  return builder


def dataset_dir(name: str, data_dir: str | os.PathLike) -> epath.Path | None:
  """The newest version directory of a built 'name/config' in data_dir, or None."""
  base = epath.Path(data_dir) / name
  if not base.exists():
    return None
  versions = [p for p in base.iterdir() if p.is_dir() and (p / "dataset_info.json").exists()]
  if not versions:
    return None
  return max(
      versions, key=lambda p: tuple(int(x) for x in p.name.split(".")) if p.name.replace(".", "").isdigit() else (-1,)
  )
