"""Downstream heads, datasets, metrics and the benchmark runner."""
