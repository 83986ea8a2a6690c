"""The data config's one reader (`config.resolve`) and the per-process shard boundaries."""

from __future__ import annotations

import dataclasses
import logging

import grain.python as grain
import pytest

from llvm_jax.data import config, sources


def test_resolve_fills_missing_fields_with_the_defaults():
  s = config.resolve({"seq_len": 32, "packing": 1})
  assert s.seq_len == 32 and s.packing is True
  defaults = config.default_data_config()
  assert s.read_threads == defaults.read_threads and s.vision == defaults.vision and s.deepstack_grid is None
  assert config.resolve(s) is s
  with pytest.raises(dataclasses.FrozenInstanceError):
    s.seq_len = 8


def test_resolve_covers_every_default_field():
  assert {f.name for f in dataclasses.fields(config.DataSettings)} == set(config.default_data_config().keys())


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("vision", "vit", r"config.data.vision='vit': must be one of \('clip', 'siglip', 'internvl', 'internvit'\)"),
        (
            "aspect_mode",
            "stretch",
            r"config.data.aspect_mode='stretch': must be one of \('', 'pad', 'crop', 'resize', 'tile'\)",
        ),
        ("global_batch_size", 0, r"config.data.global_batch_size=0: must be an integer >= 1"),
        ("num_workers", True, r"config.data.num_workers=True: must be an integer >= 0"),
    ],
)
def test_resolve_names_the_bad_field_and_the_valid_values(field, value, match):
  cfg = config.default_data_config()
  setattr(cfg, field, value)
  with pytest.raises(ValueError, match=match):
    config.resolve(cfg)


def test_resolve_ignores_and_logs_unknown_fields(caplog):
  with caplog.at_level(logging.WARNING, logger="llvm_jax.data"):
    s = config.resolve({"seq_len": 16, "retired_field": 3})
  assert s.seq_len == 16 and any("retired_field" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("drop,expected", [(False, [(0, 4), (4, 7), (7, 10)]), (True, [(0, 3), (3, 6), (6, 9)])])
def test_even_split_keeps_grains_shard_boundaries(drop, expected):
  # Resumed iterator states index records within these shards: the boundaries must never move.
  assert [sources.even_split(10, grain.ShardOptions(i, 3, drop)) for i in range(3)] == expected
  assert sources.largest_shard(10, grain.ShardOptions(0, 3, drop)) == expected[0][1] - expected[0][0]
  assert sources.even_split(7, grain.ShardOptions(0, 1, drop)) == (0, 7)
