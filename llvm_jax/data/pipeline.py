"""The grain input pipeline: TFDS ArrayRecord source -> decode -> vision preprocessing ->
chat template -> `<image>` placeholders -> assistant-only labels -> (packed) fixed-length batches.

    it = make_iterator(data_cfg, tokenizer, num_image_tokens=576, image_token="<image>", mesh=mesh)
    batch = next(it)            # dict, see below
    state = it.get_state()      # bytes (JSON); grain.checkpoint.CheckpointSave(it) works too
    it.set_state(state)         # resumes with exactly the batches that followed

Batch (numpy arrays with leading dim B = per-process batch; jax global arrays when `mesh` is
given, strings staying numpy):
  tokens       int32 (B, S)   input ids; each image is `num_image_tokens` (InternVL:
                              tiles * num_image_tokens) copies of the image token id
  segment_ids  int32 (B, S)   0 = padding, 1..n = packed sample index in the row
  positions    int32 (B, S)   restart at 0 for each segment, 0 on padding
  targets      int32 (B, S)   tokens[t+1] within the same segment, else 0
  target_mask  float32 (B, S) 1.0 where targets[t] is an answer token (eos / end-of-turn included)
  images       float32 (B, max_images, H, W, 3) normalised NHWC (InternVL: tiles), zeros unused
  image_mask   bool (B, max_images)
  hires_images float32 (B, max_images, g_h*g_w, S, S, 3)   only with deepstack_grid
  hires_grid   int32 (B, max_images, 2)   each slot's crop grid (a, b); only with deepstack_grid_mode 'aspect'
  eval mode adds: id (B,) str, question (B,) str (first user turn), answer (B,) str, options (B, K) str ('' = none)
Preference data: tokens/segment_ids/positions/targets/target_mask are (B, 2, S), index 0 =
chosen, 1 = rejected; the images are shared.

Per-record work (decode, preprocess, tokenise) runs in grain's DataLoader (`num_workers`
processes); rows are assembled in the calling process. A bad record becomes a skip marker that
is counted in `it.stats` and logged with its id (or raises `BadRecordError` with strict=True).
The iterator state is the DataLoader state at the last record that went into (or was skipped
before) the last returned batch, plus the counters, so restoring re-reads exactly the records of
the following batches.

Sharding: each process reads the contiguous shard `sources.even_split(len(source), ShardByJaxProcess())`
of the records (all of them when the count does not divide evenly, unless drop_remainder), and
shuffles within it; with a finite number of epochs and several processes, every process returns
the same number of batches (completed with all-padding batches) so that `make_global_batch`
never waits on a process that has run out.

Modules: `sources` (opening a dataset, per-process shards), `processing` (record -> tokenised
example, in grain's workers), `batching` (examples -> rows -> arrays); this one assembles them
into the checkpointable `DataIterator` and the global batch.
"""

from __future__ import annotations

import collections
import functools
import gc
import json
import math
import os
import pickle
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain.python as grain
import ml_collections
import numpy as np

from llvm_jax.data import records, vision
from llvm_jax.data.batching import SEQUENCE_KEYS, BatchBuilder
from llvm_jax.data.config import DataSettings, resolve
from llvm_jax.data.processing import MODES, ProcessRecord, exit_with_parent, num_channels
from llvm_jax.data.records import SkipReport
from llvm_jax.data.sources import ShardedSource, largest_shard, open_data_source, records_repr
from llvm_jax.data.tokenizer import load_tokenizer

# Re-exported: callers import these from here.
__all__ = [
    "MODES",
    "SEQUENCE_KEYS",
    "BatchBuilder",
    "DataIterator",
    "ProcessRecord",
    "ShardedSource",
    "check_data_sharding",
    "exit_with_parent",
    "make_global_batch",
    "make_iterator",
    "open_data_source",
    "records_repr",
    "vision_spec_from_config",
]


