"""Which arms a section of the eval config names."""

from __future__ import annotations


def pick(names: list[str] | None, arms: dict[str, str], default: list[str], where: str) -> dict[str, str]:
    """arm → model dir of the arms `names` lists (a name ending in ':' picks every arm it prefixes);
    `names` None: the `default` arms that exist. A name that matches no arm is an error naming it."""
    if names is None:
        return {a: arms[a] for a in default if a in arms}
    out: dict[str, str] = {}
    for name in names:
        hits = [a for a in arms if a.startswith(name)] if name.endswith(":") else [a for a in arms if a == name]
        if not hits:
            raise ValueError(f"{where}: no arm {name!r} in this run (arms: {', '.join(sorted(arms))})")
        out.update({a: arms[a] for a in hits})
    return out
