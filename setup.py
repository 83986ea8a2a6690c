"""llvm_jax: efficient large language-and-vision models in JAX/Flax (TroL, Phantom, DeepStack, p-MoD)."""

import re

from setuptools import find_packages, setup

# One version, kept in the package (llvm_jax.__version__).
with open("llvm_jax/__init__.py") as f:
  VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)

# One tested set of versions (CPU, Python 3.11); `make test` and CI install exactly these.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "einops==0.8.2",
    "transformers==5.23.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "pillow==13.0.0",
    "numpy==2.4.6",
    "ml-dtypes==0.6.0",
    "absl-py==2.5.1",
    "tensorboardX==2.6.5",
]

EXTRAS_REQUIRE = {
    # torch is the reference implementation in parity tests only (CPU build).
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0"],
    # Plots of experiments/compare_techniques.py.
    "experiments": ["matplotlib==3.10.8"],
    "cuda": ["jax[cuda12]==0.10.2"],
    "tpu": ["jax[tpu]==0.10.2"],
    # Deviceless TPU compiles from any machine (python -m llvm_jax.aot): the libtpu jax[tpu]==0.10.2 pins.
    "aot": ["libtpu==0.0.42.1"],
    # Formatting and lint (`make lint`, run by .ci/run before the tests).
    "lint": ["pyink==26.5.1", "ruff==0.17.6"],
}

setup(
    name="llvm_jax",
    version=VERSION,
    description=__doc__,
    packages=find_packages(include=["llvm_jax", "llvm_jax.*"]),
    # The C++ source of attention_impl='cpu_flash', compiled on first use (llvm_jax/models/cpu_kernels.py).
    package_data={"llvm_jax.models": ["cpu_kernels.cc"]},
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
