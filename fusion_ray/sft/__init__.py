"""The `sft` stage of implicit fusion: the target fine-tuned on the best responses."""
