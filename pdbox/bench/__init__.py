"""Measurement helpers shared by scripts/ benchmarks and the end-to-end tests."""
