"""Benchmarks of st-viomni (run as ``python -m benchmarks.encode`` / ``python -m benchmarks.train``)."""
