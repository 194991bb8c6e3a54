"""The `demo:NAME` references, registered with `locations` (see `fusion_ray/__init__.py`).

A name of the explicit default (`assets.py`) or of the implicit default (`implicit.py`), each
built once per machine into its own cache dir the first time it is resolved.
"""

from __future__ import annotations

from pathlib import Path

from fusion_ray import locations
from fusion_ray.demo import assets, builds, implicit

ASSET_NAMES = assets.ASSET_NAMES


def asset_path(name: str) -> Path:
    """Where asset `name` lives, built or not."""
    if name in assets.IMPLICIT_NAMES:
        return implicit.asset_path(name)
    return assets.asset_path(name)


def resolve(location: str) -> str:
    """`demo:NAME` → its local path, building the assets if needed; other references unchanged."""
    if not location.startswith(locations.DEMO_SCHEME):
        return location
    name = location.removeprefix(locations.DEMO_SCHEME)
    if name in assets.IMPLICIT_NAMES:
        builds.ensure_implicit()
    else:
        builds.ensure_assets()
    return str(asset_path(name))


locations.register_scheme(locations.DEMO_SCHEME, locations.Scheme(ASSET_NAMES, asset_path, resolve))