class DataIterator:
  """Iterator of batches with get_state()/set_state() (bytes, JSON) for checkpointing.

  `stats`: counters ('examples', 'rows', 'batches', 'padding_batches', 'truncated' and one per
  skip reason); `skip_report` keeps the first skipped ids per reason.
  """

  def __init__(
      self,
      loader: grain.DataLoader,
      *,
      local_batch_size: int,
      channels: int,
      seq_len: int,
      max_images: int,
      packing: bool,
      mode: str,
      strict: bool,
      vision_spec: vision.VisionSpec,
      mesh=None,
      data_axes: Sequence[str] = ("data", "fsdp"),
      target_batches: int | None = None,
      name: str = "",
      shard_size: int = 1 << 62,
      batch_check: Callable[[dict[str, np.ndarray]], None] | None = None,
  ):
    self.loader = loader
    self.batch_check = batch_check
    self.shard_size = shard_size
    self.local_batch_size = local_batch_size
    self._builder_args = (local_batch_size, channels, seq_len, max_images, packing, mode, vision_spec)
    self.mode = mode
    self.strict = strict
    self.mesh = mesh
    self.data_axes = tuple(data_axes)
    self.target_batches = target_batches
    self.skip_report = SkipReport(name)
    self.stats: collections.Counter = collections.Counter()
    self._it = iter(loader)
    # Stop grain's worker processes when this iterator goes away or at interpreter exit (before
    # module teardown, where grain's own __del__ would fail noisily).
    self._finalizer = weakref.finalize(self, _close_loader_iterator, self._it)
    self._loader_state: dict[str, Any] = self._loader_get_state()
    self._pending: dict[str, Any] | None = None
    self._pending_state: dict[str, Any] | None = None
    self._exhausted = False

  def __iter__(self):
    return self

  def _loader_get_state(self) -> dict[str, Any]:
    # DataLoaderIterator.get_state() is json.dumps of its inner iterator's state dict; taking the
    # dict directly saves a JSON encoding per record (get_state below encodes it once).
    inner = getattr(self._it, "_iterator", None)
    if inner is not None and hasattr(inner, "get_state"):
      return inner.get_state()
    return json.loads(self._it.get_state())

  def _read(self) -> dict[str, Any] | None:
    """The next usable processed example (skips counted), or None at the end of the data."""
    skipped_in_a_row = 0
    while True:
      before = self._loader_state
      try:
        rec = next(self._it)
      except StopIteration:
        self._exhausted = True
        return None
      self._loader_state = self._loader_get_state()
      if "pickled" in rec:
        rec = pickle.loads(rec["pickled"])
      if "skip" in rec:
        self.skip_report.skip(rec["id"], rec["skip"], rec["detail"], strict=self.strict)
        self.stats[rec["skip"]] += 1
        skipped_in_a_row += 1
        if skipped_in_a_row > self.shard_size:
          raise RuntimeError(f"every record of a whole pass over the data was skipped: {self.report()}")
        continue
      rec["_state_before"] = before
      return rec

  def _place(self, batch: BatchBuilder, ex: dict[str, Any]) -> bool:
    if not batch.add(ex):
      return False
    self.stats["examples"] += 1
    if ex["truncated"]:
      self.stats["truncated"] += 1
      records.log.info("record id=%r truncated to seq_len=%d (answer tokens kept)", ex["id"], self._builder_args[2])
    return True

  def __next__(self) -> dict[str, Any]:
    if not self._finalizer.alive:
      raise RuntimeError("the data iterator was closed")
    batch = BatchBuilder(*self._builder_args)
    if self._pending is not None:
      ex, self._pending, self._pending_state = self._pending, None, None
      if not self._place(batch, ex):
        raise AssertionError("a carried-over example must fit an empty batch")
    while not batch.full and not self._exhausted:
      ex = self._read()
      if ex is None:
        break
      if not self._place(batch, ex):
        self._pending, self._pending_state = ex, ex["_state_before"]
        break
    if not len(batch):
      emitted = self.stats["batches"] + self.stats["padding_batches"]
      if self.target_batches is None or emitted >= self.target_batches:
        raise StopIteration
      self.stats["padding_batches"] += 1
    else:
      self.stats["batches"] += 1
      self.stats["rows"] += len(batch)
    out = batch.arrays()
    if self.batch_check is not None:
      self.batch_check(out)  # on this process's host rows, before they become device arrays
    if self.mesh is not None:
      out = make_global_batch(out, self.mesh, self.data_axes)
    return out

  # -- checkpointing -----------------------------------------------------------------------------
  def get_state(self) -> bytes:
    loader_state = self._pending_state if self._pending is not None else self._loader_state
    state = {"version": 1, "loader": loader_state, "stats": dict(self.stats), "exhausted": self._exhausted}
    return json.dumps(state).encode()

  def set_state(self, state: bytes | str | Mapping[str, Any]) -> None:
    if isinstance(state, bytes):
      state = state.decode()
    if isinstance(state, str):
      state = json.loads(state)
    if state.get("version") != 1:
      raise ValueError(f"unknown data iterator state version {state.get('version')!r}")
    self._it.set_state(json.dumps(state["loader"]).encode())
    self._loader_state = self._loader_get_state()
    self._pending = self._pending_state = None
    self._exhausted = bool(state.get("exhausted", False))
    self.stats = collections.Counter(state.get("stats", {}))

  def close(self) -> None:
    """Stops the grain workers (also done automatically when the iterator is collected)."""
    self._finalizer()

  def start_prefetch(self) -> None:
    """For grain.checkpoint.CheckpointHandler.restore."""
    if hasattr(self._it, "start_prefetch"):
      self._it.start_prefetch()

  def report(self) -> str:
    skipped = {k: v for k, v in self.stats.items() if k in records.SKIP_REASONS}
    return (
        f"{self.stats['batches']} batches, {self.stats['examples']} examples in {self.stats['rows']} rows, "
        f"{self.stats['truncated']} truncated, skipped {sum(skipped.values())} {skipped or ''}"
    )


