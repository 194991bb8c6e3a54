"""Implicit fusion (FuseChat-3.0): sample, reward, pairs, SFT and DPO."""
