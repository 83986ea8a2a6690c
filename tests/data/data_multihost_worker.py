"""One process of the two-process data test (run by test_data_multihost.py, not by pytest).

python data_multihost_worker.py PROCESS_ID PORT DATA_DIR TOKENIZER_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys


def main(process_id: int, port: int, data_dir: str, tokenizer_dir: str, out_path: str) -> None:
  import jax

  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id)
  import grain.python as grain
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import multihost_utils

  from llvm_jax.data import pipeline
  from llvm_jax.data.config import default_data_config

  assert jax.process_count() == 2 and jax.process_index() == process_id
  mesh = jax.make_mesh((2, 1), ("data", "fsdp"))
  shard = grain.ShardByJaxProcess()
  cfg = default_data_config()
  cfg.name = "synthetic_vqa/unittest"
  cfg.data_dir = data_dir
  cfg.split = "validation"  # 13 records: 7 + 6
  cfg.image_size = 16
  cfg.seq_len = 48
  cfg.global_batch_size = 4
  cfg.shuffle = True
  it = pipeline.make_iterator(cfg, tokenizer_dir, num_image_tokens=2, image_token="<image>", mode="eval", mesh=mesh)

  ids, n_batches, checks = [], 0, []
  for batch in it:
    n_batches += 1
    local_ids = batch["id"]  # strings stay process-local
    ids += [x for x in local_ids.tolist() if x]
    tokens = batch["tokens"]
    assert isinstance(tokens, jax.Array) and tokens.shape == (4, 48), tokens.shape
    (local_shard,) = tokens.addressable_shards
    local_tokens = np.asarray(local_shard.data)
    assert local_tokens.shape == (2, 48)
    # rows of this process are the rows whose ids it holds; padding rows are all zero
    assert [bool(x) for x in local_ids] == local_tokens.any(axis=1).tolist()
    total = jax.jit(lambda t: jnp.sum(t.astype(jnp.int32)))(tokens)  # a global reduction
    parts = multihost_utils.process_allgather(np.int64(local_tokens.sum()))
    checks.append([int(total), [int(p) for p in np.asarray(parts).ravel()]])
    mask_rows = np.asarray(batch["image_mask"].addressable_shards[0].data).sum()
    assert mask_rows == sum(1 for x in local_ids if x)
  with open(out_path, "w") as f:
    json.dump(
        {
            "shard": [shard.shard_index, shard.shard_count],
            "ids": ids,
            "batches": n_batches,
            "checks": checks,
            "stats": dict(it.stats),
        },
        f,
    )
  jax.distributed.shutdown()


if __name__ == "__main__":
  pid, port, data_dir, tok_dir, out = sys.argv[1:6]
  main(int(pid), int(port), data_dir, tok_dir, out)
