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


def unique_name_nocase(base: str, taken: set[str]) -> str:
    """The first of ``base``, ``base_2``, ... that no name in ``taken`` equals, ignoring case (file names on
    case-insensitive file systems); ``taken`` is not modified."""
    lowered = {t.lower() for t in taken}
    name, n = base, 1
    while name.lower() in lowered:
        n += 1
        name = f"{base}_{n}"
    return name
