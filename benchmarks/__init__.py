"""Benchmarks over the installed package: each ``bench_*.py`` measures what ``tasks/`` and ``cluster/`` do.

Run from the repository root; the benchmarks that share helpers (``benchmarks/lib.py``) run as modules, e.g.
``python -m benchmarks.bench_e2e``.
"""
