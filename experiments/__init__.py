"""Experiments, benchmarks and the `atlas-eqx` command line."""
