"""Benchmarks collected by pipeline/benchmark.py; each module has run(...) -> dict of figures."""
