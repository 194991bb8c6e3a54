"""Prepare and collect: chat corpora → rendered text → per-token top-k log-probs of every model."""
