"""Train: distil the fused teacher into the pivot (Ray Train; DeepSpeed ZeRO or DDP)."""
