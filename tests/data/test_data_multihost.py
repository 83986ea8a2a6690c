"""Two real JAX processes (CPU, gloo): ShardByJaxProcess + make_global_batch."""

from __future__ import annotations

import json
import os

import pytest
from multiprocess_helpers import REPO, free_port, run_workers

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_multihost_worker.py")


@pytest.mark.slow
def test_two_processes_read_disjoint_complete_shards_into_global_batches(tmp_path, synthetic_dir, tokenizer_dir):
  port = free_port()
  env = dict(
      os.environ,
      PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )
  outs = [tmp_path / f"p{i}.json" for i in range(2)]
  run_workers(
      WORKER, [[str(i), str(port), synthetic_dir, tokenizer_dir, str(outs[i])] for i in range(2)], env, timeout=150
  )
  res = [json.loads(o.read_text()) for o in outs]
  assert [r["shard"] for r in res] == [[0, 2], [1, 2]]
  ids = [r["ids"] for r in res]
  assert len(ids[0]) == 7 and len(ids[1]) == 6  # even_split of 13 records
  assert not set(ids[0]) & set(ids[1])
  assert set(ids[0]) | set(ids[1]) == {f"validation_{i:06d}" for i in range(13)}
  assert res[0]["batches"] == res[1]["batches"] == 4  # both processes take part in every global batch
  for c0, c1 in zip(res[0]["checks"], res[1]["checks"]):
    # the global jitted sum equals the sum of both processes' local rows
    assert c0 == c1 and c0[0] == sum(c0[1])
  assert all(part > 0 for part in res[0]["checks"][0][1])  # both processes contributed rows
