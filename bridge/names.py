"""Unique names for things added to a graph or a list (``base``, ``base_2``, ``base_3``, ...)."""

from __future__ import annotations


def unique_name(base: str, taken: set[str]) -> str:
    """The first of ``base``, ``base_2``, ... not in ``taken``; it is added to ``taken``."""
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    taken.add(name)
    return name
