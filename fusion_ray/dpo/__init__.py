"""The `dpo` stage of implicit fusion: preference optimisation of the SFT model on best/worst pairs."""
