"""Benchmark harness: `python -m bench run SCENARIO|all [--quick]` (see docs/performance.md)."""
