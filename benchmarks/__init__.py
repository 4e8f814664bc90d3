"""Benchmarks of mlflow-replay against its lower bound and the design it replaces.

Run as root from the repository root: `.venv/bin/python -m benchmarks --help`.
Not part of the test suite.
"""
