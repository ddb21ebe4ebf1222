"""Benchmarks and cross-checks behind `memcli bench ...`: each prints side-by-side numbers."""
