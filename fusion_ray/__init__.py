"""fusion_ray."""
