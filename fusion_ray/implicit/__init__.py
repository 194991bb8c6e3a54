"""Implicit fusion (FuseChat-3.0): rule verifiers for the reward stage."""
