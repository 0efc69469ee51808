"""Benchmarks: `python -m bench <command> --help`."""
