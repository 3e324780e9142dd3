"""The resource table (bench/results/sm90_resources.jsonl): one JSON row per compiled
kernel x config x shape x dtype, in the order of a full run (the cases' order in
cases.py). A run of some families (``--full --only F --update``) replaces their rows and
keeps every other family's, so the table reads as one full run would write it."""

from __future__ import annotations

import json
from pathlib import Path

from .cases import all_cases


def read_rows(path: Path) -> list[dict]:
    """The rows of a table file; none when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")


def replace_families(old: list[dict], new: list[dict], families: tuple[str, ...]) -> list[dict]:
    """``old`` without the rows of ``families``, plus ``new``: families in the order of
    cases.py (each family's rows in their own order), then any family cases.py no longer
    has, as they stood."""
    if not families:
        raise ValueError("families: name the families whose rows are replaced")
    strays = sorted({r["family"] for r in new} - set(families))
    if strays:
        raise ValueError(f"new: rows of families {strays} outside families {list(families)}")
    by_family: dict[str, list[dict]] = {}
    for r in [r for r in old if r["family"] not in families] + new:
        by_family.setdefault(r["family"], []).append(r)
    order = list(dict.fromkeys(c.family for c in all_cases()))
    order += [f for f in by_family if f not in order]
    return [r for f in order for r in by_family.get(f, [])]
