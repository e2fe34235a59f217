"""The benchmark harness: ``python -m benchmarks`` (see :mod:`benchmarks.cli`)."""
