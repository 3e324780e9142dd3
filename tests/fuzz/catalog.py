"""Every fuzz case of a tier. ``quick``: the hand-written variants of each op on each
CPU backend; ``long`` adds seeded random shapes, dtypes and layouts (see cases_random)."""

from __future__ import annotations

import functools

from tests.fuzz import cases_attention, cases_pointwise


@functools.lru_cache(maxsize=None)
def catalog(tier: str) -> tuple:
    found = list(cases_pointwise.all_cases()) + list(cases_attention.all_cases())
    ids = [c.id for c in found]
    assert len(ids) == len(set(ids)), "fuzz case ids must be unique"
    return tuple(found)
