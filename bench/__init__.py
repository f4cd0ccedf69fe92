"""Benchmarks: each figure beside a primitive ceiling measured in the same run."""
