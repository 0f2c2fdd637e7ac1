"""Benchmark runner, installed as gpuloss.bench (see bench/runner.py)."""
