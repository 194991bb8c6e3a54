"""The `pairs` stage of implicit fusion: scored samples → SFT rows and DPO pairs."""
