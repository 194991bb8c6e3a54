"""Align: move each source's top-k distributions onto the pivot's positions and vocabulary."""
