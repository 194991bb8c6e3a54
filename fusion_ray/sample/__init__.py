"""The `sample` stage of implicit fusion: n responses per prompt from each source."""
