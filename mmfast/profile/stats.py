"""Figures with their spread, and whether two sides differ.

A figure is the median of its samples with the interquartile range (q1..q3) and the
extremes (min..max); the samples stay in it, in the order they were taken. Two sides
measured in the same interleaved rounds are compared pairwise (round by round), so drift
common to both cancels in the ratio; a difference counts as measured only when the two
interquartile ranges do not overlap.
"""

from __future__ import annotations

import statistics
from typing import Optional, Sequence


def figure(samples: Sequence[Optional[float]]) -> Optional[dict]:
    """{"median", "q1", "q3", "min", "max", "n", "samples"} of ``samples``; None when there
    is nothing to summarise (no samples, or a quantity that does not exist, given as None)."""
    if not samples or any(value is None for value in samples):
        return None
    values = [float(value) for value in samples]
    q1, q3 = quartiles(values)
    return {"median": statistics.median(values), "q1": q1, "q3": q3, "min": min(values), "max": max(values),
            "n": len(values), "samples": values}


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """First and third quartiles, interpolated between samples (so they lie within min..max)."""
    if len(values) == 1:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def relative_spread(values: Sequence[float]) -> float:
    """Interquartile range over the median: 0.05 means the middle half lies within 5%."""
    q1, q3 = quartiles(values)
    middle = statistics.median(values)
    return (q3 - q1) / abs(middle) if middle else float("inf")


def overlap(a: dict, b: dict) -> bool:
    """Whether the interquartile ranges of figures ``a`` and ``b`` overlap."""
    return not (a["q3"] < b["q1"] or b["q3"] < a["q1"])


def compare(ours: Optional[dict], reference: Optional[dict], lower_is_better: bool) -> Optional[dict]:
    """How many times better ``ours`` is than ``reference``: the figure of the per-round
    ratios (reference / ours for a time, ours / reference for a rate), with ``"differs"``:
    False when the two sides' interquartile ranges overlap (no difference measured).
    None when either side lacks the figure."""
    if ours is None or reference is None:
        return None
    if ours["n"] != reference["n"]:
        raise ValueError(f"ours, reference: paired figures need as many samples on each side "
                         f"({ours['n']} and {reference['n']})")
    if min(ours["samples"] + reference["samples"]) <= 0:
        return None  # a zero time or rate has no ratio
    pairs = zip(ours["samples"], reference["samples"])
    ratios = [r / o if lower_is_better else o / r for o, r in pairs]
    return {**figure(ratios), "differs": not overlap(ours, reference)}
