"""Benchmarks (``make bench``): never asserted in tests; results go to the README table."""
