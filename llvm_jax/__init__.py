"""llvm_jax: efficient large language-and-vision models in JAX/Flax.

Importing the package keeps jax off an absent TPU (see `_skip_absent_tpu`); it imports nothing heavy.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

__version__ = "0.2.0"


def _skip_absent_tpu() -> None:
  """Runs jax on CPU when libtpu is installed but no TPU (and no GPU) is attached.

  libtpu comes with the `aot` extra (compiling for TPU topologies from any machine). With it installed
  and JAX_PLATFORMS unset, jax tries its TPU backend at the first `jax.devices()` on every machine:
  it loads libtpu.so (~230 MB more memory, ~0.1 s), prints INVALID_ARGUMENT / TPU_ACCELERATOR_TYPE
  warnings and falls back to CPU. A TPU VM exposes its chips as /dev/accel* (v2-v4, v5p) or
  /dev/vfio/<group> (v5e, v6e), and a GPU machine /dev/nvidia*: there jax's own choice is kept, as it
  is whenever JAX_PLATFORMS is set.
  """
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*") or glob.glob("/dev/nvidia*"):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # imported before us: its config already read the environment
    sys.modules["jax"].config.update("jax_platforms", "cpu")


_skip_absent_tpu()
