"""Entrypoints that `ray job submit` runs: `python -m jobs.<stage> --config CONFIG`."""
