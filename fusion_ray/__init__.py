"""fusion_ray.

Importing the package registers the `demo:` references of the embedded default with
`locations` (`demo/scheme.py`), in the driver and in every Ray worker alike.
"""

from fusion_ray.demo import scheme as _demo_scheme  # noqa: F401 (registers `demo:`)
