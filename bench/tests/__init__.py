"""Tests of the benchmarks themselves (bench/ code); `pytest` collects them (pyproject.toml)."""
