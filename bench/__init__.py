"""Benchmarks of the edge agent on real processes (``make bench`` = ``python -m bench.run``)."""