def _close_loader_iterator(it) -> None:
  inner = getattr(it, "_iterator", None)
  if inner is not None and hasattr(inner, "close"):
    inner.close()
    # Drop the pipeline now (at exit: while modules still exist), as grain's __del__ re-runs
    # close() and fails noisily during interpreter teardown.
    it._iterator = None
    gc.collect()


# -- multi-host ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def check_data_sharding(mesh, data_axes: Sequence[str] = ("data", "fsdp")) -> None:
  """Raises ValueError unless every process holds batch rows that no other process holds.

  Each process feeds its own rows (its data shard) to make_global_batch; if a mesh replicates
  batch rows across processes (the data axes do not span them, e.g. mesh (1, 1, 4) over 2
  processes), the "replicated" copies would differ per process and the global batch would silently
  shrink. Replicating one batch across processes is not supported: put the processes on a data axis.
  """
  import jax

  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  processes = {d.process_index for d in mesh.devices.flat}
  if len(processes) <= 1 or not axes:
    return
  # The data-axes coordinates of each device = which rows of the batch it holds.
  owners: dict[tuple[int, ...], set[int]] = collections.defaultdict(set)
  names = list(mesh.axis_names)
  for index in np.ndindex(mesh.devices.shape):
    owners[tuple(index[names.index(a)] for a in axes)].add(mesh.devices[index].process_index)
  shared = {k: v for k, v in owners.items() if len(v) > 1}
  if shared:
    shape = dict(zip(mesh.axis_names, mesh.devices.shape))
    raise ValueError(
        f"mesh {shape} over {len(processes)} processes ({jax.process_count()} in the run): the batch is split only "
        f"over the data axes {axes}, whose {len(owners)} shard(s) are each held by devices of several processes "
        f"(e.g. processes {sorted(next(iter(shared.values())))}), but each process feeds different rows. "
        f"Use a mesh whose data axes ({'/'.join(axes)}) have a multiple of {len(processes)} shards spanning the "
        "processes, e.g. --config.sharding.mesh_shape='(-1, 1, 1)' or fsdp over all devices "
        "(sharding.strategy and the other axes then shard the model within a process)."
    )


def make_global_batch(
    local_batch: Mapping[str, Any], mesh, data_axes: Sequence[str] = ("data", "fsdp")
) -> dict[str, Any]:
  """Process-local numpy batch -> global jax arrays sharded on the batch dim over `data_axes`.

  The leading dim of every numeric array is split over the mesh axes in `data_axes` that the
  mesh has (together); the other dims are replicated. The global batch is the concatenation of
  the processes' local batches in process order (jax.make_array_from_process_local_data).
  String arrays (eval ids / answers / options) stay process-local numpy.
  """
  import jax
  from jax.sharding import NamedSharding, PartitionSpec

  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"mesh axes {mesh.axis_names} contain none of the data axes {tuple(data_axes)}")
  check_data_sharding(mesh, tuple(data_axes))
  out: dict[str, Any] = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.dtype.kind in "OUS":
      out[key] = value
      continue
    spec = PartitionSpec(axes if len(axes) > 1 else axes[0], *([None] * (value.ndim - 1)))
    out[key] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), value)
  return out


# -- entry point ---------------------------------------------------------------------------------
def vision_spec_from_config(data_cfg: ml_collections.ConfigDict | DataSettings) -> vision.VisionSpec:
  """The image preprocessing that the data block asks for."""
  s = resolve(data_cfg)
  return vision.make_vision_spec(
      s.vision,
      s.image_size,
      aspect_mode=s.aspect_mode or None,
      max_tiles=s.max_tiles,
      use_thumbnail=s.use_thumbnail,
      deepstack_grid=s.deepstack_grid,
      processor=s.image_processor,
      deepstack_grid_mode=s.deepstack_grid_mode,
  )


