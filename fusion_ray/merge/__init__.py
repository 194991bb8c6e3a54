"""Merging fused targets in parameter space.

`methods` (pure tensor functions), `registry` (each method declared once: name, parameters,
tensor function), `spec` (mergekit-style YAML and parameters),
`streaming` (tensor-at-a-time safetensors I/O), `engine` (check, plan, merge, write a
model dir), `actor` (the Ray `MergeActor`, standalone merges), `stage` (the pipeline's merge stage).
Importing this package loads no torch or ray.
"""
