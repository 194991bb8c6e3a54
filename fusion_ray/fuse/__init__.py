"""Fuse: combine the pivot and aligned sources into one teacher distribution per position."""
