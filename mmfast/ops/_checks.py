"""Argument checks shared by several op families, written for the per-call path: each
raises TypeError / ValueError naming the argument."""

from __future__ import annotations

import math
from numbers import Real


def check_eps(eps) -> None:
    """``eps``: a finite number >= 0 (not a bool)."""
    # A float, the usual case, skips isinstance(eps, Real): an ABC check costs ~1 us a call.
    if type(eps) is float and 0.0 <= eps < math.inf:
        return
    if isinstance(eps, bool) or not isinstance(eps, Real) or not (0 <= eps < math.inf):
        raise ValueError(f"eps: expected a finite number >= 0, got {eps!r}")
