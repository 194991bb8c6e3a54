"""Evaluation: held-out bits per byte per domain, and the report."""
