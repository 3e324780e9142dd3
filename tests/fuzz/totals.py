"""Fuzz outcomes of this pytest session, printed by tests/fuzz/conftest.py at the end."""

from __future__ import annotations

from collections import Counter

from tests.fuzz.harness import OUTCOMES

regular: Counter = Counter()
known: Counter = Counter()


def record(results: dict, known: bool = False) -> None:
    target = globals()["known"] if known else regular
    for outcome, _ in results.values():
        target[outcome] += 1


def summary(tier: str, seed: int) -> list[str]:
    if not regular and not known:
        return []
    line = ", ".join(f"{name.replace('_', ' ')} {regular[name]}" for name in OUTCOMES)
    lines = [f"fuzz ({tier} tier, seed {seed}): {sum(regular.values())} cases: {line}"]
    if known:
        shown = ", ".join(f"{name.replace('_', ' ')} {known[name]}" for name in OUTCOMES if known[name])
        lines.append(f"  plus {sum(known.values())} known issue 16 (items 1-5) cases, strict xfail: {shown}")
    return lines