def make_iterator(
    data_cfg: ml_collections.ConfigDict | DataSettings,
    tokenizer: Any,
    *,
    num_image_tokens: int,
    image_token: str,
    mesh: Any = None,
    mode: str = "train",
    num_epochs: int | None = None,
    data_axes: Sequence[str] = ("data", "fsdp"),
    source: Any = None,
    shard_options: grain.ShardOptions | None = None,
    batch_check: Callable[[dict[str, np.ndarray]], None] | None = None,
) -> DataIterator:
  """Builds the deterministic, checkpointable batch iterator.

  data_cfg: `config.default_data_config()` (or a ConfigDict with some of its fields, or the
    `config.resolve`d settings).
  tokenizer: a transformers fast tokenizer with a chat template, or the path of one
    (data_cfg.chat_template can supply / replace the template, e.g. 'vicuna_v1').
  num_image_tokens: placeholder tokens per image (per tile for InternVL).
  image_token: the tokenizer's image token string (a single token; its id is looked up).
  mesh / data_axes: if a mesh is given, batches are global jax arrays (make_global_batch).
  mode: 'train' (whole conversations, answers as targets) or 'eval' (prompt ending with the
    assistant prefix; adds id / answer / options; no packing).
  num_epochs: None = repeat forever in train mode, 1 in eval mode.
  source: a random-access record source to use instead of opening data_cfg.name (any sequence of
    records in one of the builders' formats).
  shard_options: defaults to grain.ShardByJaxProcess(drop_remainder=data_cfg.drop_remainder);
    the per-process batch is global_batch_size // shard_count.
  batch_check: called on each host batch (numpy) before it is sharded; raises to stop on a batch
    the model cannot take (main passes `llvm.check_batch`: e.g. rows that overflow p-MoD's static
    kept length).
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  s = resolve(data_cfg)
  if mesh is not None:
    check_data_sharding(mesh, tuple(data_axes))
  if num_epochs is None and mode == "eval":
    num_epochs = 1
  tokenizer = load_tokenizer(tokenizer, s.chat_template or None)
  if source is None:
    source = open_data_source(s.name, s.split, s.data_dir, build_if_missing=s.build_if_missing)
  if shard_options is None:
    shard_options = grain.ShardByJaxProcess(drop_remainder=s.drop_remainder)
  if s.global_batch_size % shard_options.shard_count:
    raise ValueError(
        f"global_batch_size={s.global_batch_size} is not divisible by {shard_options.shard_count} processes"
    )
  local_batch = s.global_batch_size // shard_options.shard_count
  if s.num_workers > 0:
    _ensure_absl_flags_parsed()
  spec = vision_spec_from_config(s)
  packing = s.packing and mode == "train"

  shard = ShardedSource(source, shard_options)
  if len(shard) == 0:
    raise ValueError(
        f"shard {shard_options.shard_index}/{shard_options.shard_count} of {records_repr(source)} is empty"
    )
  process = _record_processor(s, tokenizer, spec, mode, num_image_tokens=num_image_tokens, image_token=image_token)
  target = None
  if num_epochs is not None and not packing and shard_options.shard_count > 1:
    # Every process returns as many batches as the largest shard needs.
    target = math.ceil(largest_shard(len(source), shard_options) * num_epochs / local_batch)
  return DataIterator(
      _make_loader(s, shard, process, num_epochs),
      local_batch_size=local_batch,
      channels=num_channels(shard[0], mode),
      seq_len=s.seq_len,
      max_images=s.max_images,
      packing=packing,
      mode=mode,
      strict=s.strict,
      vision_spec=spec,
      mesh=mesh,
      data_axes=data_axes,
      target_batches=target,
      shard_size=len(shard),
      name=f"{s.name}:{s.split}",
      batch_check=batch_check,
  )


def _record_processor(
    s: DataSettings, tokenizer: Any, spec: vision.VisionSpec, mode: str, *, num_image_tokens: int, image_token: str
) -> ProcessRecord:
  """The per-record transform that grain runs (in its workers when num_workers > 0)."""
  process = ProcessRecord(
      tokenizer,
      image_token=image_token,
      num_image_tokens=num_image_tokens,
      vision_spec=spec,
      seq_len=s.seq_len,
      max_images=s.max_images,
      mode=mode,
      image_start=s.image_start,
      image_end=s.image_end,
      system_prompt=s.system_prompt,
  )
  process.serialize = s.num_workers > 0
  process.parent_pid = os.getpid()
  return process


def _make_loader(
    s: DataSettings, shard: ShardedSource, process: ProcessRecord, num_epochs: int | None
) -> grain.DataLoader:
  """A grain DataLoader over this process's shard (sharding is done by `shard`, not by grain)."""
  sampler = grain.IndexSampler(
      num_records=len(shard), shard_options=grain.NoSharding(), shuffle=s.shuffle, num_epochs=num_epochs, seed=s.seed
  )
  return grain.DataLoader(
      data_source=shard,
      sampler=sampler,
      operations=[process],
      worker_count=s.num_workers,
      worker_buffer_size=s.worker_buffer_size,
      shard_options=grain.NoSharding(),
      read_options=grain.ReadOptions(num_threads=s.read_threads, prefetch_buffer_size=16),
  )


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside absl.app.run (scripts, pytest) nobody has
  parsed them, so mark them parsed with their defaults (a no-op under absl.app.run)."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
