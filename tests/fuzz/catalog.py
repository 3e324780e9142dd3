"""Every fuzz case of a tier. ``quick``: the hand-written variants of each op on each
CPU backend; ``long`` adds seeded random shapes, dtypes and layouts (see cases_random)."""

from __future__ import annotations

import functools
import os

from tests.fuzz import (cases_attention, cases_misc, cases_pointwise, cases_random, cases_rel_pos_video,
                        cases_selftest)


TIER = os.environ.get("MMFAST_FUZZ", "quick")
if TIER not in ("quick", "long"):
    raise ValueError(f"MMFAST_FUZZ: expected 'quick' or 'long', got {TIER!r}")


@functools.lru_cache(maxsize=None)
def catalog(tier: str) -> tuple:
    if tier == "selftest":  # the harness's own test cases
        return tuple(cases_selftest.all_cases())
    found = [*cases_pointwise.all_cases(), *cases_attention.all_cases(), *cases_misc.all_cases(),
             *cases_rel_pos_video.all_cases()]
    if tier == "long":
        found += cases_random.all_cases()
    ids = [c.id for c in found]
    assert len(ids) == len(set(ids)), "fuzz case ids must be unique"
    return tuple(found)
