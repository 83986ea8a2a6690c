"""One of two processes (2 CPU devices each, gloo): a mesh that replicates the batch over the processes
must fail with a clear error; one whose data axis spans them must give the one-process batch.

argv: process_id port
"""

import sys
import tempfile

import jax

process_id, port = int(sys.argv[1]), sys.argv[2]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import jax.numpy as jnp  # noqa: E402  (after distributed init)
import numpy as np  # noqa: E402
import train_helpers  # noqa: E402
from train_helpers import SyntheticBatches, tiny_config  # noqa: E402

from llvm_jax import config_utils  # noqa: E402
from llvm_jax.train import trainer  # noqa: E402

for shape in ((1, 1, 4), (4, 1, 1)):
  config = tiny_config(total_steps=1, mesh_shape=shape, strategy="dp")
  mesh = trainer.mesh_from_config(config)
  try:
    if shape == (1, 1, 4):
      trainer.train(config, tempfile.mkdtemp(), SyntheticBatches(mesh, config_utils.model_config(config)))
      print(f"MESH {shape} dp: trained, no error", flush=True)
    else:
      batch = next(SyntheticBatches(mesh, config_utils.model_config(config)))
      total = int(jax.jit(jnp.sum)(batch["tokens"]))
      # All 8 rows as one process draws them (numpy, before make_global_batch).
      single = SyntheticBatches(mesh, config_utils.model_config(config))
      single.rows = slice(None)
      train_helpers.make_global_batch, real = (lambda local, mesh: local), train_helpers.make_global_batch
      expected = int(np.sum(next(single)["tokens"]))
      train_helpers.make_global_batch = real
      print(
          f"MESH {shape} dp: ok, {batch['tokens'].shape[0]} rows, sum {'equal' if total == expected else 'DIFFERS'}",
          flush=True,
      )
  except ValueError as e:
    print(f"MESH {shape} dp: ValueError {e}", flush=True)
jax.distributed.shutdown()
