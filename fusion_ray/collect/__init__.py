"""Collect: every model's per-token top-k log-probs over the prepared corpus.

`stage` (the Ray Data stage), `engines` (vLLM and transformers scoring), `prompts` (chat rows
rendered with the pivot's template), `topk` and `conditioned` (what is stored per position).
"""
