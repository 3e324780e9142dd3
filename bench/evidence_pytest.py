"""pytest plugin of the GPU evidence run: reports each test's outcome as it finishes (so
a run cut off mid-way keeps what ran) and deselects the tests recorded by an earlier run
on the same source."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def recorded_node_ids(path: Path) -> set[str]:
    """Node ids with a final outcome in a tests.jsonl record."""
    ids = set()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("nodeid") and row.get("outcome") in ("passed", "failed", "skipped", "error"):
                ids.add(row["nodeid"])
    return ids


class Recorder:
    """``broken()`` says why the CUDA context is unusable (None if it is fine); after a
    failure that broke it, the session stops: every later test would fail for that
    alone. The worker then starts over in a new process, where the tests recorded so far
    are deselected."""

    def __init__(self, emit: Callable[..., None], recorded: set[str], broken: Callable[[], str | None]):
        self.emit, self.recorded, self.check_broken = emit, recorded, broken
        self.counts = {"passed": 0, "failed": 0, "skipped": 0, "error": 0, "deselected_recorded": 0}
        self.broken: str | None = None
        self.session = None

    def pytest_sessionstart(self, session):
        self.session = session

    def pytest_collection_modifyitems(self, config, items):
        keep = [item for item in items if item.nodeid not in self.recorded]
        dropped = [item for item in items if item.nodeid in self.recorded]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = keep
            self.counts["deselected_recorded"] = len(dropped)

    def pytest_runtest_logreport(self, report):
        # One row per test: its call phase, or the setup/teardown phase that failed or
        # skipped it (a skip in setup has no call phase).
        if report.when == "call" or (report.when == "setup" and not report.passed) or \
                (report.when == "teardown" and report.failed):
            outcome = report.outcome if report.when == "call" else ("error" if report.failed else report.outcome)
            self.counts[outcome] = self.counts.get(outcome, 0) + 1
            row = {"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                   "seconds": round(report.duration, 3)}
            if not report.passed:
                text = report.longreprtext or ""
                row["message"] = text.strip().splitlines()[-1][:500] if text.strip() else ""
            self.emit("row", item="tests", row=row)
            if report.failed and self.session is not None:
                self.broken = self.check_broken()
                if self.broken:
                    self.session.shouldstop = f"CUDA context broken after {report.nodeid}: {self.broken}"
