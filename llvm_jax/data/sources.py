"""Record sources: opening a built TFDS dataset, and the per-process contiguous shard of it.

Each process reads the contiguous shard `even_split(len(source), shard_options)` of the records;
the shard boundaries are part of the data iterator's checkpointed state (record indices within
the shard), so they must not change between versions.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Sequence
from typing import Any

import grain.python as grain

log = logging.getLogger(__name__)


def even_split(num_records: int, shard_options: grain.ShardOptions) -> tuple[int, int]:
  """The record interval [start, end) of shard `shard_options.shard_index` of `num_records`.

  grain's own even split is private API, so this is a copy of its contract, which resumed
  iterator states depend on: shards of `num_records // shard_count` records in shard order, and
  the remainder `r = num_records % shard_count` either dropped (`drop_remainder`) or given one
  each to the first `r` shards.
  """
  count, index = shard_options.shard_count, shard_options.shard_index
  per_shard = num_records // count
  start, end = per_shard * index, per_shard * (index + 1)
  remainder = num_records % count
  if remainder:
    if shard_options.drop_remainder:
      log.warning("dropping %d of %d records (not divisible by %d shards)", remainder, num_records, count)
    else:
      start += min(index, remainder)
      end += min(index + 1, remainder)
  return start, end


def largest_shard(num_records: int, shard_options: grain.ShardOptions) -> int:
  """The number of records of the largest of the `shard_options.shard_count` shards."""
  count, drop = shard_options.shard_count, shard_options.drop_remainder
  return max(
      end - start for start, end in (even_split(num_records, grain.ShardOptions(i, count, drop)) for i in range(count))
  )


def open_data_source(
    name: str, split: str, data_dir: str | os.PathLike | None = None, *, build_if_missing: bool = False
):
  """A random-access source of records for a built TFDS dataset ('name/config').

  Reads the newest version built in data_dir/name with `tfds.builder_from_directory` (so custom,
  unregistered BuilderConfigs work too); with an empty data_dir, `tfds.data_source` in TFDS's
  default directory. With build_if_missing, a registered dataset that is not there is built
  first (meant for synthetic_vqa), under a lock file in data_dir so that processes sharing the
  directory build it once.
  """
  # TFDS and the builders are heavy imports: only paid when a dataset is actually opened.
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
          f"{name.split('/')[0]} --data_dir {data_dir}"
          + (f" --config {name.split('/')[1]}`" if "/" in name else "`")
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


def records_repr(source: Any) -> str:
  """A short description of a source for messages (a list's length, not its records)."""
  if isinstance(source, (list, tuple)):
    return f"{type(source).__name__}(len={len(source)})"
  return repr(source)
