"""Fuzz outcomes of this pytest session, printed by tests/fuzz/conftest.py at the end."""

from __future__ import annotations

from collections import Counter

from tests.fuzz.harness import OUTCOMES

outcomes: Counter = Counter()


def record(results: dict) -> None:
    for outcome, _ in results.values():
        outcomes[outcome] += 1


def summary(tier: str, seed: int) -> list[str]:
    if not outcomes:
        return []
    line = ", ".join(f"{name.replace('_', ' ')} {outcomes[name]}" for name in OUTCOMES)
    return [f"fuzz ({tier} tier, seed {seed}): {sum(outcomes.values())} cases: {line}"]
