"""Benchmarks: lmsys against hand-written JAX baselines."""
