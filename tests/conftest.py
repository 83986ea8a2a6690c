"""Test setup (must run before jax is imported): 8 fake CPU devices for sharding tests; XLA's
backend optimisation and the CPU fusion emitters off (tiny test programs spend far longer in LLVM
codegen than running; compile-time flags, for the tests only); and a
persistent compilation cache shared by the test workers and the subprocesses they start."""

import os

from llvm_jax import host

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Appended, so flags the caller set (e.g. --xla_cpu_enable_fast_math=false) keep the 8 fake devices.
_FLAGS = (
    "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0",
    # The legacy elemental emitter: 25% less compile time than the fusion emitters (cold suite 11.5 -> 8.6 min).
    "--xla_cpu_use_fusion_emitters=false",
    # LLVM: no expensive optimisation passes, and one codegen module rather than parallel splits (two
    # cores): ~8% less CPU on test_phantom.py + the scanned=unrolled tests (85.4 / 77.8 s with them,
    # 91.6 / 85.7 s without; two alternating pairs, cold compile cache).
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_parallel_codegen_split_count=1",
)
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", "")] + [f for f in _FLAGS if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]
).strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# CPU only: with libtpu installed (the `aot` extra) jax would otherwise try, and fail, to start a TPU backend.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_REPO, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


host.tune_host_process()  # GC thresholds and malloc reuse, as in the CLIs


def pytest_collection_modifyitems(config, items):
  """The slow tests first. With `pytest -n 2` (pytest.ini: --dist loadfile --no-loadscope-reorder) each
  file runs on one worker, so a module's shared fixtures are built once, and the files holding slow tests
  start first, so that the workers finish together."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise
