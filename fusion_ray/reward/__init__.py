"""The `reward` stage of implicit fusion: verifiers and a reward model score every sampled response."""
