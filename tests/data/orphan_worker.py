"""A trainer stand-in for the orphan test: a 2-worker grain iterator that draws a batch, says so, then hangs.

argv: data_dir tokenizer_dir
"""

import sys
import time

from llvm_jax.data import pipeline
from llvm_jax.data.config import default_data_config

if __name__ == "__main__":  # grain spawns its workers, which re-import this file
  data_dir, tokenizer_dir = sys.argv[1], sys.argv[2]
  cfg = default_data_config()
  cfg.update(
      name="synthetic_vqa/unittest", data_dir=data_dir, image_size=16, seq_len=48, global_batch_size=4, num_workers=2
  )
  it = pipeline.make_iterator(cfg, tokenizer_dir, num_image_tokens=2, image_token="<image>")
  next(it)
  print("READY", flush=True)
  time.sleep(600)
