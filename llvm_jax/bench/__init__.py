"""Benchmarks, each runnable as `python -m llvm_jax.bench.<name>`."""
