"""One of two processes (4 CPU devices each, gloo) training the tiny config on an (8, 1, 1) mesh.

argv: process_id port workdir
"""

import sys

import jax

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

from train_helpers import SyntheticBatches, tiny_config  # noqa: E402

from llvm_jax import config_utils  # noqa: E402  (after distributed init)
from llvm_jax.train import trainer  # noqa: E402

config = tiny_config(total_steps=3, checkpoint_every=3)
mesh = trainer.mesh_from_config(config)
assert mesh.devices.size == 8 and jax.process_count() == 2
trainer.train(config, workdir, SyntheticBatches(mesh, config_utils.model_config(config)))
jax.distributed.shutdown()
