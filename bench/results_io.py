"""Result files: one JSON-lines file per suite (``<out>/<suite>.jsonl``, plus
``peaks.jsonl``), rows only ever appended, so the history of every case stays readable
with nothing more than ``json``. Comparison is by (case, provider) on the same GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mmfast.bench.env import repo_root

PEAKS = "peaks"
# CPU smoke rows saved to the default directory land here, away from GPU history;
# bench/results/.gitignore keeps them out of commits.
CPU_SUBDIR = "cpu-smoke"


def default_out_dir(is_gpu: bool = True) -> Path:
    """bench/results in a checkout, else ./bench-results; CPU runs use a subfolder."""
    root = repo_root()
    base = root / "bench" / "results" if root is not None else Path.cwd() / "bench-results"
    return base if is_gpu else base / CPU_SUBDIR


def results_path(out_dir: Path, suite: str) -> Path:
    return Path(out_dir) / f"{suite}.jsonl"


def append_rows(out_dir: Path, suite: str, rows: list[dict]) -> Path:
    path = results_path(out_dir, suite)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
    return path


def load_rows(out_dir: Path, suite: str) -> list[dict]:
    """All rows saved for ``suite``; a damaged line is reported and skipped, not fatal."""
    path = results_path(out_dir, suite)
    if not path.is_file():
        return []
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                print(f"warning: {path}:{lineno}: skipped unreadable row ({e})", file=sys.stderr)
    return rows


def latest_rows(rows: list[dict], gpu: str) -> dict[tuple[str, str], dict]:
    """For each (case, provider), the most recently saved row measured on ``gpu``.

    Per case rather than per whole run, so a full run compares against the last full
    measurement of each case even when a --quick run (a subset) was saved in between.
    """
    latest: dict[tuple[str, str], dict] = {}
    for row in rows:
        if row.get("gpu") != gpu or row.get("ms") is None:
            continue
        key = (row["case"], row["provider"])
        # ISO-8601 UTC strings of one format sort in time order.
        if key not in latest or (row["run_id"], row["time"]) >= (latest[key]["run_id"], latest[key]["time"]):
            latest[key] = row
    return latest


def time_change(row: dict, previous: dict | None) -> float | None:
    """Relative change of the median time: -0.10 means 10% faster than before."""
    if previous is None or not previous.get("ms") or row.get("ms") is None:
        return None
    return row["ms"] / previous["ms"] - 1.0
