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
  eval mode adds: id (B,) str, question (B,) str (first user turn), answer (B,) str, options (B, K) str ('' = none)
Preference data: tokens/segment_ids/positions/targets/target_mask are (B, 2, S), index 0 =
chosen, 1 = rejected; the images are shared.

Per-record work (decode, preprocess, tokenise) runs in grain's DataLoader (`num_workers`
processes); rows are assembled in the calling process. A bad record becomes a skip marker that
is counted in `it.stats` and logged with its id (or raises `BadRecordError` with strict=True).
The iterator state is the DataLoader state at the last record that went into (or was skipped
before) the last returned batch, plus the counters, so restoring re-reads exactly the records of
the following batches.

Sharding: each process reads the contiguous shard `even_split(len(source), ShardByJaxProcess())`
of the records (all of them when the count does not divide evenly, unless drop_remainder), and
shuffles within it; with a finite number of epochs and several processes, every process returns
the same number of batches (completed with all-padding batches) so that `make_global_batch`
never waits on a process that has run out.
"""

from __future__ import annotations

import collections
import fcntl
import functools
import gc
import json
import math
import os
import pickle
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import grain.python as grain
import numpy as np

from llvm_jax.data import records, vision
from llvm_jax.data.config import validate_data_config
from llvm_jax.data.records import SampleError, SkipReport
from llvm_jax.data.text import ChatEncoder, Encoded
from llvm_jax.data.tokenizer import load_tokenizer

SEQUENCE_KEYS = ("tokens", "segment_ids", "positions", "targets", "target_mask")
MODES = ("train", "eval")


# -- data sources --------------------------------------------------------------------------------
def open_data_source(name: str, split: str, data_dir: str | os.PathLike | None = None, *, build_if_missing: bool = False):
  """A random-access source of records for a built TFDS dataset ('name/config').

  Reads the newest version built in data_dir/name with `tfds.builder_from_directory` (so custom,
  unregistered BuilderConfigs work too); with an empty data_dir, `tfds.data_source` in TFDS's
  default directory. With build_if_missing, a registered dataset that is not there is built
  first (meant for synthetic_vqa), under a lock file in data_dir so that processes sharing the
  directory build it once.
  """
  import tensorflow_datasets as tfds

  from llvm_jax.data import builders

  data_dir = os.fspath(data_dir) if data_dir else None
  if data_dir is None:  # TFDS's default data_dir
    return tfds.data_source(name, split=split, download=build_if_missing)
  path = builders.dataset_dir(name, data_dir)
  if path is None:
    if not build_if_missing:
      raise FileNotFoundError(
          f"dataset {name!r} is not built in {data_dir}; build it with `python -m llvm_jax.data.build "
          f"{name.split('/')[0]} --data_dir {data_dir}" + (f" --config {name.split('/')[1]}`" if "/" in name else "`")
          + " (or set build_if_missing=True for synthetic_vqa)"
      )
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{name.replace('/', '_')}.build.lock"), "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
      path = builders.dataset_dir(name, data_dir)
      if path is None:
        return builders.build_dataset(name, data_dir).as_data_source(split=split)
  return tfds.builder_from_directory(os.fspath(path)).as_data_source(split=split)


class ShardedSource:
  """The contiguous shard `even_split(len(source), shard_options)` of a random-access source."""

  def __init__(self, source, shard_options: grain.ShardOptions):
    from grain._src.core.sharding import even_split

    self.source = source
    self.shard_options = shard_options
    self.start, self.end = even_split(len(source), shard_options)

  def __len__(self) -> int:
    return self.end - self.start

  def __getitem__(self, index: int):
    if not 0 <= index < len(self):
      raise IndexError(index)
    return self.source[self.start + int(index)]

  def __getitems__(self, indices: Sequence[int]):
    keys = [self.start + int(i) for i in indices]
    if hasattr(self.source, "__getitems__"):
      return self.source.__getitems__(keys)
    return [self.source[k] for k in keys]

  def __repr__(self) -> str:
    o = self.shard_options
    return f"ShardedSource({records_repr(self.source)}, shard={o.shard_index}/{o.shard_count}, records=[{self.start}, {self.end}))"


def records_repr(source) -> str:
  if isinstance(source, (list, tuple)):
    return f"{type(source).__name__}(len={len(source)})"
  return repr(source)


# -- per-record processing (runs in grain workers) -----------------------------------------------
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

  def _images(self, images: list[Any]) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    spec = self.vision_spec
    slots, hires, tiles = [], [], []
    for k, data in enumerate(images):
      try:
        img = records.decode_image(data)
      except SampleError as e:
        raise SampleError(e.reason, f"image {k}: {e.detail}") from None
      s, h = vision.preprocess_image(img, spec)
      slots.append(s)
      hires.append(h)
      tiles.append(len(s))
    if sum(tiles) > self.max_images:
      raise SampleError("too_many_images", f"{sum(tiles)} image slots > max_images={self.max_images}")
    size = spec.image_size
    slot_arr = np.concatenate(slots) if slots else np.zeros((0, size, size, 3), np.float32)
    hires_arr = None
    if spec.deepstack_grid is not None:
      g = spec.deepstack_grid[0] * spec.deepstack_grid[1]
      hires_arr = np.concatenate(hires) if hires else np.zeros((0, g, size, size, 3), np.float32)
    return slot_arr, hires_arr, tiles

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
    slots, hires, tiles = self._images(ex.images)
    out: dict[str, Any] = {"id": ex.id, "answer": ex.answer, "options": list(ex.options), "images": slots,
                           "question": records.first_question(ex)}
    if hires is not None:
      out["hires"] = hires
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


# -- row / batch assembly (calling process) ------------------------------------------------------
class _BatchBuilder:
  """Places processed examples into B rows (first fit when packing) and emits the arrays."""

  def __init__(self, rows: int, channels: int, seq_len: int, max_images: int, packing: bool, mode: str, spec: vision.VisionSpec):
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
  ):
    self.loader = loader
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

  def _place(self, batch: _BatchBuilder, ex: dict[str, Any]) -> bool:
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
    batch = _BatchBuilder(*self._builder_args)
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
        "(sharding.strategy and the other axes then shard the model within a process).")


def make_global_batch(local_batch: Mapping[str, Any], mesh, data_axes: Sequence[str] = ("data", "fsdp")) -> dict[str, Any]:
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
def vision_spec_from_config(data_cfg) -> vision.VisionSpec:
  grid = data_cfg.get("deepstack_grid", None)
  return vision.make_vision_spec(
      data_cfg.vision,
      data_cfg.image_size,
      aspect_mode=data_cfg.get("aspect_mode", "") or None,
      max_tiles=data_cfg.get("max_tiles", 6),
      use_thumbnail=data_cfg.get("use_thumbnail", True),
      deepstack_grid=None if grid is None else tuple(grid),
      processor=data_cfg.get("image_processor", "") or "",  # set by configs/hf.py
  )


def make_iterator(
    data_cfg,
    tokenizer,
    *,
    num_image_tokens: int,
    image_token: str,
    mesh=None,
    mode: str = "train",
    num_epochs: int | None = None,
    data_axes: Sequence[str] = ("data", "fsdp"),
    source=None,
    shard_options: grain.ShardOptions | None = None,
) -> DataIterator:
  """Builds the deterministic, checkpointable batch iterator.

  data_cfg: `config.default_data_config()` (or a ConfigDict with its fields).
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
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  validate_data_config(data_cfg)
  if mesh is not None:
    check_data_sharding(mesh, tuple(data_axes))
  if num_epochs is None and mode == "eval":
    num_epochs = 1
  tokenizer = load_tokenizer(tokenizer, data_cfg.get("chat_template", "") or None)
  if source is None:
    source = open_data_source(data_cfg.name, data_cfg.split, data_cfg.data_dir, build_if_missing=data_cfg.get("build_if_missing", False))
  if shard_options is None:
    shard_options = grain.ShardByJaxProcess(drop_remainder=bool(data_cfg.get("drop_remainder", False)))
  if data_cfg.global_batch_size % shard_options.shard_count:
    raise ValueError(f"global_batch_size={data_cfg.global_batch_size} is not divisible by {shard_options.shard_count} processes")
  local_batch = data_cfg.global_batch_size // shard_options.shard_count
  if int(data_cfg.num_workers) > 0:
    _ensure_absl_flags_parsed()
  spec = vision_spec_from_config(data_cfg)
  packing = bool(data_cfg.packing) and mode == "train"

  shard = ShardedSource(source, shard_options)
  if len(shard) == 0:
    raise ValueError(f"shard {shard_options.shard_index}/{shard_options.shard_count} of {records_repr(source)} is empty")
  process = ProcessRecord(
      tokenizer,
      image_token=image_token,
      num_image_tokens=num_image_tokens,
      vision_spec=spec,
      seq_len=data_cfg.seq_len,
      max_images=data_cfg.max_images,
      mode=mode,
      image_start=data_cfg.get("image_start", ""),
      image_end=data_cfg.get("image_end", ""),
      system_prompt=data_cfg.get("system_prompt", None),
  )
  process.serialize = int(data_cfg.num_workers) > 0
  process.parent_pid = os.getpid()
  channels = _channels(shard[0], mode)
  sampler = grain.IndexSampler(
      num_records=len(shard),
      shard_options=grain.NoSharding(),
      shuffle=bool(data_cfg.shuffle),
      num_epochs=num_epochs,
      seed=int(data_cfg.seed),
  )
  loader = grain.DataLoader(
      data_source=shard,
      sampler=sampler,
      operations=[process],
      worker_count=int(data_cfg.num_workers),
      worker_buffer_size=int(data_cfg.get("worker_buffer_size", 2)),
      shard_options=grain.NoSharding(),
      read_options=grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 2)), prefetch_buffer_size=16),
  )
  target = None
  if num_epochs is not None and not packing and shard_options.shard_count > 1:
    # Every process returns as many batches as the largest shard needs.
    from grain._src.core.sharding import even_split

    largest = max(
        (lambda r: r[1] - r[0])(even_split(len(source), grain.ShardOptions(i, shard_options.shard_count, shard_options.drop_remainder)))
        for i in range(shard_options.shard_count)
    )
    target = math.ceil(largest * num_epochs / local_batch)
  return DataIterator(
      loader,
      local_batch_size=local_batch,
      channels=channels,
      seq_len=data_cfg.seq_len,
      max_images=data_cfg.max_images,
      packing=packing,
      mode=mode,
      strict=bool(data_cfg.strict),
      vision_spec=spec,
      mesh=mesh,
      data_axes=data_axes,
      target_batches=target,
      shard_size=len(shard),
      name=f"{data_cfg.get('name', '')}:{data_cfg.get('split', '')}",
  )


def _ensure_absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside absl.app.run (scripts, pytest) nobody has
  parsed them, so mark them parsed with their defaults (a no-op under absl.app.run)."""
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _channels(first_record, mode: str) -> int:
  """2 (chosen, rejected) for preference records in train mode, else 1."""
  if mode == "train" and isinstance(first_record, Mapping) and ("chosen" in first_record or "rejected" in first_record):
    return 2
  return 1
